"""The Fréchet distance that the autoencoder alone costs, per class: each training volume encoded and
decoded, against the held-out volumes, on the features ``scripts.evaluate_generation`` uses (its
``fd_autoencoder`` column, without sampling). Below it no diffusion model on these latents can be
expected to go.

    PYTHONPATH=. python docs/study/autoencoder_reference.py TRAINING_HEADS HELD_OUT_HEADS \
        models/model.pt:models/model_autoencoder.pt models/model_8x.pt:models/model_autoencoder_8x.pt ...
"""

from __future__ import annotations

import sys

import torch

from scripts.checkpoints import load_checkpoint, load_network
from scripts.data import list_volumes
from scripts.evaluate_generation import EncoderFeatures, RealVolumes, by_class, frechet_distance, through_autoencoder
from scripts.networks import FactorAutoencoderKL


def main(train_dir: str, val_dir: str, pairs: list[str]) -> None:
    device = torch.device("cpu")
    features = EncoderFeatures("models/model_features.pt", device)
    for pair in pairs:
        diffusion_ckpt, autoencoder_ckpt = pair.split(":")
        ckpt = load_checkpoint(diffusion_ckpt, "diffusion_ckpt")
        autoencoder = FactorAutoencoderKL(**ckpt["autoencoder_args"])
        load_network(autoencoder, autoencoder_ckpt, "autoencoder", ckpt["autoencoder_args"], "autoencoder_ckpt")
        autoencoder.eval()
        real = RealVolumes(ckpt, autoencoder.total_factor, device)
        classes, key = list(ckpt["classes"]), ckpt["condition_key"]
        train, val = by_class(list_volumes(train_dir), key, classes), by_class(list_volumes(val_dir), key, classes)
        for name in classes:
            if not val[name]:
                continue
            held_out = torch.cat([features(real(p)) for p in val[name]])
            volumes = [real(p) for p in train[name]]
            decoded = [through_autoencoder(autoencoder, v) for v in volumes]
            fd_real = frechet_distance(torch.cat([features(v) for v in volumes]), held_out)
            fd_autoencoder = frechet_distance(torch.cat([features(v) for v in decoded]), held_out)
            print(f"{diffusion_ckpt} {name}: real vs real {fd_real:.1f}, through the autoencoder {fd_autoencoder:.1f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
