"""Where the speckle in the empty space of the samples comes from (docs/generation.md, the measure):
the empty-space intensity of `scripts.evaluate_generation` (the mean of the eight corner cubes) of
the training volumes of one class as prepared, decoded from their posterior means (z_mu), and
decoded from one draw of their posteriors (z_mu + z_sigma * noise, what diffusion training with
`sample_posterior` true learns), beside that of samples already written.

    PYTHONPATH=. python docs/study/empty_space.py --diffusion_ckpt M --autoencoder_ckpt A --train_dir TRAIN \
        --condition T1 [EVAL ...]

Each EVAL holds samples/<class>/*.nii.gz. Prints one Markdown row per source.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from scripts.checkpoints import load_checkpoint, load_network
from scripts.data import list_volumes
from scripts.evaluate_generation import RealVolumes, by_class, empty_space, read_sample
from scripts.networks import FactorAutoencoderKL


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("eval_dirs", type=Path, nargs="*")
    p.add_argument("--diffusion_ckpt", required=True)
    p.add_argument("--autoencoder_ckpt", required=True)
    p.add_argument("--train_dir", required=True)
    p.add_argument("--condition", required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    ckpt = load_checkpoint(args.diffusion_ckpt, "diffusion_ckpt")
    autoencoder = FactorAutoencoderKL(**ckpt["autoencoder_args"]).eval()
    load_network(autoencoder, args.autoencoder_ckpt, "autoencoder", ckpt["autoencoder_args"], "autoencoder_ckpt")
    prepare = RealVolumes(ckpt, autoencoder.total_factor, torch.device("cpu"))
    paths = by_class(list_volumes(args.train_dir), ckpt.get("condition_key"), list(ckpt.get("classes") or []))[args.condition]
    rows: dict[str, list[float]] = {"training volumes": [], "decoded z_mu": [], "decoded z_mu + z_sigma * noise": []}
    with torch.no_grad():
        for path in paths:
            volume = prepare(path)
            z_mu, z_sigma = autoencoder.encode(volume[None])
            rows["training volumes"].append(empty_space(volume))
            rows["decoded z_mu"].append(empty_space(autoencoder.decode(z_mu)[0].clamp(0, 1)))
            rows["decoded z_mu + z_sigma * noise"].append(empty_space(autoencoder.decode(z_mu + z_sigma * torch.randn_like(z_sigma))[0].clamp(0, 1)))
    for d in args.eval_dirs:
        files = sorted((d / "samples" / args.condition).glob("*.nii.gz"))
        rows[f"samples in {d}"] = [empty_space(read_sample(f)) for f in files]
    print(f"| {args.condition} | volumes | empty space, mean | min | max |")
    print("| --- | --- | --- | --- | --- |")
    for name, values in rows.items():
        print(f"| {name} | {len(values)} | {np.mean(values):.4f} | {min(values):.4f} | {max(values):.4f} |")


if __name__ == "__main__":
    main()
