"""Whether the spread of intensities inside the head tells one-step samples from real volumes, which
the Fréchet distance of `scripts.evaluate_generation` does not (docs/generation.md, the measure): a
blurred average head has its tissues' intensities run together. For every volume, the quantiles 5 %
to 95 % of its body's voxels (`body_mask`), as the copy check compares them (`compared`: empty space
set to 0, smoothed by 1.5 voxels), each divided by the median; then the Fréchet distance between the
quantile rows of two sets of volumes: the samples of each EVAL and the training volumes of the
class, each against the held-out volumes and against the training volumes.

    PYTHONPATH=. python docs/study/body_intensity.py --diffusion_ckpt M --train_dir TRAIN --val_dir VAL \
        --condition T1 EVAL [EVAL ...]

Each EVAL holds samples/<condition>/*.nii.gz (as `configs/inference.yaml` writes them). Prints Markdown rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from scripts.checkpoints import load_checkpoint
from scripts.data import list_volumes
from scripts.evaluate_generation import RealVolumes, body_mask, by_class, compared, frechet_distance, read_sample
from scripts.networks import FactorAutoencoderKL

QUANTILES = torch.linspace(0.05, 0.95, 19)


def body_quantiles(volume: torch.Tensor) -> torch.Tensor:
    """The quantiles of the compared volume over its body, over their median (the 10th of 19)."""
    values = compared(volume)[body_mask(volume)]
    values = values[torch.randperm(len(values), generator=torch.Generator().manual_seed(0))[:300_000]]
    q = torch.quantile(values, QUANTILES)
    return q / q[9]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("eval_dirs", type=Path, nargs="+")
    p.add_argument("--diffusion_ckpt", required=True)
    p.add_argument("--train_dir", required=True)
    p.add_argument("--val_dir", required=True)
    p.add_argument("--condition", required=True)
    args = p.parse_args()
    ckpt = load_checkpoint(args.diffusion_ckpt, "diffusion_ckpt")
    prepare = RealVolumes(ckpt, FactorAutoencoderKL(**ckpt["autoencoder_args"]).total_factor, torch.device("cpu"))
    key, classes = ckpt.get("condition_key"), list(ckpt.get("classes") or [])
    train = torch.stack([body_quantiles(prepare(f)) for f in by_class(list_volumes(args.train_dir), key, classes)[args.condition]])
    held = torch.stack([body_quantiles(prepare(f)) for f in by_class(list_volumes(args.val_dir), key, classes)[args.condition]])
    print(f"| {args.condition} | volumes | against the held-out volumes | against the training volumes |")
    print("| --- | --- | --- | --- |")
    print(f"| training volumes | {len(train)} | {frechet_distance(train, held):.3f} | – |")
    for d in args.eval_dirs:
        rows = torch.stack([body_quantiles(read_sample(f)) for f in sorted((d / "samples" / args.condition).glob("*.nii.gz"))])
        print(f"| {d} | {len(rows)} | {frechet_distance(rows, held):.3f} | {frechet_distance(rows, train):.3f} |", flush=True)


if __name__ == "__main__":
    main()
