#!/usr/bin/env bash
# Runs every Cordon test: lint, build, then the whole workspace under cargo-nextest.
# As root it first installs the system tools the network tests need when they are missing; otherwise
# it says what it skipped, and those tests skip themselves with a clear message.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the namespace, interop and benchmark tests use (command -> package).
declare -A wanted=([ip]=iproute2 [iptables]=iptables [wireguard-go]=wireguard-go [wg]=wireguard-tools [iperf3]=iperf3 [ping]=iputils-ping [python3]=python3 [pip3]=python3-pip [sysctl]=procps [openssl]=openssl)
missing=()
for cmd in "${!wanted[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${wanted[$cmd]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || echo "warning: apt-get update failed; trying the install anyway"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
      || echo "warning: could not install ${missing[*]}; the tests that need them will skip"
  else
    echo "==> not root (or no apt-get): skipping the install of ${missing[*]}; tests that need them will skip"
  fi
fi

# The official LLM SDKs the gateway tests drive (pinned; PyPI is reachable here).
python_sdks=(openai==1.109.1 anthropic==0.125.0)
if command -v python3 >/dev/null 2>&1 && ! python3 -c "import openai, anthropic" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "==> installing ${python_sdks[*]} (pip)"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "${python_sdks[@]}" \
      || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "${python_sdks[@]}" \
      || echo "warning: could not install ${python_sdks[*]}; the SDK test will skip"
  else
    echo "==> not root: skipping pip install of ${python_sdks[*]}; the SDK test will skip"
  fi
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo build (binaries the end-to-end tests run)"
cargo build --workspace --bins --locked
if cargo nextest --version >/dev/null 2>&1; then
  echo "==> cargo nextest run"
  cargo nextest run --workspace --locked --no-fail-fast
else
  echo "==> cargo-nextest not installed; using cargo test"
  cargo test --workspace --locked --no-fail-fast
fi
