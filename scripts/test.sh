#!/usr/bin/env bash
# The one test command: formatting, lints with warnings denied, then every test.
# What CI runs (.ci/run) is exactly this; run it the same way on your machine.
#
# Environment:
#   CARGO_TARGET_DIR  where to build (default: ./target). CI keeps one outside the clone so
#                     dependencies are not rebuilt on every run.
#
# Set-up it does itself: a Python venv in ./.venv with moto (pinned), whose server is the real
# EC2 API peer of the EC2 provider's tests; it runs on a free loopback port during the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

MOTO_VERSION=5.1.22

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo is not installed; install Rust 1.95 or newer from https://rustup.rs" >&2
  exit 1
fi
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    step "installing the $component component"
    rustup component add "$component"
  fi
done

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (warnings denied)"
cargo clippy --workspace --all-targets --locked --features ec2 -- -D warnings

step "GPU code compiles (NCCL through cudarc; no GPU needed, it fails cleanly at run time)"
cargo clippy -p flotilla-worker --features cuda --all-targets --locked -- -D warnings

step "moto $MOTO_VERSION (EC2 API peer for the provider tests)"
if ! .venv/bin/python -c "import moto, sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
fi
moto_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
moto_log="${TMPDIR:-/tmp}/flotilla-moto-$moto_port.log"
.venv/bin/moto_server -H 127.0.0.1 -p "$moto_port" >"$moto_log" 2>&1 &
moto_pid=$!
trap 'kill "$moto_pid" 2>/dev/null || true' EXIT
python3 - "$moto_port" <<'PY'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/moto-api/"
for _ in range(150):
    try:
        urllib.request.urlopen(url, timeout=1)
        sys.exit(0)
    except Exception:
        time.sleep(0.2)
sys.exit(f"moto did not start on {url}")
PY
export FLOTILLA_MOTO_ENDPOINT="http://127.0.0.1:$moto_port"

step "cargo test"
cargo test --workspace --locked --features ec2

step "all checks passed"
