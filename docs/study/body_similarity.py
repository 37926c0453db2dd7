"""Whether samples come nearer the training volumes or only have cleaner empty space
(docs/generation.md, the posterior's noise): each sample's SSIM to its nearest training volume, as
`scripts.evaluate_generation` computed it before version 0.14.0 and with the empty space of both
volumes set to 0 (`body`, as it computed it in versions 0.14.0 to 0.15.3), beside the same for the training volumes of the class
against their nearest other training volume and, with --val_dir, for the held-out volumes; and the mean
MS-SSIM between two samples (their diversity). With --views N, also each sample's SSIM (empty space set
to 0) to the nearest of the views that generation stage 25's models learned (`latent_augmentations: N`,
at commit 6ee33c2): each training volume of the class and N randomly rotated and scaled copies of it,
made as that training made them (MONAI's RandAffine seeded with --seed, over every training volume in
datalist order), each with its mirror image. A sample that copies a rotated view is far from every unrotated volume, and near that view.
With --smooth S, every volume (sample, training, held-out) is smoothed by a Gaussian of S voxels after its empty
space is set to 0, and so is each sample for the MS-SSIM: a noisy copy of a training volume, whose speckle pulls
its SSIM down, comes out as near as a clean one (generation stage 26's smaller UNets). With --smooth 1.5
the nearest-training SSIM is the measure's own since version 0.16.0 (`compared`); its MS-SSIM still smooths the
samples without setting their empty space to 0, as the figures of stage 26 were taken.

    PYTHONPATH=. python docs/study/body_similarity.py --diffusion_ckpt M --train_dir TRAIN [--val_dir HELD_OUT] \
        --condition T1 [--num_samples 8] [--views 7 --rotate 0.15 --scale 0.1 --seed 0] [--smooth 1.5] EVAL [EVAL ...]

Each EVAL holds samples/<class>/*.nii.gz (the first --num_samples of them, in name order). Prints one
Markdown row per EVAL, after the references.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from monai.metrics import SSIMMetric
from monai.transforms import GaussianSmooth, RandAffine

from scripts.checkpoints import load_checkpoint
from scripts.data import list_volumes
from scripts.evaluate_generation import RealVolumes, body, by_class, ms_ssim_metric, nearest, pairwise, read_sample
from scripts.networks import FactorAutoencoderKL


def training_views(volumes: dict, condition: list, count: int, rotate: float, scale: float, seed: int, look=body) -> list:
    """The views of the class's training volumes that training with ``latent_augmentations: count``
    encoded: the random transform runs over every training volume in datalist order, as training
    called it, so that each volume of the class gets the same draws as it did there."""
    augment = RandAffine(prob=1.0, rotate_range=[rotate] * 3, scale_range=[scale] * 3, padding_mode="zeros")
    augment.set_random_state(seed)
    views = []
    for path, volume in volumes.items():
        made = [volume] + [augment(volume).as_tensor() for _ in range(count)]
        if path in condition:
            views += [look(v) for m in made for v in (m, m.flip(1))]
    return views


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("eval_dirs", type=Path, nargs="+")
    p.add_argument("--diffusion_ckpt", required=True)
    p.add_argument("--train_dir", required=True)
    p.add_argument("--val_dir", default=None)
    p.add_argument("--condition", required=True)
    p.add_argument("--num_samples", type=int, default=None)
    p.add_argument("--views", type=int, default=0)
    p.add_argument("--rotate", type=float, default=0.15)
    p.add_argument("--scale", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smooth", type=float, default=0.0, help="Gaussian sigma in voxels applied to every body (0: none)")
    args = p.parse_args()
    smooth = GaussianSmooth(args.smooth)

    def blur(volume: torch.Tensor) -> torch.Tensor:
        return smooth(volume).as_tensor() if args.smooth else volume

    def look(volume: torch.Tensor) -> torch.Tensor:
        return blur(body(volume))

    ckpt = load_checkpoint(args.diffusion_ckpt, "diffusion_ckpt")
    prepare = RealVolumes(ckpt, FactorAutoencoderKL(**ckpt["autoencoder_args"]).total_factor, torch.device("cpu"))
    groups = by_class(list_volumes(args.train_dir), ckpt.get("condition_key"), list(ckpt.get("classes") or []))
    train = {path: prepare(path) for path in groups["all"]}
    ssim = SSIMMetric(spatial_dims=3, data_range=1.0)
    bodies = {path: look(v) for path, v in train.items()}
    reference = [nearest([bodies[a]], [bodies[b] for b in train if b != a], ssim)[0] for a in groups[args.condition]]
    extra = " nearest training view, empty space set to 0, median / max |" if args.views else ""
    if args.smooth:
        print(f"(bodies and the samples' MS-SSIM smoothed by a Gaussian of {args.smooth} voxels)")
    print(f"| {args.condition} | volumes | nearest-training SSIM, median / max | the same, empty space set to 0 | MS-SSIM between two |{extra}")
    print("| --- | --- | --- | --- | --- |" + (" --- |" if extra else ""))
    print(f"| training volumes, against the nearest other | {len(reference)} | – | {np.median(reference):.3f} / {max(reference):.3f} | – |")
    if args.val_dir:
        val = by_class(list_volumes(args.val_dir), ckpt.get("condition_key"), list(ckpt.get("classes") or []))[args.condition]
        held = nearest([look(prepare(path)) for path in val], list(bodies.values()), ssim)
        print(f"| held-out volumes | {len(held)} | – | {np.median(held):.3f} / {max(held):.3f} | – |")
    views = training_views(train, groups[args.condition], args.views, args.rotate, args.scale, args.seed, look) if args.views else []
    if views:
        print(f"(and {len(views)} views of the training volumes of the class, with their mirror images: the last column)")
    ms_ssim = ms_ssim_metric(ckpt["image_size"])
    for d in args.eval_dirs:
        files = sorted((d / "samples" / args.condition).glob("*.nii.gz"))[: args.num_samples]
        samples = [read_sample(f) for f in files]
        raw = nearest(samples, list(train.values()), ssim)
        sample_bodies = [look(s) for s in samples]
        cleaned = nearest(sample_bodies, list(bodies.values()), ssim)
        diversity = np.mean(pairwise([blur(s) for s in samples], ms_ssim))
        row = f"| {d} | {len(samples)} | {np.median(raw):.3f} / {max(raw):.3f} | {np.median(cleaned):.3f} / {max(cleaned):.3f} | {diversity:.3f} |"
        if views:
            seen = nearest(sample_bodies, views, ssim)
            row += f" {np.median(seen):.3f} / {max(seen):.3f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
