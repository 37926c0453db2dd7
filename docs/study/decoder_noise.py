"""Is the decoder what makes samples speckled? Encode one real training volume with the autoencoder
that a diffusion model.pt was trained on, add Gaussian noise of a few sizes to its latent (in units of
the latent's standard deviation, i.e. after the model's scale factor), decode, and report the PSNR
against the clean decoding plus a PNG of mid-slices (docs/generation.md, "What the stages left").

    python docs/study/decoder_noise.py models/model.pt models/model_autoencoder.pt HEAD.nii.gz out.png [single]

With ``single``, a model's per-channel scale factors are replaced by one, their root mean square
(the same noise energy in the image): per-channel noise against one factor's noise, at equal energy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts.checkpoints import load_checkpoint, load_network  # noqa: E402
from scripts.diffusion import latent_scale  # noqa: E402
from scripts.evaluate_generation import RealVolumes  # noqa: E402
from scripts.networks import FactorAutoencoderKL  # noqa: E402

NOISE = (0.05, 0.1, 0.2, 0.4)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


@torch.no_grad()
def main(diffusion_ckpt: str, autoencoder_ckpt: str, volume: str, png: str, single: str = "") -> None:
    ckpt = load_checkpoint(diffusion_ckpt, "diffusion_ckpt")
    if single:
        ckpt["scale_factor"] = float(torch.tensor(ckpt["scale_factor"], dtype=torch.float64).pow(-2).mean().rsqrt())
    autoencoder = FactorAutoencoderKL(**ckpt["autoencoder_args"])
    load_network(autoencoder, autoencoder_ckpt, "autoencoder", ckpt["autoencoder_args"], "autoencoder_ckpt")
    autoencoder.eval()
    image = RealVolumes(ckpt, autoencoder.total_factor, torch.device("cpu"))(volume)[None]
    z_mu, _ = autoencoder.encode(image)
    scale = latent_scale(ckpt["scale_factor"], z_mu.shape[1])
    clean = autoencoder.decode(z_mu).clamp(0, 1)
    print(f"reconstruction PSNR {psnr(clean, image):.2f} dB")
    rows = [("input", image), ("decoded", clean)]
    generator = torch.Generator().manual_seed(0)
    for size in NOISE:
        noisy = autoencoder.decode(z_mu + size * torch.randn(z_mu.shape, generator=generator) / scale).clamp(0, 1)
        print(f"noise {size} latent std: PSNR against the clean decoding {psnr(noisy, clean):.2f} dB")
        rows.append((f"noise {size}", noisy))
    fig, axes = plt.subplots(len(rows), 3, figsize=(6, 2 * len(rows)))
    for r, (name, v) in enumerate(rows):
        v = v[0, 0].numpy()
        c = [n // 2 for n in v.shape]
        for k, plane in enumerate((v[:, :, c[2]], v[:, c[1], :], v[c[0]])):
            axes[r, k].imshow(np.rot90(plane), cmap="gray", vmin=0, vmax=1)
            axes[r, k].axis("off")
        axes[r, 0].set_title(name, fontsize=8, loc="left")
    fig.savefig(png, dpi=70)


if __name__ == "__main__":
    main(*sys.argv[1:6])
