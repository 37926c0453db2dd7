"""Profile the bundle's own training as the runner builds it: after a warm-up, a number of
iterations under torch.profiler. It writes the operators that take the most host time and, on a
GPU, the kernels' summed time against the wall time (near 1: the GPU never waited). The time a
step spends outside the network shows here: the data path, host synchronisation, the moving
average, logging.

    PYTHONPATH=. python docs/study/profile_training.py OUT_DIR "['configs/train_autoencoder.yaml']" '{"cache": "gpu"}' [WARMUP] [STEPS]

from the bundle's root (the configs import scripts). Under torchrun, with the multi-GPU overlay among
the configs, each process profiles itself into OUT_DIR/rank<N>.

OUT_DIR receives profile.txt (the operators by host time, then the GPU kernels by their time) and
profile.json (the summary, with the collective kernels' time per step: NCCL's all-reduce of DDP).
"""

from __future__ import annotations

import ast
import json
import os
import sys
import time
from pathlib import Path

import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def main(out_dir: str, config_files: str, overrides: str = "{}", warmup: int = 50, steps: int = 50) -> dict:
    out = Path(out_dir) / (f"rank{os.environ['RANK']}" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "")
    out.mkdir(parents=True, exist_ok=True)
    warmup, steps = int(warmup), int(steps)
    settings = dict(json.loads(overrides), max_epochs=1, epoch_length=warmup + steps, use_mlflow=False)
    workflow = ConfigWorkflow(config_file=ast.literal_eval(config_files), workflow_type="train", **settings)
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    device = workflow.parser.get_parsed_content("device")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    profiler = profile(activities=activities)
    clock: dict[str, float] = {}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @trainer.on(Events.ITERATION_COMPLETED(once=warmup))
    def start(_) -> None:
        sync()
        profiler.start()
        clock["start"] = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED(once=warmup + steps))
    def stop(_) -> None:
        sync()
        clock["wall"] = time.perf_counter() - clock["start"]
        profiler.stop()

    workflow.run()
    workflow.finalize()
    averages = profiler.key_averages()
    # the GPU's own work: kernels and copies, not the ranges that annotate them (DistributedDataParallel.forward,
    # nccl:all_reduce), which the profiler also lists with GPU time and would count twice
    kernels = [e for e in averages if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    kernel_us = sum(e.self_device_time_total for e in kernels)
    nccl_us = sum(e.self_device_time_total for e in kernels if "nccl" in e.key.lower())
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "config_files": config_files,
        "overrides": json.loads(overrides),
        "steps": steps,
        "seconds_per_step": clock["wall"] / steps,
        "kernel_seconds_per_step": kernel_us / 1e6 / steps,
        "kernel_share_of_wall": kernel_us / 1e6 / clock["wall"] if device.type == "cuda" else None,
        "nccl_seconds_per_step": nccl_us / 1e6 / steps,
    }
    tables = [averages.table(sort_by="self_cpu_time_total", row_limit=40)]
    if device.type == "cuda":
        tables.append(averages.table(sort_by="self_device_time_total", row_limit=25))
    (out / "profile.txt").write_text("\n\n".join(tables))
    (out / "profile.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main(*sys.argv[1:])
