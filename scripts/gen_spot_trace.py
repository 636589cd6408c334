#!/usr/bin/env python3
"""Generates the synthetic, seeded spot markets in examples/traces/ (see its README.md): single-GPU
instance types in three zones over 72 hours.

- us-east-1-gpu-72h.csv: the shipped market (one pool's interruption storm and drought, one squeeze).
- us-east-1-gpu-zonal-72h.csv: a harsher one, all inside the benchmark workload's first ~10 hours:
  a zone-wide capacity event (every pool of us-east-1b is taken back, one type after another
  over an hour, and has no spot capacity until hour 6), the two cheapest remaining pools
  drying up together (hours 6-8), and one pool's spot price above on-demand for 8 hours.

Deterministic: rerunning it rewrites the same files."""
import random

ON_DEMAND = {"g4dn.xlarge": 0.526, "g6.xlarge": 0.805, "g5.xlarge": 1.006}
# Typical spot price as a fraction of on-demand, per type and zone.
DISCOUNT = {
    "g4dn.xlarge": {"us-east-1a": 0.28, "us-east-1b": 0.33, "us-east-1c": 0.36},
    "g6.xlarge": {"us-east-1a": 0.34, "us-east-1b": 0.31, "us-east-1c": 0.37},
    "g5.xlarge": {"us-east-1a": 0.36, "us-east-1b": 0.40, "us-east-1c": 0.33},
}
BASE_RATE = {"g4dn.xlarge": 0.03, "g6.xlarge": 0.02, "g5.xlarge": 0.04}

rng = random.Random(20261129)
lines = [
    "# Synthetic spot market (seeded; scripts/gen_spot_trace.py). Format: examples/traces/README.md",
    "hour,instance_type,zone,spot_usd_per_hour,on_demand_usd_per_hour,interruptions_per_hour,spot_capacity",
]
for itype, od in ON_DEMAND.items():
    for zone, discount in DISCOUNT[itype].items():
        level = discount
        for hour in range(72):
            level = min(0.9, max(0.18, level * (1 + rng.uniform(-0.03, 0.03))))
            rate = BASE_RATE[itype] * rng.uniform(0.5, 1.5)
            capacity = 32
            # The cheapest pool at the start has a bad day: an interruption storm, then it runs dry.
            if (itype, zone) == ("g4dn.xlarge", "us-east-1a"):
                if 8 <= hour < 20:
                    rate = 0.8
                    level = min(0.9, level * 1.04)
                if 20 <= hour < 30:
                    capacity = 0
            # A second, shorter squeeze elsewhere.
            if (itype, zone) == ("g6.xlarge", "us-east-1b") and 40 <= hour < 46:
                rate, capacity = 0.5, 4
            lines.append(f"{hour},{itype},{zone},{od * level:.4f},{od:.3f},{rate:.3f},{capacity}")

with open("examples/traces/us-east-1-gpu-72h.csv", "w") as f:
    f.write("\n".join(lines) + "\n")

# The harsher market: same pools and price levels, other draws, correlated events.
rng = random.Random(20261204)
lines = [
    "# Synthetic spot market with correlated events (seeded; scripts/gen_spot_trace.py).",
    "# Format and scenario: examples/traces/README.md",
    "hour,instance_type,zone,spot_usd_per_hour,on_demand_usd_per_hour,interruptions_per_hour,spot_capacity",
]
# Zone event: us-east-1b loses its spot capacity type by type (hours), back at hour 6.
ZONE, ZONE_BACK = "us-east-1b", 6
ZONE_EVENT = {"g4dn.xlarge": 2.0, "g6.xlarge": 2.5, "g5.xlarge": 3.0}
for itype, od in ON_DEMAND.items():
    for zone, discount in DISCOUNT[itype].items():
        level = discount
        rows = []
        for hour in range(72):
            level = min(0.9, max(0.18, level * (1 + rng.uniform(-0.03, 0.03))))
            rate = BASE_RATE[itype] * rng.uniform(0.5, 1.5)
            price = od * level
            capacity = 32
            # The two cheapest pools outside the zone dry up together for 2 hours.
            if itype == "g4dn.xlarge" and zone in ("us-east-1a", "us-east-1c") and 6 <= hour < 8:
                capacity = 0
            # Spot above on-demand for 8 hours.
            if (itype, zone) == ("g6.xlarge", "us-east-1c") and 1 <= hour < 9:
                price = od * 1.15
            rows.append([float(hour), price, rate, capacity])
        if zone == ZONE:
            start = ZONE_EVENT[itype]
            # The zone's long-run rates look normal: the event is not in any pool's history.
            rows = [r for r in rows if not (start <= r[0] < ZONE_BACK)]
            rows.append([start, od * discount, BASE_RATE[itype], 0])  # the next row restores it
            rows.sort()
        for hour, price, rate, capacity in rows:
            lines.append(f"{hour:g},{itype},{zone},{price:.4f},{od:.3f},{rate:.3f},{capacity}")

with open("examples/traces/us-east-1-gpu-zonal-72h.csv", "w") as f:
    f.write("\n".join(lines) + "\n")
