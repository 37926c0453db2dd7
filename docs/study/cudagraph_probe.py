"""Does a CUDA-graph compile mode make the launch-bound diffusion UNet step faster? The benchmark's
UNet step (scripts.benchmark: 256x256x64 volumes, 3 latent channels, UNet 64/128/128, batch 1, bf16)
eager, under Inductor's default mode, and under ``reduce-overhead`` (CUDA graphs) with
``torch.compiler.cudagraph_mark_step_begin()`` before each step (as the benchmark's step does for
these modes), which tells the graphs that the last step's outputs are no longer read. GPU only.

    python docs/study/cudagraph_probe.py OUT.json [FACTOR ...]
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import torch

import scripts.benchmark as benchmark


def unet_step(latent: list[int], args: dict, mode: str | None) -> Callable[[], float]:
    """The benchmark's UNet step at batch 1, bf16, its UNet under ``mode`` (None: eager)."""
    return benchmark.diffusion_step(latent, 1, torch.bfloat16, torch.device("cuda"), args, mode)


def main(out: str, *factors: str) -> None:
    device = torch.device("cuda")
    args = dict(spatial_dims=3, in_channels=3, out_channels=3, channels=(64, 128, 128), attention_levels=(False, True, True),
                num_res_blocks=1, num_head_channels=32, norm_num_groups=32, use_flash_attention=True)
    rows = []
    for factor in [int(f) for f in factors] or [4, 8]:
        latent = [3, 256 // factor, 256 // factor, 64 // factor]
        for mode in (None, "default", "reduce-overhead"):
            torch._dynamo.reset()
            start = time.perf_counter()
            try:
                row = benchmark._measure(unet_step(latent, args, mode), device, 15, 40, graphs=mode == "reduce-overhead")
            except Exception as e:  # the mode that failed in training: record why, go on
                row = {"error": f"{type(e).__name__}: {e}"[:400]}
            row.update(factor=factor, mode=mode or "eager", wall_s=round(time.perf_counter() - start, 1))
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
