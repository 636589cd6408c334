# Sourced by the benchmarks (from the repository root): sets $flotilla to the binary to measure.
# FLOTILLA_BIN=path: a binary built elsewhere (an A/B against an older build; no build here).
# Otherwise a release build, or with FLOTILLA_BENCH_PROFILE=dev the debug build that
# scripts/test.sh leaves (dependencies are optimised there too).
if [ -n "${FLOTILLA_BIN:-}" ]; then
  flotilla=$FLOTILLA_BIN
elif [ "${FLOTILLA_BENCH_PROFILE:-release}" = dev ]; then
  cargo build --quiet
  flotilla="${CARGO_TARGET_DIR:-target}/debug/flotilla"
else
  cargo build --release --quiet
  flotilla="${CARGO_TARGET_DIR:-target}/release/flotilla"
fi
