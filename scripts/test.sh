#!/usr/bin/env bash
# The one test command: formatting, lints with warnings denied, then every test.
# What CI runs (.ci/run) is exactly this; run it the same way on your machine.
#
# Environment:
#   CARGO_TARGET_DIR  where to build (default: ./target). CI keeps one outside the clone so
#                     dependencies are not rebuilt on every run.
#
# Set-up it does itself: a Python venv in ./.venv with moto (pinned), whose server is the real
# S3 and EC2 API peer of the storage and provider tests; it runs on a free loopback port during
# the tests (scripts/moto.sh). A second venv, ./.venv-terraform, with python-hcl2 and checkov
# (pinned) for the offline checks of terraform/ (scripts/terraform_check.py). Debian's chromium
# (apt-get, when /usr/bin/chromium is missing) for the dashboard's browser test (tests/dashboard.rs;
# its screenshot is kept in $CARGO_TARGET_DIR/tmp/dashboard/job.png).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

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

step "GPU code compiles (burn's CUDA backend, NCCL through cudarc; no GPU needed)"
cargo clippy --workspace --features cuda --all-targets --locked -- -D warnings

step "GPU jobs fail cleanly without a GPU (the cuda build, on this GPU-less machine)"
cargo test -p flotilla-worker --features cuda --locked gpu

step "moto (S3 and EC2 API peer of the storage and provider tests)"
source scripts/moto.sh

step "headless Chromium (the dashboard's browser test)"
if [ -z "${FLOTILLA_CHROMIUM:-}" ] && ! [ -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }
  else
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
  fi
fi
"${FLOTILLA_CHROMIUM:-/usr/bin/chromium}" --version

step "cargo test"
cargo test --workspace --locked --features ec2

step "terraform/: parses, checkov clean, IAM exactly the actions the code calls, command lines accepted"
TF_TOOLS="python-hcl2==8.1.4 checkov==3.3.30"
if ! .venv-terraform/bin/python -c "import hcl2, checkov" 2>/dev/null; then
  python3 -m venv .venv-terraform
  .venv-terraform/bin/pip install --quiet --disable-pip-version-check $TF_TOOLS
fi
.venv-terraform/bin/python scripts/terraform_check.py "${CARGO_TARGET_DIR:-target}/debug/flotilla"

step "all checks passed"
