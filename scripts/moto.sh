#!/usr/bin/env bash
# Sourced by scripts/test.sh and the benchmarks: installs moto (pinned) into ./.venv when
# missing, starts its server on a free loopback port for the caller's lifetime, and exports
# FLOTILLA_MOTO_ENDPOINT (and FLOTILLA_MOTO_SERVER, the server's path). moto is the real S3 and EC2 API peer of the tests; nothing leaves
# the loopback interface.
#
#   source scripts/moto.sh      (from the repository root; sets an EXIT trap that stops moto)

MOTO_VERSION=5.1.22

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
# The server itself, for tests that start their own (the multi-host test runs one in a namespace).
export FLOTILLA_MOTO_SERVER="$PWD/.venv/bin/moto_server"
