"""Whether a network that has never seen a sample can tell a head from a blurred average of heads
(docs/generation.md, the measure). A one-step sample is the model's first estimate of a head from
pure noise, close to an average of training heads, and scores like real volumes on the Fréchet
distance. Here a small 3D CNN learns real heads (label 1) against mixtures of two to four heads,
each moved on its own, and blurs of them (label 0). Both sides get the samples' kinds of noise
(voxel speckle and blocks of a latent cell), so the noise tells it nothing. In three folds by
volume, each real head is scored by the judge that did not train on it, each sample by all three.

First, on a machine with the bundle (MONAI), the volumes at 64^3 (2x average-pooled), as uint8:

    PYTHONPATH=. python docs/study/realism_judge.py prepare VOLUMES.pt --diffusion_ckpt models/model.pt \
        --train_dir TRAIN --val_dir VAL --autoencoders models/model_autoencoder.pt models/model_autoencoder_16x.pt \
        --samples S4x_1 S4x_50 ...

Then on a GPU host with torch alone (this part imports nothing of the bundle):

    python docs/study/realism_judge.py judge VOLUMES.pt OUT.json --fakes mixblur --steps 2500 --seed 0 [--affine] [--crop 32]

Prints each real head's out-of-fold score (the probability of "real") and the scores of every set.
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

SIZE = 64  # voxels per axis after the 2x pooling of a 128^3 volume
FOLDS = 3
BATCH = 16


def norm(v: torch.Tensor) -> torch.Tensor:
    """Each volume over its 99.5th percentile, so that a mixture's lower contrast tells nothing."""
    q = torch.quantile(v.flatten(1).float(), 0.995, dim=1).clamp(min=0.05)
    return (v / q.view(-1, *[1] * (v.dim() - 1))).clamp(0, 1.2)


def gauss(v: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(3 * sigma + 1)
    x = torch.arange(-r, r + 1, device=v.device, dtype=v.dtype)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    out = v[None]
    for d in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + d] = -1
        pad = [0] * 6
        pad[2 * (2 - d)] = pad[2 * (2 - d) + 1] = r
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k.view(shape))
    return out[0]


def u(a: float, b: float) -> float:
    return float(torch.empty(1).uniform_(a, b))


def ri(a: int, b: int) -> int:
    return int(torch.randint(a, b, (1,)))


def jitter(v: torch.Tensor, affine: bool) -> torch.Tensor:
    """A left-right flip, a move (a shift; with ``affine`` a rotation up to 0.15 rad per axis, a
    scale of 0.9 to 1.1 and a shift) and a gamma of 0.7 to 1.4."""
    if ri(0, 2):
        v = v.flip(1)
    if affine:
        a = torch.empty(3).uniform_(-0.15, 0.15)
        c, si = torch.cos(a), torch.sin(a)
        rx = torch.tensor([[1, 0, 0], [0, c[0], -si[0]], [0, si[0], c[0]]])
        ry = torch.tensor([[c[1], 0, si[1]], [0, 1, 0], [-si[1], 0, c[1]]])
        rz = torch.tensor([[c[2], -si[2], 0], [si[2], c[2], 0], [0, 0, 1]])
        m = (rx @ ry @ rz) * u(0.9, 1.1)
        theta = torch.cat([m, torch.empty(3, 1).uniform_(-0.08, 0.08)], 1)[None].to(v.device)
        grid = F.affine_grid(theta, (1, 1) + v.shape[1:], align_corners=False)
        v = F.grid_sample(v[None], grid, align_corners=False)[0]
    else:
        v = torch.roll(v, [ri(-3, 4) for _ in range(3)], dims=(1, 2, 3))
    return v.clamp(0, 1) ** u(0.7, 1.4)


def noise(v: torch.Tensor) -> torch.Tensor:
    """What samples carry: voxel speckle, and half the time blocks of 2, 4 or 8 voxels."""
    v = v + u(0, 0.08) * torch.randn_like(v).abs()
    if ri(0, 2):
        cell = [2, 4, 8][ri(0, 3)]
        n = torch.randn((1, 1) + (SIZE // cell,) * 3, device=v.device)
        v = v + u(0, 0.05) * F.interpolate(n, scale_factor=cell, mode="nearest")[0]
    return v.clamp(0, 1)


def example(vols: torch.Tensor, real: bool, fakes: str, affine: bool, crop: int) -> torch.Tensor:
    """One training volume: a real head, or (``fakes`` mix, blur or mixblur: either or both) a
    mixture of 2 to 4 heads with Dirichlet weights and a blur of sigma 1 to 2 voxels (2 to 4 at 128^3)."""
    if real:
        v = jitter(vols[ri(0, len(vols))], affine)
    else:
        kind = ri(0, 3) if fakes == "mixblur" else (0 if fakes == "mix" else 1)  # 0 mixture, 1 blur, 2 both
        if kind in (0, 2):
            k = ri(2, 5)
            idx = torch.randperm(len(vols))[:k]
            w = torch.distributions.Dirichlet(torch.ones(k)).sample()
            v = sum(float(wi) * jitter(vols[int(i)], affine) for wi, i in zip(w, idx))
        else:
            v = jitter(vols[ri(0, len(vols))], affine)
        if kind in (1, 2):
            v = gauss(v, u(1.0, 2.0))
    v = norm(noise(v)[None])[0]
    if crop:
        o = [ri(0, SIZE - crop + 1) for _ in range(3)]
        v = v[:, o[0] : o[0] + crop, o[1] : o[1] + crop, o[2] : o[2] + crop]
    return v


class Judge(nn.Module):
    """Four levels of two convolutions (the second strided), pooled over the volume: it scores a
    whole volume or, trained on crops, the mean over every position."""

    def __init__(self) -> None:
        super().__init__()
        ch = [1, 16, 32, 64, 64]
        layers: list[nn.Module] = []
        for a, b in zip(ch[:-1], ch[1:]):
            layers += [nn.Conv3d(a, b, 3, padding=1), nn.GroupNorm(8, b), nn.SiLU(), nn.Conv3d(b, b, 3, stride=2, padding=1), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3, 4)))[:, 0]


