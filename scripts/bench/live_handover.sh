#!/usr/bin/env bash
# Live handover benchmark (#25): the MLP 784-512-512-10 of train.sh on WORLD ranks (threads on
# the loopback TCP ring); after 40 steps the last rank hands its place to a joining member that
# catches up from its state and the gang's updates, and the gang swaps at a step boundary it
# agrees on, without stopping. One JSON line per round: the survivors' median step time, their
# longest time without an optimizer step around the swap (survivor_longest_without_a_step_ms)
# and its ratio to the median (vs_median_step), the updates the joiner replayed and the bytes
# moved peer to peer.
#
#   scripts/bench/live_handover.sh [ROUNDS] [WORLD]      (defaults 3, 2)
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
world=${2:-2}
cargo build --release --quiet
"${CARGO_TARGET_DIR:-target}/release/flotilla" bench-live-handover --rounds "$rounds" --world "$world"
