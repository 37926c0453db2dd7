"""Memory planner of the autoencoder training step: which patch and batch fit a GPU, before training.

    python -m scripts.plan --gpu_memory 12 --image_size 256 256 128
    python -m scripts.plan --gpu_memory 24 --config_file '["configs/train_autoencoder.yaml", "my_overlay.yaml"]'    # your network

The peak memory of a training step is modelled from what the step keeps for backward, counted rather
than guessed: the trainer's own step runs once on the CPU, in float32, at a small probe patch, with a
hook that sums every tensor autograd saves (and notes the largest). Those grow in proportion to the
voxels of a batch, so one probe gives every patch and batch. The peak on the GPU is then

    weights, gradients, Adam moments and autocast's copies (per parameter)
    + a * saved + b * largest saved + c * voxels + d

with ``a, b, c, d`` fitted to the peaks measured on a GPU (``CALIBRATION``; the sweep and the fit are
in ``docs/performance.md``). The step time is a launch cost per operator the step dispatches plus its
saved bytes at a measured rate (the memory traffic grows with them), both counted in the same probe.
Training calls ``check_fits`` before the first batch and refuses a patch and batch that the planner
says will not fit, naming what does.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from torch.utils._python_dispatch import TorchDispatchMode

from scripts.engines import AutoencoderKLTrainer, autocast_dtype, compiled, uses_cuda_graphs
from scripts.io import claimed, write_atomic

logger = logging.getLogger(__name__)
BUNDLE_ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = str(BUNDLE_ROOT / "configs" / "train_autoencoder.yaml")
FACTOR_OVERLAYS = {  # the factor sets the bundle ships, as training config overlays; "config": as given
    "config": [],
    "4x": [],
    "8x": [str(BUNDLE_ROOT / "configs" / "examples" / "factors_8x.yaml")],
    "16x": [str(BUNDLE_ROOT / "configs" / "examples" / "factors_16x.yaml")],
}
GIB = 2**30
# Fitted to 103 training steps measured on an NVIDIA H100 80GB HBM3 (bf16, PyTorch 2.11, 2026-11-27):
# the 4x, 8x and 16x configs in both layouts, patches 64^3 to 256x256x128, batches 1 to 4, with the
# adversarial, spectral and deterministic variants, and the benchmark's reference networks
# (docs/study/plan_sweep.sh, docs/study/plan_fit.py, docs/measurements/training_steps_*.jsonl).
# Peaks of at least 1 GiB within 7.8%; smaller ones within 0.27 GiB; step times within 15% (median).
CALIBRATION = {
    "card": "NVIDIA H100 80GB HBM3",
    "saved": 0.7135,  # GPU bytes (bf16 autocast) per byte that the float32 CPU probe saves
    "largest": 1.803,  # per byte of the largest saved tensor: the gradients in flight at the peak
    "per_voxel": 32.38,  # bytes per input voxel: the batch, the reconstruction and the loss terms
    "fixed": 97.82e6,  # bytes that do not scale with the patch: cuDNN's workspace and the like
    "seconds_per_operator": 8.813e-6,  # the launch cost of each operator the step dispatches
    "saved_bytes_per_second": 93.87e9,  # the step's memory traffic, which grows with what it saves
}


@dataclass
class TrainingStep:
    """What sets the memory of one autoencoder training step: the training config's ``training_step``."""

    autoencoder: torch.nn.Module
    discriminator: torch.nn.Module
    adversarial: bool
    auxiliary_losses: dict
    mixed_precision: str | None
    ema: bool
    in_channels: int = 1


