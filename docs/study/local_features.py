"""Whether the feature encoder of `scripts.evaluate_generation` tells samples without anatomy from
real volumes when its features are not pooled (docs/generation.md, the measure): the Fréchet
distance over feature vectors at single positions (4,096 drawn per volume, seed 0) of two layers,
the input of the first downsampling (shallow) and of the last normalisation (deep, the layer the
measure pools over regions), samples against the held-out volumes of one class.

    PYTHONPATH=. python docs/study/local_features.py --diffusion_ckpt M --train_dir TRAIN --val_dir VAL --condition T1 EVAL [EVAL ...]

Each EVAL holds samples/<class>/*.nii.gz; the first 16 are scored. Prints one Markdown row per EVAL,
after the training volumes against the held-out ones (real against real).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from scripts.checkpoints import load_checkpoint, load_network
from scripts.data import list_volumes
from scripts.evaluate_generation import RealVolumes, by_class, frechet_distance, read_sample
from scripts.networks import FactorAutoencoderKL

POSITIONS = 4096


class LocalFeatures:
    """Feature vectors of ``POSITIONS`` random positions of a volume, at two depths of the encoder."""

    def __init__(self, checkpoint: str) -> None:
        ckpt = load_checkpoint(checkpoint, "feature_ckpt")
        self.network = FactorAutoencoderKL(**ckpt["autoencoder_args"]).eval()
        load_network(self.network, checkpoint, "autoencoder", ckpt["autoencoder_args"], "feature_ckpt")
        downsample = next(i for i, b in enumerate(self.network.encoder.blocks) if type(b).__name__ == "FactorDownsample")
        self.hidden: dict[str, torch.Tensor] = {}
        for name, index in (("shallow", downsample), ("deep", len(self.network.encoder.blocks) - 2)):
            self.network.encoder.blocks[index].register_forward_pre_hook(lambda m, a, name=name: self.hidden.__setitem__(name, a[0]))
        self.generator = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def __call__(self, volume: torch.Tensor) -> dict[str, torch.Tensor]:
        self.network.encode(volume[None])
        rows = {}
        for name, h in self.hidden.items():
            h = h[0].flatten(1).T  # (positions, channels)
            rows[name] = h[torch.randperm(h.shape[0], generator=self.generator)[:POSITIONS]].float()
        return rows


def stacked(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.cat([r[name] for r in rows]) for name in rows[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("eval_dirs", type=Path, nargs="+")
    p.add_argument("--diffusion_ckpt", required=True)
    p.add_argument("--train_dir", required=True)
    p.add_argument("--val_dir", required=True)
    p.add_argument("--condition", required=True)
    p.add_argument("--feature_ckpt", default="models/model_features.pt")
    args = p.parse_args()
    ckpt = load_checkpoint(args.diffusion_ckpt, "diffusion_ckpt")
    classes, key = list(ckpt.get("classes") or []), ckpt.get("condition_key")
    real = RealVolumes(ckpt, FactorAutoencoderKL(**ckpt["autoencoder_args"]).total_factor, torch.device("cpu"))
    features = LocalFeatures(args.feature_ckpt)
    held_out = stacked([features(real(v)) for v in by_class(list_volumes(args.val_dir), key, classes)[args.condition]])
    training = stacked([features(real(v)) for v in by_class(list_volumes(args.train_dir), key, classes)[args.condition]])
    print(f"| {args.condition} | shallow | deep |\n| --- | --- | --- |")
    print(f"| real against real | {frechet_distance(training['shallow'], held_out['shallow']):.2f} | {frechet_distance(training['deep'], held_out['deep']):.2f} |")
    for eval_dir in args.eval_dirs:
        paths = sorted((eval_dir / "samples" / args.condition).glob("*.nii.gz"))[:16]
        samples = stacked([features(read_sample(s)) for s in paths])
        print(f"| {eval_dir} | {frechet_distance(samples['shallow'], held_out['shallow']):.2f} | {frechet_distance(samples['deep'], held_out['deep']):.2f} |")


if __name__ == "__main__":
    main()
