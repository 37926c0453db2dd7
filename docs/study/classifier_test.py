"""Whether a small network can tell the diffusion model's samples from real volumes (a classifier
two-sample test; docs/generation.md, the measure): the real volumes of one class, encoded and
decoded by the model's autoencoder so that both sides carry the decoder's own texture, against the
samples, each volume average-pooled 2x. A 3D CNN is trained on all but one fold of each side and
scores the fold left out; the area under the ROC curve of the pooled out-of-fold scores is the
result: 0.5 when the network cannot tell them apart, 1.0 when it always can.

    PYTHONPATH=. python docs/study/classifier_test.py --diffusion_ckpt M --autoencoder_ckpt A \
        --train_dir TRAIN --val_dir VAL --condition T1 EVAL [EVAL ...]

Each EVAL holds samples/<class>/*.nii.gz (the first 32 are used). Prints one Markdown row per EVAL.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from scripts.checkpoints import load_checkpoint, load_network
from scripts.data import list_volumes
from scripts.evaluate_generation import RealVolumes, by_class, read_sample, through_autoencoder
from scripts.networks import FactorAutoencoderKL

SAMPLES = 32


def classifier() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv3d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(4, cout), nn.SiLU()]

    return nn.Sequential(*block(1, 8), *block(8, 16), *block(16, 32), *block(32, 32), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(32, 1))


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random left-right mirror and a shift of up to 4 voxels per axis, per volume."""
    out = []
    for v in batch:
        if torch.rand(1, generator=generator) < 0.5:
            v = v.flip(1)
        shifts = torch.randint(-4, 5, (3,), generator=generator).tolist()
        out.append(v.roll(shifts, dims=(1, 2, 3)))
    return torch.stack(out)


def auc(real: np.ndarray, fake: np.ndarray) -> float:
    """Probability that a sample scores above a real volume (ties count half)."""
    diff = fake[:, None] - real[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def out_of_fold_scores(real: torch.Tensor, fake: torch.Tensor, folds: int, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    device = real.device
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    real_fold = torch.randperm(len(real), generator=generator) % folds
    fake_fold = torch.randperm(len(fake), generator=generator) % folds
    real_scores, fake_scores = np.zeros(len(real)), np.zeros(len(fake))
    for k in range(folds):
        r, f = real[(real_fold != k).to(device)], fake[(fake_fold != k).to(device)]
        net = classifier().to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
        for _ in range(steps):
            ri = torch.randint(len(r), (4,), generator=generator)
            fi = torch.randint(len(f), (4,), generator=generator)
            x = augment(torch.cat([r[ri], f[fi]]), generator)
            y = torch.cat([torch.zeros(4), torch.ones(4)]).to(device)
            loss = F.binary_cross_entropy_with_logits(net(x)[:, 0], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            real_scores[(real_fold == k).numpy()] = net(real[(real_fold == k).to(device)])[:, 0].cpu().numpy()
            fake_scores[(fake_fold == k).numpy()] = net(fake[(fake_fold == k).to(device)])[:, 0].cpu().numpy()
    return real_scores, fake_scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("eval_dirs", type=Path, nargs="+")
    p.add_argument("--diffusion_ckpt", required=True)
    p.add_argument("--autoencoder_ckpt", required=True)
    p.add_argument("--train_dir", required=True)
    p.add_argument("--val_dir", required=True)
    p.add_argument("--condition", required=True)
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(min(4, torch.get_num_threads()))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = load_checkpoint(args.diffusion_ckpt, "diffusion_ckpt")
    autoencoder = FactorAutoencoderKL(**ckpt["autoencoder_args"]).eval()
    load_network(autoencoder, args.autoencoder_ckpt, "autoencoder", ckpt["autoencoder_args"], "autoencoder_ckpt")
    prepare = RealVolumes(ckpt, autoencoder.total_factor, torch.device("cpu"))
    key, classes = ckpt.get("condition_key"), list(ckpt.get("classes") or [])
    paths = [*by_class(list_volumes(args.train_dir), key, classes)[args.condition], *by_class(list_volumes(args.val_dir), key, classes)[args.condition]]
    real = torch.stack([F.avg_pool3d(through_autoencoder(autoencoder, prepare(p)), 2) for p in paths]).to(device)
    print(f"{len(real)} real volumes of {args.condition} through the autoencoder; {args.folds} folds, {args.steps} steps each")
    print("| samples | AUC | mean score, real / samples | seconds |")
    print("| --- | --- | --- | --- |")
    for d in args.eval_dirs:
        files = sorted((d / "samples" / args.condition).glob("*.nii.gz"))[:SAMPLES]
        fake = torch.stack([F.avg_pool3d(read_sample(f), 2) for f in files]).to(device)
        start = time.perf_counter()
        rs, fs = out_of_fold_scores(real, fake, args.folds, args.steps, args.seed)
        print(f"| {d} ({len(fake)}) | {auc(rs, fs):.3f} | {rs.mean():.2f} / {fs.mean():.2f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
