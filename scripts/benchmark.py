"""Memory and speed of the factor-aware autoencoder, measured the way the bundle trains and infers.

    python -m scripts.benchmark --output runs/benchmark.json          # on a CUDA GPU: the full run
    python -m scripts.benchmark --smoke                                # tiny, on CPU: that it runs

It measures, in one process: one full autoencoder training step as ``AutoencoderKLTrainer`` runs it
(generator forward, L1 + KL + adversarial, backward, optimizer step, discriminator step) for MONAI's
stock ``AutoencoderKL`` and the bundle's network for each factor set and layout; the diffusion UNet's
training step on the latents of each total factor; each eager and under ``torch.compile`` as the
training config's ``compile`` applies it (``--compile``: its values; none for eager only); the bundle's
own training step as its configs declare it, over patches and batches (``--training_configs``); and
reconstruction of one large volume through the inference config's tiled path (TiledInferer). Peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps (and the warm-up, where CUDA graphs take their
memory pool, for their compile modes); time is the median of CUDA-synchronised steps
after warm-up. Beside every eager training step it records the memory planner's estimate
(``scripts.plan``: ``planned_bytes``, ``planned_seconds``). It prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet, PatchDiscriminator
from monai.networks.schedulers import DDPMScheduler

from scripts import plan
from scripts.engines import autocast, compiled, uses_cuda_graphs
from scripts.networks import FactorAutoencoderKL, total_factor

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
# the reference network: channels (32, 64, 64), latent 3, one residual block per level, no attention
REFERENCE_NETWORK = dict(
    spatial_dims=3,
    in_channels=1,
    out_channels=1,
    channels=(32, 64, 64),
    latent_channels=3,
    num_res_blocks=1,
    attention_levels=(False, False, False),
    norm_num_groups=32,
    with_encoder_nonlocal_attn=False,
    with_decoder_nonlocal_attn=False,
)
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(step: Callable[[], Any], device: torch.device, warmup: int, steps: int, graphs: bool = False) -> dict:
    """Median seconds per step after warm-up, and peak allocated bytes over the timed steps; with
    ``graphs`` (a CUDA-graph compile mode) over the warm-up too, where the graphs are recorded and
    their memory pool is taken."""
    if device.type == "cuda" and graphs:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda" and not graphs:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"seconds": statistics.median(times), "peak_bytes": peak}


def _free(device: torch.device) -> None:
    """Return the last measurement's GPU memory, so that the next peak is its own, and forget its
    compiled graphs: the next network compiles afresh for its own shapes, not as a recompilation with
    dynamic shapes (which kept a CUDA-graph run compiling for minutes)."""
    torch._dynamo.reset()
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def reference_step(network: torch.nn.Module, discriminator_channels: int, amp: str) -> plan.TrainingStep:
    """The training step the benchmark's autoencoder rows measure: the bundle's trainer with the
    adversarial loss on (a 3-layer PatchDiscriminator with instance norm), perceptual loss off."""
    discriminator = PatchDiscriminator(
        spatial_dims=3, num_layers_d=3, channels=discriminator_channels, in_channels=1, out_channels=1, norm="INSTANCE"
    )
    return plan.TrainingStep(network, discriminator, adversarial=True, auxiliary_losses={},
                             mixed_precision=None if amp == "none" else amp, ema=False)


def diffusion_step(
    latent_shape: Sequence[int],
    batch_size: int,
    amp_dtype: torch.dtype | None,
    device: torch.device,
    args: dict,
    compile: bool | str | None = None,
) -> Callable[[], Any]:
    """One training step of the diffusion UNet on latents: noise, UNet, MSE, backward, Adam."""
    bare = DiffusionModelUNet(**args).to(device)
    optimizer = torch.optim.Adam(bare.parameters(), lr=1e-4, fused=device.type == "cuda")
    unet = compiled(bare, compile)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.randn(batch_size, *latent_shape, device=device)
    graphs = uses_cuda_graphs(compile)

    def step() -> Any:
        if graphs:  # as CUDAGraphSteps marks each step in training
            torch.compiler.cudagraph_mark_step_begin()
        optimizer.zero_grad(set_to_none=True)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch_size,), device=device)
        with autocast(device, amp_dtype):
            pred = unet(scheduler.add_noise(latents, noise, t), timesteps=t)
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        optimizer.step()
        return float(loss)

    return step


def reconstruction(size: Sequence[int], overrides: dict, device: torch.device) -> Callable[[], Any]:
    """Reconstruct one volume through configs/inference_autoencoder.yaml's inferer, with the network
    train_autoencoder.yaml defines (the one place its arguments live) under ``overrides``."""
    train = ConfigParser()
    train.read_config(str(BUNDLE_ROOT / "configs" / "train_autoencoder.yaml"))
    train.update({k: v for k, v in overrides.items() if k not in ("roi_size", "sw_margin")})
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference_autoencoder.yaml"))
    parser.update(
        {
            "bundle_root": str(BUNDLE_ROOT),
            "device": device,
            "autoencoder_args": train.get_parsed_content("autoencoder_args"),
            "roi_size": overrides["roi_size"],
            "sw_margin": overrides["sw_margin"],
        }
    )
    network, inferer = parser.get_parsed_content("network"), parser.get_parsed_content("inferer")
    amp_dtype = parser.get_parsed_content("amp_dtype")
    network.eval()
    volume = torch.rand(1, 1, *size, device=device)

    def step() -> Any:
        with torch.no_grad(), autocast(device, amp_dtype):
            return inferer(volume, network).float().mean().item()

    return step


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    amp_dtype = AMP[args.amp] if device.type == "cuda" else None
    size, batch = tuple(args.size), args.batch_size
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "monai": __import__("monai").__version__,
        "size": size,
        "batch_size": batch,
        "amp": args.amp if amp_dtype is not None else "none",
        "autoencoder": [],
        "diffusion": [],
        "training": [],
        "reconstruction": [],
    }

    def record(table: list, name: str, make: Callable[[], Callable[[], Any]], **extra: Any) -> dict:
        _free(device)
        try:
            row = {"name": name, **extra, **_measure(make(), device, args.warmup, args.steps, uses_cuda_graphs(extra.get("compile")))}
        except torch.OutOfMemoryError as e:
            row = {"name": name, **extra, "seconds": None, "peak_bytes": None, "error": f"out of memory: {e}"}
        table.append(row)
        print(json.dumps(row), flush=True)
        return row

    def planned(row: dict, step: plan.TrainingStep, patch: Sequence[int], batch_size: int) -> None:
        """The memory planner's estimate beside the measurement (eager steps: what it models)."""
        if row["compile"] is None and args.amp != "none":  # the planner is calibrated for mixed precision
            estimate = plan.probe(step)
            row["planned_bytes"] = estimate.peak_bytes(patch, batch_size)
            row["planned_seconds"] = estimate.step_seconds(patch, batch_size)
            row["planned_vs_measured"] = _ratio(row["planned_bytes"], row["peak_bytes"])

    network, d_channels = args.network, args.discriminator_channels

    def make_ae(factors: list | None, layout: str) -> torch.nn.Module:
        torch.manual_seed(0)
        return FactorAutoencoderKL(**network, downsample_factors=factors, layout=layout)

    ae = results["autoencoder"]
    modes: list[str | None] = [None, *args.compile]  # None: eager

    def label(name: str, mode: str | None) -> str:
        return name if mode is None else f"{name} compiled" + ("" if mode == "default" else f" ({mode})")

    for mode in modes if not args.no_stock else []:
        row = record(ae, label("stock 4x", mode) if mode else "stock 4x eager",
                     lambda: plan.trainer_step(reference_step(AutoencoderKL(**network), d_channels, args.amp), size, batch, device, mode),
                     compile=mode)
        planned(row, reference_step(AutoencoderKL(**network), d_channels, args.amp), size, batch)
    for mode in modes:
        for layout in args.layouts:
            for factors in args.factors:
                latent = [s // f for s, f in zip(size, total_factor(tuple((f,) * 3 for f in factors)))]
                row = record(
                    ae,
                    label(f"{layout} {factors}", mode),
                    lambda: plan.trainer_step(reference_step(make_ae(factors, layout), d_channels, args.amp), size, batch, device, mode),
                    layout=layout,
                    factors=factors,
                    latent_shape=[network["latent_channels"], *latent],
                    compile=mode,
                )
                planned(row, reference_step(make_ae(factors, layout), d_channels, args.amp), size, batch)
    stock = {r["name"]: r for r in ae if r["name"].startswith("stock")}
    for row in ae:
        own4x = next((r for r in ae if r.get("layout") == row.get("layout") and r.get("factors") == [2, 2] and r["compile"] == row["compile"]), None)
        eager = next((r for r in ae if r["compile"] is None and (r.get("layout"), r.get("factors")) == (row.get("layout"), row.get("factors"))), None)
        bases = (("stock_eager", stock.get("stock 4x eager")), ("stock_compiled", stock.get("stock 4x compiled")), ("own_4x", own4x), ("eager", eager))
        for base_name, base in bases:
            if base is not None:
                row[f"memory_vs_{base_name}"] = _ratio(row["peak_bytes"], base["peak_bytes"])
                row[f"time_vs_{base_name}"] = _ratio(row["seconds"], base["seconds"])

    diffusion_args = dict(
        spatial_dims=3,
        in_channels=network["latent_channels"],
        out_channels=network["latent_channels"],
        channels=tuple(args.diffusion_channels),
        attention_levels=(False, True, True)[: len(args.diffusion_channels)],
        num_res_blocks=1,
        num_head_channels=32,
        norm_num_groups=min(32, min(args.diffusion_channels)),
        use_flash_attention=True,
    )
    unets = results["diffusion"]
    for mode in modes:
        for total in args.diffusion_factors:
            latent = [network["latent_channels"], *(s // total for s in size)]
            record(unets, label(f"UNet on {total}x latents", mode),
                   lambda: diffusion_step(latent, batch, amp_dtype, device, diffusion_args, mode), total_factor=total, latent_shape=latent, compile=mode)
    for row in unets:
        base = next(r for r in unets if r["compile"] == row["compile"])  # the first factor's, in the same mode
        eager = next(r for r in unets if r["compile"] is None and r["total_factor"] == row["total_factor"])
        row["memory_vs_4x"], row["time_vs_4x"] = _ratio(row["peak_bytes"], base["peak_bytes"]), _ratio(row["seconds"], base["seconds"])
        row["time_vs_eager"] = _ratio(row["seconds"], eager["seconds"])

    for configs, overrides in args.training_configs:
        for patch, batch_size, mode in itertools.product(args.training_patches, args.training_batches, modes):
            def make() -> Callable[[], Any]:
                torch.manual_seed(0)
                return plan.trainer_step(plan.training_step_from_config(configs, overrides), patch, batch_size, device, mode)

            row = record(results["training"], label(f"{' + '.join(Path(c).stem for c in configs)} {json.dumps(overrides)}", mode),
                         make, configs=configs, overrides=overrides, patch=patch, batch_size=batch_size, compile=mode)
            planned(row, plan.training_step_from_config(configs, overrides), patch, batch_size)

    for layout, factors in args.reconstruction:
        overrides = {"layout": layout, "downsample_factors": factors, "roi_size": list(args.roi_size), "sw_margin": args.sw_margin, **args.recon_network}
        record(results["reconstruction"], f"{layout} {factors} {'x'.join(map(str, args.recon_size))}", lambda: reconstruction(args.recon_size, overrides, device), roi_size=list(args.roi_size), sw_margin=args.sw_margin)
    return results


def print_table(results: dict) -> None:
    gib = 2**30

    def fmt(v: Any, scale: float = 1.0, digits: int = 3) -> str:
        return "-" if v is None else f"{v / scale:.{digits}f}"

    print(f"\n{results['device']}, torch {results['torch']}, MONAI {results['monai']}, "
          f"{'x'.join(map(str, results['size']))}, batch {results['batch_size']}, amp {results['amp']}")
    # against MONAI's stock network (eager, compiled), the same network's 4x in the same mode, the same network eager
    print(f"{'autoencoder step':36} {'latent':>14} {'GiB':>7} {'s':>7} {'mem/stock':>9} {'t/stock':>8} {'mem/stcomp':>10} {'t/stcomp':>8} {'mem/4x':>7} {'t/4x':>6} {'t/eager':>7}")
    for r in results["autoencoder"]:
        latent = "x".join(map(str, r.get("latent_shape", [3, *(s // 4 for s in results["size"])])))
        print(f"{r['name']:36} {latent:>14} {fmt(r['peak_bytes'], gib, 2):>7} {fmt(r['seconds']):>7} "
              f"{fmt(r.get('memory_vs_stock_eager'), 1, 2):>9} {fmt(r.get('time_vs_stock_eager'), 1, 2):>8} "
              f"{fmt(r.get('memory_vs_stock_compiled'), 1, 2):>10} {fmt(r.get('time_vs_stock_compiled'), 1, 2):>8} "
              f"{fmt(r.get('memory_vs_own_4x'), 1, 2):>7} {fmt(r.get('time_vs_own_4x'), 1, 2):>6} {fmt(r.get('time_vs_eager'), 1, 2):>7}")
    for r in results["diffusion"]:
        print(f"{r['name']:36} {'x'.join(map(str, r['latent_shape'])):>14} {fmt(r['peak_bytes'], gib, 2):>7} {fmt(r['seconds']):>7} "
              f"mem/4x {fmt(r['memory_vs_4x'], 1, 2)} t/4x {fmt(r['time_vs_4x'], 1, 2)} t/eager {fmt(r['time_vs_eager'], 1, 2)}")
    for r in results["training"]:
        print(f"training {r['name']:40} {'x'.join(map(str, r['patch']))} x{r['batch_size']} {fmt(r['peak_bytes'], gib, 2):>7} GiB "
              f"(planned {fmt(r.get('planned_bytes'), gib, 2)}) {fmt(r['seconds'])} s (planned {fmt(r.get('planned_seconds'))})")
    for r in results["reconstruction"]:
        print(f"reconstruction {r['name']:30} {fmt(r['peak_bytes'], gib, 2):>7} GiB {fmt(r['seconds'], 1, 2)} s")


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, nargs=3, default=[256, 256, 64], help="training input size")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--amp", choices=sorted(AMP), default="bf16")
    p.add_argument("--factors", type=json.loads, default=[[2, 2], [4, 2], [8, 2], [4, 4]], help="JSON list of factor lists")
    p.add_argument("--layouts", nargs="+", default=["strided", "space_to_depth"])
    p.add_argument("--no_stock", action="store_true", help="skip MONAI's stock AutoencoderKL baselines")
    p.add_argument("--compile", nargs="*", default=["default"],
                   help="also measure each network under the training config's compile with these values (Inductor modes or backends); none: eager only")
    p.add_argument("--diffusion_factors", type=int, nargs="*", default=[4, 8, 16])
    p.add_argument("--diffusion_channels", type=int, nargs="+", default=[64, 128, 128])
    p.add_argument("--reconstruction", type=json.loads, default=[["space_to_depth", [2, 2]], ["space_to_depth", [4, 2]], ["strided", [2, 2]]],
                   help="JSON list of [layout, factors] to reconstruct a volume with")
    p.add_argument("--training_configs", type=json.loads, default=[],
                   help='JSON list of [config files, overrides]: the bundle\'s own training step, e.g. [[["configs/train_autoencoder.yaml"], {"layout": "strided"}]]')
    p.add_argument("--training_patches", type=json.loads, default=[[128, 128, 64]], help="JSON list of patches for --training_configs")
    p.add_argument("--training_batches", type=int, nargs="+", default=[1, 2], help="batch sizes for --training_configs")
    p.add_argument("--recon_size", type=int, nargs=3, default=[512, 512, 512])
    p.add_argument("--roi_size", type=int, nargs=3, default=[256, 256, 128])
    p.add_argument("--sw_margin", type=int, default=32, help="voxels of context around each window's kept centre")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny networks and sizes, one step each, fewer factors unless given: checks that it runs (CPU)")
    args = p.parse_args(argv)
    # the networks: the reference autoencoder and discriminator, and the training config's own network for reconstruction
    args.network, args.discriminator_channels, args.recon_network = dict(REFERENCE_NETWORK), 32, {}
    if args.smoke:  # every network tiny too: the smoke run checks the code paths in seconds, not sizes
        args.size, args.recon_size, args.roi_size, args.sw_margin = [32, 32, 32], [32, 32, 24], [16, 16, 16], 4
        args.warmup, args.steps = 0, 1
        args.compile = [m for m in args.compile if m != "default"]  # Inductor compiles for minutes on a CPU
        args.diffusion_channels = [32, 32]
        for key, tiny in (("factors", [[2, 2], [4, 2]]), ("diffusion_factors", [4, 8]), ("reconstruction", [["space_to_depth", [2, 2]]])):
            if getattr(args, key) == p.get_default(key):  # the sets of networks, unless given
                setattr(args, key, tiny)
        args.network.update(channels=(8, 16, 16), norm_num_groups=8)
        args.discriminator_channels = 8
        args.recon_network = {"channels": [8, 16, 16], "norm_num_groups": 8, "latent_channels": 16}
    results = run(args)
    print_table(results)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
