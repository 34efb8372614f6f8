#!/usr/bin/env bash
# Runs every Cordon test: lint, build, then the whole workspace under cargo-nextest.
# As root it first installs the system tools the network tests need when they are missing; otherwise
# it says what it skipped, and those tests skip themselves with a clear message.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the namespace, interop, packaging and benchmark tests use (command -> package).
declare -A wanted=([ip]=iproute2 [iptables]=iptables [wireguard-go]=wireguard-go [wg]=wireguard-tools [iperf3]=iperf3 [ping]=iputils-ping [python3]=python3 [pip3]=python3-pip [sysctl]=procps [openssl]=openssl [systemd-analyze]=systemd [chromium]=chromium [chromedriver]=chromium-driver)
missing=()
for cmd in "${!wanted[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${wanted[$cmd]}")
done
# The directory of PostgreSQL's server binaries: Debian keeps initdb off PATH, in /usr/lib/postgresql/<v>/bin.
pg_bindir() {
  local initdb
  initdb=$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1)
  [ -n "$initdb" ] || initdb=$(command -v initdb 2>/dev/null) || return 1
  dirname "$initdb"
}
pg_bindir >/dev/null || missing+=(postgresql)
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

# The official LLM SDKs the gateway tests drive, gRPC for the Python client example and Selenium for the
# console's browser test (pinned; PyPI is reachable here).
python_sdks=(openai==1.109.1 anthropic==0.125.0 grpcio==1.85.1 grpcio-tools==1.85.1 selenium==4.27.1)
if command -v python3 >/dev/null 2>&1 && ! python3 -c "import openai, anthropic, grpc, grpc_tools, selenium" >/dev/null 2>&1; then
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
# One private PostgreSQL cluster for the whole run; without it every test process would start its own
# (tests/src/pg.rs). It runs as `postgres` when we are root, because PostgreSQL refuses to run as root.
pg_dir=""
pg_as=()
stop_postgres() {
  [ -n "$pg_dir" ] || return 0
  "${pg_as[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -m fast -s stop >/dev/null 2>&1 || true
  rm -rf "$pg_dir"
}
start_postgres() {
  pg_bin=$(pg_bindir) || { echo "warning: PostgreSQL is not installed (apt-get install postgresql); its tests will skip"; return 0; }
  if [ "$(id -u)" = 0 ]; then
    if ! id -u postgres >/dev/null 2>&1; then
      echo "warning: no postgres user to run PostgreSQL as (useradd --system postgres); its tests will skip"
      return 0
    fi
    pg_as=(runuser -u postgres --)
  fi
  pg_dir=$(mktemp -d "${TMPDIR:-/tmp}/cordon-pg.XXXXXX")
  trap stop_postgres EXIT
  [ ${#pg_as[@]} -eq 0 ] || chown postgres: "$pg_dir"
  chmod 700 "$pg_dir"
  local port
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null) \
    || port=$(for p in $(shuf -i 20000-60000 -n 50); do (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; break; }; done)
  if ! (cd "$pg_dir" && "${pg_as[@]}" "$pg_bin/initdb" -D "$pg_dir/data" --auth=trust --no-sync -U postgres -E UTF8 \
    --locale=C >"$pg_dir/initdb.log" 2>&1); then
    echo "warning: initdb failed (see below); the PostgreSQL tests will start their own cluster or skip"
    cat "$pg_dir/initdb.log"
    stop_postgres; pg_dir=""
    return 0
  fi
  (cd "$pg_dir" && "${pg_as[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/postgres.log" -W -s \
    -o "-k $pg_dir -p $port -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=200" start) || true
  local deadline=$((SECONDS + 60))
  until "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres; do
    if [ $SECONDS -ge $deadline ] || grep -q FATAL "$pg_dir/postgres.log" 2>/dev/null; then
      echo "warning: PostgreSQL did not start accepting connections; its log ends:"
      tail -n 20 "$pg_dir/postgres.log" 2>/dev/null || true
      echo "warning: the PostgreSQL tests will start their own cluster or skip"
      stop_postgres; pg_dir=""
      return 0
    fi
    sleep 0.2
  done
  export CORDON_TEST_POSTGRES="postgres://postgres@127.0.0.1:$port/postgres"
  echo "==> PostgreSQL for the tests at $CORDON_TEST_POSTGRES"
}
start_postgres

# The control-plane suite runs a second time with every test server on PostgreSQL (same tests, other
# engine). The paused-clock tests (expiry, restart deadlines) open sled themselves: a paused clock jumps
# ahead while a test waits on a socket, which would fire the connection pool's timeouts.
engine_suite=(--test control_api --test netmap --test policy --test registration_races --test restart
  --test oidc --test crash --test upstreams --test gateway --test gateway_secrets --test store --test governance --test webhooks --test people)
status=0
if cargo nextest --version >/dev/null 2>&1; then
  echo "==> cargo nextest run"
  cargo nextest run --workspace --locked --no-fail-fast || status=$?
  echo "==> cargo nextest run (control-plane suite on PostgreSQL)"
  CORDON_TEST_STORE=postgres cargo nextest run -p cordon-tests --locked --no-fail-fast "${engine_suite[@]}" || status=$?
else
  echo "==> cargo-nextest not installed; using cargo test"
  cargo test --workspace --locked --no-fail-fast || status=$?
  echo "==> cargo test (control-plane suite on PostgreSQL)"
  CORDON_TEST_STORE=postgres cargo test -p cordon-tests --locked --no-fail-fast "${engine_suite[@]}" || status=$?
fi
exit $status