def train(vols: torch.Tensor, steps: int, seed: int, args: argparse.Namespace, device: torch.device) -> Judge:
    torch.manual_seed(seed)
    net = Judge().to(device)
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps)
    t = time.time()
    for i in range(steps):
        y = (torch.arange(BATCH) % 2).float()
        x = torch.stack([example(vols, bool(yi), args.fakes, args.affine, args.crop) for yi in y])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = net(x).float()
        loss = F.binary_cross_entropy_with_logits(logits, y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if i % 250 == 0 or i == steps - 1:
            print(f"step {i} loss {loss.item():.3f} {time.time() - t:.0f}s", flush=True)
    return net.eval()


@torch.no_grad()
def score(net: Judge, vols: torch.Tensor, device: torch.device) -> list[float]:
    x = vols.float().to(device) / (255 if vols.dtype == torch.uint8 else 1)
    return torch.sigmoid(net(norm(x))).float().cpu().tolist()


def judge(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = torch.load(args.volumes)
    vols = data["real"].float().to(device) / 255
    names, n = data["names"], len(data["real"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed)).tolist()
    real_scores, nets = {}, []
    for f in range(FOLDS):
        held = [i for j, i in enumerate(order) if j % FOLDS == f]
        net = train(vols[[i for i in range(n) if i not in held]], args.steps, 10 * args.seed + f, args, device)
        nets.append((net, held))
        for i, s in zip(held, score(net, vols[held], device)):
            real_scores[names[i]] = s
    options = [o for o, on in (("affine", args.affine), ("crop", args.crop)) if on]
    results = {"options": options, "seed": args.seed, "variant": args.fakes, "steps": args.steps, "real (cross-validated)": real_scores}
    print(args.fakes, options, "real (cross-validated) mean", f"{np.mean(list(real_scores.values())):.3f}")
    for name, vs in data["sets"].items():
        if name.startswith("real through"):  # each reconstruction scored by the judges that did not see its volume
            s = [0.0] * n
            for net, held in nets:
                for i, x in zip(held, score(net, vs[held], device)):
                    s[i] = x
        else:
            s = np.mean([score(net, vs, device) for net, _ in nets], axis=0).tolist()
        results[name] = s
        print(f"{name:24s} mean {np.mean(s):.3f} median {np.median(s):.3f}  ", " ".join(f"{x:.2f}" for x in s), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


def prepare(args: argparse.Namespace) -> None:
    from scripts.checkpoints import load_checkpoint, load_network
    from scripts.data import list_volumes
    from scripts.evaluate_generation import RealVolumes, read_sample, through_autoencoder
    from scripts.networks import FactorAutoencoderKL

    def small(v: torch.Tensor) -> torch.Tensor:
        return (F.avg_pool3d(v[None].float(), 2)[0].clamp(0, 1) * 255).round().to(torch.uint8)

    sample_files = {}  # checked before any volume is read
    for folder in args.samples:
        sample_files[folder] = sorted(glob.glob(f"{folder}/*.nii.gz")) or sorted(glob.glob(f"{folder}/samples/*/*.nii.gz"))
        if not sample_files[folder]:
            raise SystemExit(f"--samples {folder}: no .nii.gz in it or in its samples/<class>/ (the output of configs/inference.yaml or scripts.evaluate_generation)")
    ckpt = load_checkpoint(args.diffusion_ckpt, "diffusion_ckpt")
    real = RealVolumes(ckpt, FactorAutoencoderKL(**ckpt["autoencoder_args"]).total_factor, torch.device("cpu"))
    names, full = [], []
    for folder in (args.train_dir, args.val_dir):
        for item in list_volumes(folder):
            names.append(Path(item["image"]).name.replace(".nii.gz", ""))
            full.append(real(item["image"]))
    out = {"names": names, "real": torch.stack([small(v) for v in full]), "sets": {}}
    for path in args.autoencoders:
        a = load_checkpoint(path, "autoencoder_ckpt")
        net = FactorAutoencoderKL(**a["autoencoder_args"])
        load_network(net, path, "autoencoder", a["autoencoder_args"], "autoencoder_ckpt")
        out["sets"][f"real through {Path(path).stem}"] = torch.stack([small(through_autoencoder(net.eval(), v)) for v in full])
    for folder in args.samples:
        out["sets"][Path(folder).name] = torch.stack([small(read_sample(p)) for p in sample_files[folder]])
    torch.save(out, args.volumes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("volumes")
    p.add_argument("--diffusion_ckpt", required=True)
    p.add_argument("--train_dir", required=True)
    p.add_argument("--val_dir", required=True)
    p.add_argument("--autoencoders", nargs="*", default=[])
    p.add_argument("--samples", nargs="*", default=[])
    j = sub.add_parser("judge")
    j.add_argument("volumes")
    j.add_argument("out")
    j.add_argument("--fakes", choices=("mix", "blur", "mixblur"), default="mixblur")
    j.add_argument("--steps", type=int, default=2500)
    j.add_argument("--seed", type=int, default=0)
    j.add_argument("--affine", action="store_true")
    j.add_argument("--crop", type=int, default=0)
    args = parser.parse_args()
    written = args.volumes if args.command == "prepare" else args.out
    if Path(written).exists():
        raise SystemExit(f"{written} exists: give a new file (it is not overwritten)")
    prepare(args) if args.command == "prepare" else judge(args)


if __name__ == "__main__":
    main()
