#!/usr/bin/env python3
"""Generates examples/traces/us-east-1-gpu-72h.csv: a synthetic, seeded spot market of single-GPU
instance types in three zones over 72 hours (see examples/traces/README.md). Deterministic:
rerunning it rewrites the same file."""
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
