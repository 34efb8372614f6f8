#!/usr/bin/env bash
# The gateway benchmark with LiteLLM's proxy as a second baseline: installs litellm[proxy] (pinned) into a
# virtualenv under target/ when it can, then runs `cargo bench -p cordon-tests --bench gateway`.
# Without Python or PyPI, the benchmark runs and says it skipped LiteLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
LITELLM_VERSION=1.77.7   # pinned; never 1.107.0
venv=target/litellm-venv
if [ ! -x "$venv/bin/litellm" ] && command -v python3 >/dev/null 2>&1; then
  echo "==> installing litellm[proxy]==$LITELLM_VERSION into $venv"
  python3 -m venv "$venv" && "$venv/bin/pip" install --quiet --disable-pip-version-check "litellm[proxy]==$LITELLM_VERSION" \
    || echo "warning: could not install litellm; its rows will be skipped"
fi
if [ -x "$venv/bin/litellm" ]; then
  export CORDON_LITELLM="$PWD/$venv/bin/litellm"
fi
exec cargo bench -p cordon-tests --bench gateway -- "$@"
