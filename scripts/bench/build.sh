# Sourced by the benchmarks (from the repository root): builds flotilla and sets $flotilla to
# the binary. A release build, or with FLOTILLA_BENCH_PROFILE=dev the debug build that
# scripts/test.sh leaves (dependencies are optimised there too).
if [ "${FLOTILLA_BENCH_PROFILE:-release}" = dev ]; then
  cargo build --quiet
  flotilla="${CARGO_TARGET_DIR:-target}/debug/flotilla"
else
  cargo build --release --quiet
  flotilla="${CARGO_TARGET_DIR:-target}/release/flotilla"
fi