class _OpCounter(TorchDispatchMode):
    """Counts the operators a step dispatches: on a GPU, each is at least one kernel launch."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


@dataclass
class Probe:
    """What one training step keeps and computes, per input voxel, and what it holds whatever the patch."""

    saved_per_voxel: float
    largest_per_voxel: float
    operators: int
    static_bytes: float
    spatial_multiple: tuple[int, ...]

    def peak_bytes(self, patch: Sequence[int], batch_size: int) -> float:
        """The estimated peak GPU memory of a training step (``torch.cuda.max_memory_allocated``)."""
        voxels = batch_size * math.prod(patch)
        c = CALIBRATION
        return (self.static_bytes + c["fixed"] + voxels
                * (c["saved"] * self.saved_per_voxel + c["largest"] * self.largest_per_voxel + c["per_voxel"]))

    def step_seconds(self, patch: Sequence[int], batch_size: int) -> float:
        """The estimated time of a training step on the calibration card."""
        c = CALIBRATION
        voxels = batch_size * math.prod(patch)
        return self.operators * c["seconds_per_operator"] + voxels * self.saved_per_voxel / c["saved_bytes_per_second"]


def training_step_from_config(config_files: str | Sequence[str] = TRAIN_CONFIG, overrides: dict | None = None) -> TrainingStep:
    """The ``training_step`` a training config declares, with ``overrides`` (no data is read)."""
    parser = ConfigParser()
    parser.read_config(config_files)
    parser.update({"bundle_root": str(BUNDLE_ROOT), **(overrides or {})})
    return parser.get_parsed_content("training_step")


def trainer_step(
    step: TrainingStep, patch: Sequence[int], batch_size: int, device: torch.device, compile: bool | str | None = None
) -> Callable[[], Any]:
    """One iteration of ``AutoencoderKLTrainer`` on random images, as the training config runs it
    (with ``compile`` as the config's key applies it)."""
    network = step.autoencoder.to(device)
    discriminator = step.discriminator.to(device)
    fused = device.type == "cuda"
    images = torch.rand(batch_size, step.in_channels, *patch, device=device)
    trainer = AutoencoderKLTrainer(
        device=device,
        max_epochs=1,
        train_data_loader=[{"image": images}],
        network=compiled(network, compile),
        optimizer=torch.optim.Adam(network.parameters(), lr=1e-4, fused=fused),
        discriminator=compiled(discriminator, compile),
        d_optimizer=torch.optim.Adam(discriminator.parameters(), lr=1e-4, fused=fused),
        adv_weight=0.01 if step.adversarial else 0.0,
        adv_warmup_epochs=0,
        auxiliary_losses=step.auxiliary_losses,
        # the CPU probe runs in float32 by design: no log line saying that bf16 is ignored there
        amp_dtype=autocast_dtype(step.mixed_precision, device) if device.type == "cuda" else None,
    )
    trainer.state.epoch, trainer.state.epoch_length, trainer.state.device = 1, 1, device
    graphs = uses_cuda_graphs(compile)

    def run() -> Any:
        trainer.state.iteration = 1
        if graphs:  # as CUDAGraphSteps marks each step in training
            torch.compiler.cudagraph_mark_step_begin()
        return trainer._iteration(trainer, {"image": images})

    return run


@contextmanager
def saved_activations(*modules: torch.nn.Module) -> Iterator[list[tuple[int, int]]]:
    """Count what autograd keeps for backward, per backward pass: the list receives, at each
    ``backward()``, the bytes of the distinct storages saved since the previous one and the largest
    of them. The parameters and buffers of ``modules`` are not counted: they are there whatever the patch."""
    phases: list[tuple[int, int]] = []
    seen: dict[int, int] = {}
    fixed = {t.untyped_storage().data_ptr() for m in modules for t in (*m.parameters(), *m.buffers())}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in fixed:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    original = torch.Tensor.backward

    def backward(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        phases.append((sum(seen.values()), max(seen.values(), default=0)))
        seen.clear()
        return original(self, *args, **kwargs)

    torch.Tensor.backward = backward  # type: ignore[method-assign]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield phases
    finally:
        torch.Tensor.backward = original  # type: ignore[method-assign]


def probe_patch(multiple: Sequence[int], minimum: int = 32) -> list[int]:
    """The smallest patch of at least ``minimum`` voxels per axis that the network can encode."""
    return [math.ceil(minimum / m) * m for m in multiple]


def probe(step: TrainingStep) -> Probe:
    """Run one training step of a copy of ``step``'s networks on the CPU at a small patch, counting
    what it saves for backward and the operators it dispatches. The global random state is left as it was."""
    step = copy.deepcopy(step)
    # gradient checkpointing recomputes in backward what the hook cannot see: the estimate without it
    # is an upper bound (measured 0.62x of it at 4x, 256x256x128)
    step.autoencoder.use_checkpoint = False
    # MONAI's own AutoencoderKL halves every axis at each level but the last
    stock = (2 ** (len(getattr(step.autoencoder.encoder, "channels", (0,))) - 1),) * 3
    multiple = tuple(getattr(step.autoencoder, "spatial_multiple", stock))
    patch = probe_patch(multiple)
    voxels = math.prod(patch)
    with torch.random.fork_rng(devices=[]):
        run = trainer_step(step, patch, 1, torch.device("cpu"))
        operators = _OpCounter()
        with saved_activations(step.autoencoder, step.discriminator) as phases, operators:
            run()
    saved, largest = max(phases)
    g_params = sum(p.numel() for p in step.autoencoder.parameters())
    d_params = sum(p.numel() for p in step.discriminator.parameters())
    amp = step.mixed_precision is not None
    # fp32 weights, gradients and two Adam moments (16 bytes); autocast's half-precision copies; the
    # moving average's copy; the critic holds its weights only, unless the adversarial loss trains it
    static = (16 + 2 * amp + 4 * step.ema) * g_params + (16 + 2 * amp if step.adversarial else 4) * d_params
    return Probe(saved / voxels, largest / voxels, operators.count, static, multiple)


def _fmt_patch(patch: Sequence[int]) -> str:
    return "x".join(map(str, patch))


def largest_batch(p: Probe, patch: Sequence[int], budget: float, limit: int = 256) -> int:
    """The largest batch of ``patch`` whose estimated peak stays within ``budget`` bytes (0: none)."""
    per_batch = p.peak_bytes(patch, 2) - p.peak_bytes(patch, 1)
    return max(0, min(limit, int((budget - p.peak_bytes(patch, 0)) // per_batch)))


def largest_patch(p: Probe, image_size: Sequence[int], budget: float, batch_size: int = 1) -> list[int] | None:
    """The largest patch, a multiple of the total factor per axis and within ``image_size``, whose
    batch of ``batch_size`` fits ``budget`` bytes: the image size, shrunk one multiple at a time along
    its currently longest axis."""
    patch = [max(m, s // m * m) for s, m in zip(image_size, p.spatial_multiple)]
    while p.peak_bytes(patch, batch_size) > budget:
        axis = max(range(len(patch)), key=lambda i: (patch[i] - p.spatial_multiple[i] > 0, patch[i]))
        if patch[axis] <= p.spatial_multiple[axis]:
            return None
        patch[axis] -= p.spatial_multiple[axis]
    return patch


def check_fits(
    step: TrainingStep, patch: Sequence[int], batch_size: int, device: torch.device | str, headroom: float = 0.95,
    cached_bytes: int = 0,
) -> float | None:
    """Refuse, before training, a patch and batch that the planner says will not fit this GPU, naming
    the largest batch that does (or the largest patch at batch 1). ``cached_bytes``, the training
    volumes kept on the GPU (``cache: gpu``), comes off what the step may use. Returns the estimate
    in bytes; on a CPU, or without mixed precision (not calibrated), there is nothing to check."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if step.mixed_precision is None:
        logger.info("memory planner: calibrated for mixed precision only, so float32 training is not checked")
        return None
    p = probe(step)
    estimate = p.peak_bytes(patch, batch_size)
    total = torch.cuda.get_device_properties(device).total_memory
    budget = headroom * total - cached_bytes
    cache = f" beside {cached_bytes / GIB:.2f} GiB of cached volumes (cache 'gpu')" if cached_bytes else ""
    if estimate > budget:
        if cached_bytes and estimate <= headroom * total:
            suggestion = "cache 'memory' keeps the volumes in host memory and leaves the GPU to the step"
        elif fits := largest_batch(p, patch, budget):
            suggestion = f"batch_size {fits} fits at this patch_size (with gradient_accumulation_steps for a larger batch)"
        elif smaller := largest_patch(p, patch, budget):
            suggestion = f"patch_size {smaller} fits at batch_size 1"
        else:
            suggestion = "no patch fits this network: use a larger factor (configs/examples/factors_8x.yaml) or fewer channels"
        raise ValueError(
            f"patch_size {list(patch)} with batch_size {batch_size} needs about {estimate / GIB:.2f} GiB by the memory "
            f"planner{cache}, more than {headroom:.0%} of this GPU's {total / GIB:.2f} GiB; {suggestion}. Every factor and layout: "
            f"python -m scripts.plan --gpu_memory {total / GIB:.2f} --image_size {' '.join(map(str, patch))}"
        )
    logger.info(f"memory planner: patch_size {list(patch)} with batch_size {batch_size} needs about {estimate / GIB:.2f} GiB "
                f"of this GPU's {total / GIB:.2f} GiB{cache}")
    return estimate


def plan(gpu_memory_gib: float, image_size: Sequence[int], batch_size: int, config_files: Sequence[str],
         overrides: dict, factors: Sequence[str], layouts: Sequence[str]) -> list[dict]:
    """For each factor set and layout: the largest patch within ``image_size`` at ``batch_size``, and
    the largest batch of the whole ``image_size``, that fit ``gpu_memory_gib``, with the estimates."""
    budget = gpu_memory_gib * GIB
    rows = []
    for name in factors:
        for layout in layouts:
            step = training_step_from_config([*config_files, *FACTOR_OVERLAYS[name]], {**overrides, "layout": layout})
            p = probe(step)
            patch = largest_patch(p, image_size, budget, batch_size)
            whole = [max(m, s // m * m) for s, m in zip(image_size, p.spatial_multiple)]
            t = step.autoencoder.total_factor
            total = f"{t[0]}x" if len(set(t)) == 1 else "x".join(map(str, t))
            rows.append({
                "factors": name, "total_factor": total, "layout": layout, "patch": patch, "batch_size": batch_size,
                "peak_gib": patch and p.peak_bytes(patch, batch_size) / GIB,
                "step_s": patch and p.step_seconds(patch, batch_size),
                "whole_image": whole, "whole_image_batch": largest_batch(p, whole, budget),
                "whole_image_peak_gib_batch1": p.peak_bytes(whole, 1) / GIB,
            })
    return rows


def print_plan(rows: list[dict], gpu_memory_gib: float, image_size: Sequence[int]) -> None:
    print(f"Training the autoencoder on {gpu_memory_gib:g} GiB, image {_fmt_patch(image_size)} "
          f"(estimates calibrated on an {CALIBRATION['card']}; step times are that card's):")
    print(f"{'factors':8} {'total':6} {'layout':15} {'largest patch':>14} {'batch':>5} {'GiB':>6} {'step s':>7}   "
          f"{'whole image: batch':>18} {'GiB at batch 1':>14}")
    for r in rows:
        patch = _fmt_patch(r["patch"]) if r["patch"] else "none fits"
        gib = f"{r['peak_gib']:.2f}" if r["patch"] else "-"
        secs = f"{r['step_s']:.3f}" if r["patch"] else "-"
        print(f"{r['factors']:8} {r['total_factor']:6} {r['layout']:15} {patch:>14} {r['batch_size']:>5} {gib:>6} {secs:>7}   "
              f"{r['whole_image_batch']:>18} {r['whole_image_peak_gib_batch1']:>14.2f}")


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu_memory", type=float, required=True, help="GiB of GPU memory to plan for")
    p.add_argument("--image_size", type=int, nargs=3, default=[256, 256, 128], help="the volumes' size in voxels (the largest patch)")
    p.add_argument("--batch_size", type=int, default=1, help="the batch the largest patch is planned for")
    p.add_argument("--config_file", type=json.loads, default=[TRAIN_CONFIG], help="JSON list: the training config and overlays")
    p.add_argument("--overrides", type=json.loads, default={}, help='JSON dict of config keys, e.g. {"channels": [64, 128, 128]}')
    p.add_argument("--factors", nargs="+", choices=sorted(FACTOR_OVERLAYS), default=None,
                   help="the bundle's factor overlays to plan over --config_file, or config (as given); default: "
                        "4x 8x 16x for the bundle's training config, config for yours")
    p.add_argument("--layouts", nargs="+", choices=["space_to_depth", "strided"], default=["space_to_depth", "strided"])
    p.add_argument("--output", type=Path, default=None, help="also write the rows as JSON here (an existing file is kept: NAME_1.json)")
    args = p.parse_args(argv)
    if args.gpu_memory <= 0 or args.batch_size < 1 or min(args.image_size) < 1:
        p.error("--gpu_memory must be positive, --batch_size and --image_size at least 1")
    if args.factors is None:
        args.factors = ["4x", "8x", "16x"] if args.config_file == [TRAIN_CONFIG] else ["config"]
    rows = plan(args.gpu_memory, args.image_size, args.batch_size, args.config_file, args.overrides, args.factors, args.layouts)
    print_plan(rows, args.gpu_memory, args.image_size)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with claimed(args.output) as target:
            write_atomic(target, json.dumps(rows, indent=1))
        print(f"written: {target}")
    return rows


if __name__ == "__main__":
    main()
