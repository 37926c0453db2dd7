"""A network started at its latent shortcut's code, saved as a checkpoint: the latent is the code
itself (``quant_conv_mu`` zeroed) and the reconstruction is the code's inverse (the decoder's output
convolution zeroed), as a training run starts (``train_autoencoder.yaml``), with no step taken.

Such a file is where stage 16 starts, and its encoder is the one the diffusion models of generation
stage 11 trained on: a decoder fine-tuned from it with ``freeze_encoder`` keeps the latents, so those
models stay valid. Seeded, so that the file (and its encoder fingerprint) is reproducible. Run from
the bundle root:
    python docs/study/start_at_code.py models/model_autoencoder.pt OUT.pt '{"latent_channels": 32, "shortcut": "cosine"}'
The first file gives the network's arguments and preprocessing; the JSON, the arguments it changes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from scripts.networks import FactorAutoencoderKL, encoder_fingerprint, init_posterior, start_at_shortcut

TRAIN_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "train_autoencoder.yaml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reference", help="a model_autoencoder.pt whose arguments and preprocessing to start from")
    p.add_argument("output", help="the checkpoint to write (refused if it exists)")
    p.add_argument("changes", nargs="?", default="{}", help="JSON of the autoencoder arguments to change")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    reference = torch.load(args.reference, map_location="cpu", weights_only=True)
    network_args = {**reference["autoencoder_args"], **json.loads(args.changes)}
    if not network_args.get("shortcut"):
        raise SystemExit(f"{args.changes}: a network without a latent shortcut has no code to start at")
    if Path(args.output).exists():
        raise SystemExit(f"{args.output} exists: name a new file (this script never overwrites one)")
    initial_log_var = ConfigParser.load_config_file(TRAIN_CONFIG)["initial_log_var"]  # as a training run starts
    torch.manual_seed(args.seed)
    network = start_at_shortcut(init_posterior(FactorAutoencoderKL(**network_args), initial_log_var))
    with open(args.output, "xb") as f:
        torch.save({"autoencoder": network.state_dict(), "autoencoder_args": network_args,
                    "preprocessing": reference["preprocessing"]}, f)
    print(f"{args.output}: encoder fingerprint {encoder_fingerprint(network)}, {network_args}")


if __name__ == "__main__":
    main()
