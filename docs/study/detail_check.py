"""Whether samples carry the fine detail of real volumes, which the Fréchet distance of
`scripts.evaluate_generation` does not see (docs/generation.md, the measure): the power of each
volume in octave bands of spatial frequency, samples against the real volumes of their class, in dB.

    PYTHONPATH=. python docs/study/detail_check.py EVAL [EVAL ...] --diffusion_ckpt M --train_dir TRAIN --val_dir VAL

Each EVAL holds samples/<class>/*.nii.gz (as `scripts.evaluate_generation` or `configs/inference.yaml`
write them). The real volumes (training and held-out) are prepared as the diffusion model's training
volumes were. A blurred sample falls below the real volumes in the highest bands, a speckled one
rises above them. Prints one Markdown row per EVAL and class.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from scripts.checkpoints import load_checkpoint
from scripts.data import list_volumes
from scripts.evaluate_generation import RealVolumes, by_class, read_sample
from scripts.networks import FactorAutoencoderKL

BANDS = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)  # edges in cycles per voxel: five octaves up to Nyquist


def band_power(volume: torch.Tensor) -> np.ndarray:
    """log10 of the mean spectral power of ``volume`` (x, y, z) in each octave of ``BANDS``."""
    power = torch.fft.fftn(volume - volume.mean()).abs().square()
    radius = torch.stack(torch.meshgrid(*[torch.fft.fftfreq(n) for n in volume.shape], indexing="ij")).norm(dim=0)
    return np.array([power[(radius >= lo) & (radius < hi)].mean().log10().item() for lo, hi in zip(BANDS, BANDS[1:])])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("eval_dirs", type=Path, nargs="+")
    p.add_argument("--diffusion_ckpt", required=True)
    p.add_argument("--train_dir", required=True)
    p.add_argument("--val_dir", required=True)
    args = p.parse_args()
    ckpt = load_checkpoint(args.diffusion_ckpt, "diffusion_ckpt")
    classes, key = list(ckpt.get("classes") or []), ckpt.get("condition_key")
    real = RealVolumes(ckpt, FactorAutoencoderKL(**ckpt["autoencoder_args"]).total_factor, torch.device("cpu"))
    volumes = list_volumes(args.train_dir) + list_volumes(args.val_dir)
    reference = {name: np.stack([band_power(real(v)[0]) for v in paths]) for name, paths in by_class(volumes, key, classes).items() if paths}
    edges = ", ".join(f"{lo:.3g}-{hi:.3g}" for lo, hi in zip(BANDS, BANDS[1:]))
    print(f"| samples | class | volumes | power against the real volumes per band ({edges} cycles/voxel), dB |")
    print("| --- | --- | --- | --- |")
    for name, ref in reference.items():
        spread = 10 * ref.std(0)
        print(f"| real ({len(ref)}), standard deviation | {name} | {len(ref)} | {', '.join(f'{s:.1f}' for s in spread)} |")
    for eval_dir in args.eval_dirs:
        for name, ref in reference.items():
            paths = sorted((eval_dir / "samples" / name).rglob("*.nii.gz"))
            if not paths:
                continue
            bands = np.stack([band_power(read_sample(s)[0]) for s in paths])
            diff = 10 * (bands.mean(0) - ref.mean(0))
            print(f"| {eval_dir} | {name} | {len(paths)} | {', '.join(f'{d:+.1f}' for d in diff)} |")


if __name__ == "__main__":
    main()
