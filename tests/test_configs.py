"""The example overlays and the inference configs describe the networks they say they do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]


def parse(*files: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(REPO / f) for f in files])
    parser.update({"bundle_root": str(REPO), **overrides})
    return parser


@pytest.mark.parametrize(
    "example, total, latent",
    [
        ("factors_8x.yaml", (8, 8, 8), (3, 8, 8, 8)),
        ("factors_16x.yaml", (16, 16, 16), (8, 4, 4, 4)),
        ("anisotropic.yaml", (4, 4, 2), (3, 16, 16, 16)),
    ],
)
def test_example_overlays_set_the_factors_they_document(example, total, latent):
    parser = parse("configs/train_autoencoder.yaml", f"configs/examples/{example}")
    network = parser.get_parsed_content("autoencoder_def")
    patch = parser.get_parsed_content("patch")  # the patch-size check passes
    assert network.total_factor == total
    assert (network.latent_channels, *network.latent_shape(patch)) == latent
    with torch.no_grad():
        _, z_mu, _ = network(torch.rand(1, 1, *patch))
    assert tuple(z_mu.shape[1:]) == latent


def test_inference_defaults_match_the_shipped_weights():
    """The default reconstruction and sampling configs load models/ as they are, and the 8x
    overlay loads the 8x weights."""
    for files, ckpt in (
        (("configs/inference_autoencoder.yaml",), None),
        (("configs/inference_autoencoder.yaml", "configs/examples/factors_8x.yaml"), "models/model_autoencoder_8x.pt"),
    ):
        overrides = {"device": torch.device("cpu")} | ({"autoencoder_ckpt": str(REPO / ckpt)} if ckpt else {})
        parser = parse(*files, **overrides)
        parser.get_parsed_content("load_autoencoder")
    parser = parse("configs/inference.yaml", device=torch.device("cpu"))
    for step in ("load_autoencoder", "diffusion_checkpoint", "check_pair", "latent_shape"):
        parser.get_parsed_content(step)
