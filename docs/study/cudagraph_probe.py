"""Does a CUDA-graph compile mode make the launch-bound diffusion UNet step faster? The benchmark's
UNet step (scripts.benchmark: 256x256x64 volumes, 3 latent channels, UNet 64/128/128, batch 1, bf16)
eager, under Inductor's default mode, and under ``reduce-overhead`` (CUDA graphs) with
``torch.compiler.cudagraph_mark_step_begin()`` before each step, which tells the graphs that the
last step's outputs are no longer read (what the bundle's training loop lacked when that mode
stopped it). GPU only.

    python docs/study/cudagraph_probe.py OUT.json [FACTOR ...]
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler

from scripts.benchmark import _measure


def unet_step(latent: list[int], args: dict, mode: str | None) -> Callable[[], float]:
    """scripts.benchmark.diffusion_step at batch 1, bf16, its UNet under ``mode`` (None: eager), each
    step marked as a new one for CUDA graphs."""
    device = torch.device("cuda")
    bare = DiffusionModelUNet(**args).to(device)
    optimizer = torch.optim.Adam(bare.parameters(), lr=1e-4, fused=True)
    unet = bare if mode is None else torch.compile(bare, mode=None if mode == "default" else mode)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.randn(1, *latent, device=device)

    def step() -> float:
        torch.compiler.cudagraph_mark_step_begin()
        optimizer.zero_grad(set_to_none=True)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (1,), device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = unet(scheduler.add_noise(latents, noise, t), timesteps=t)
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        optimizer.step()
        return float(loss)

    return step


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
                row = _measure(unet_step(latent, args, mode), device, warmup=15, steps=40)
            except Exception as e:  # the mode that failed in training: record why, go on
                row = {"error": f"{type(e).__name__}: {e}"[:400]}
            row.update(factor=factor, mode=mode or "eager", wall_s=round(time.perf_counter() - start, 1))
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
