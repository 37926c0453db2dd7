"""Fit the memory planner's calibration (scripts/plan.py, CALIBRATION) to measured training steps.

    python docs/study/plan_fit.py docs/measurements/training_steps_h100_2026-11-27.jsonl

Each row (the "training" rows of the benchmark JSON that docs/study/plan_sweep.sh writes) is one training config, patch and batch
with its measured peak memory and step time on a GPU. The planner's probe runs once per config on this
CPU; the four memory coefficients are fitted by least squares on the error relative to the larger of
the peak and 1 GiB, and the step time as a launch cost per operator plus the saved bytes at a rate (the memory traffic
grows with them; adding the floating-point work gave it a negative cost, so it is left out).
Rows with gradient checkpointing are left out: the probe cannot see what it recomputes.
"""

import json
import math
import sys

import numpy as np

from scripts.plan import CALIBRATION, GIB, probe, training_step_from_config

rows = []
for path in sys.argv[1:]:  # JSON lines of rows, or benchmark JSON (its "training" rows)
    text = open(path).read()
    rows += json.loads(text)["training"] if path.endswith(".json") else [json.loads(line) for line in text.splitlines()]
rows = [r for r in rows if r.get("peak_bytes") and not r["overrides"].get("use_gradient_checkpointing")]
probes = {}
for r in rows:
    key = json.dumps([r["configs"], r["overrides"]])
    if key not in probes:
        probes[key] = probe(training_step_from_config(r["configs"], r["overrides"]))
    r["probe"] = probes[key]
    r["voxels"] = r["batch_size"] * math.prod(r["patch"])

features = np.array([[r["voxels"] * r["probe"].saved_per_voxel, r["voxels"] * r["probe"].largest_per_voxel, r["voxels"], 1.0] for r in rows])
target = np.array([r["peak_bytes"] - r["probe"].static_bytes for r in rows])
weight = 1 / np.maximum([r["peak_bytes"] for r in rows], GIB)
memory, *_ = np.linalg.lstsq(features * weight[:, None], target * weight, rcond=None)
timing = np.array([[r["probe"].operators, r["voxels"] * r["probe"].saved_per_voxel] for r in rows])
seconds = np.array([r["seconds"] for r in rows])
(t0, per_byte), *_ = np.linalg.lstsq(timing / seconds[:, None], np.ones(len(rows)), rcond=None)
fit = {"saved": memory[0], "largest": memory[1], "per_voxel": memory[2], "fixed": memory[3],
       "seconds_per_operator": t0, "saved_bytes_per_second": 1 / per_byte}
print("calibration:", json.dumps({k: float(f"{v:.4g}") for k, v in fit.items()}))
CALIBRATION.update(fit)

print("| config | layout | other | patch | batch | measured GiB | planned GiB | error | measured s | planned s |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
big, small, times = [], [], []
for r in rows:
    planned = r["probe"].peak_bytes(r["patch"], r["batch_size"])
    error = planned / r["peak_bytes"] - 1
    (big if r["peak_bytes"] >= GIB else small).append(abs(error) if r["peak_bytes"] >= GIB else abs(planned - r["peak_bytes"]) / GIB)
    t = r["probe"].step_seconds(r["patch"], r["batch_size"])
    times.append(abs(t / r["seconds"] - 1))
    name = "16x" if "16x" in str(r["configs"]) else "8x" if "8x" in str(r["configs"]) else "4x"
    other = {k: v for k, v in r["overrides"].items() if k != "layout"}
    other = ", ".join(f"{k} {v}" for k, v in other.items()) + (" deterministic" if r.get("deterministic") else "")
    print(f"| {name} | {r['overrides'].get('layout', 'space_to_depth')} | {other} | {'x'.join(map(str, r['patch']))} | "
          f"{r['batch_size']} | {r['peak_bytes'] / GIB:.2f} | {planned / GIB:.2f} | {error:+.1%} | {r['seconds']:.3f} | {t:.3f} |")
print(f"\nrows of at least 1 GiB: {len(big)}, largest error {max(big):.1%}; smaller rows: {len(small)}, "
      f"largest error {max(small):.2f} GiB; step time: median error {np.median(times):.0%}, largest {max(times):.0%}")
