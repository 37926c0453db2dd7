"""How widely generated volumes spread in each channel of the cosine code, against the training
volumes of their class: which frequencies of each latent cell a diffusion model over- or
under-generates (docs/study/generation15_summary.md).

    PYTHONPATH=. python docs/study/latent_spread.py MODEL.pt AUTOENCODER.pt TRAINING_HEADS SAMPLES_DIR [CLASS]

SAMPLES_DIR holds the samples (NIfTI) of one class, e.g. from ``configs/inference.yaml --condition T1
--num_samples 8 --output_dir SAMPLES_DIR``; TRAINING_HEADS the training volumes with their datalist, as
for ``scripts.evaluate_generation``. Both go through the autoencoder's shortcut code (each cell's
lowest frequencies, the cell mean first), the training volumes prepared as the model was trained.
Printed: per band of channels, the standard deviation over volumes and positions, samples over
training volumes (1.00: as spread as the training volumes).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from scripts.checkpoints import load_checkpoint, load_network
from scripts.data import list_volumes
from scripts.evaluate_generation import RealVolumes, by_class, read_sample
from scripts.networks import FactorAutoencoderKL


def bands(channels: int) -> list[tuple[int, int]]:
    """The cell mean, then bands that double in width up to the last channel."""
    edges, width = [0, 1], 7
    while edges[-1] + width < channels:
        edges.append(edges[-1] + width)
        width = edges[-1]
    return list(zip(edges, edges[1:] + [channels]))


def main(model: str, autoencoder: str, train_dir: str, samples_dir: str, condition: str = "T1") -> None:
    torch.set_num_threads(2)
    ckpt = load_checkpoint(model, "diffusion_ckpt")
    ae = FactorAutoencoderKL(**ckpt["autoencoder_args"])
    load_network(ae, autoencoder, "autoencoder", ckpt["autoencoder_args"], "autoencoder_ckpt")
    ae.eval()
    real = RealVolumes(ckpt, ae.total_factor, torch.device("cpu"))
    paths = by_class(list_volumes(train_dir), ckpt["condition_key"], ckpt["classes"])[condition]
    with torch.no_grad():
        z_real = torch.cat([ae._code(real(p)[None]) for p in paths])
        samples = sorted(Path(samples_dir).glob("*.nii.gz"))
        z_samples = torch.cat([ae._code(read_sample(p)[None]) for p in samples])
    ratio = z_samples.std(dim=(0, 2, 3, 4)) / z_real.std(dim=(0, 2, 3, 4))
    print(f"{len(samples)} samples against {len(paths)} training volumes ({condition}), spread of the samples over the training volumes'")
    for a, b in bands(ratio.numel()):
        print(f"channels {a}-{b - 1}: {ratio[a:b].mean().item():.2f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
