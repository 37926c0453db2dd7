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
        ("factors_8x.yaml", (8, 8, 8), (32, 16, 16, 8)),
        ("factors_16x.yaml", (16, 16, 16), (64, 8, 8, 4)),
        ("anisotropic.yaml", (4, 4, 2), (16, 16, 16, 16)),
    ],
)
def test_example_overlays_set_the_factors_they_document(example, total, latent):
    parser = parse("configs/train_autoencoder.yaml", f"configs/examples/{example}")
    network = parser.get_parsed_content("autoencoder_def")
    patch = parser.get_parsed_content("patch")  # the patch-size check passes
    assert network.total_factor == total
    assert (network.latent_channels, *network.latent_shape(patch)) == latent
    with torch.no_grad():
        z_mu = network.encode(torch.rand(1, 1, *patch))[0]
    assert tuple(z_mu.shape[1:]) == latent


@pytest.mark.parametrize("overlay, ckpt", [(None, "models/model_autoencoder.pt"),
                                           ("factors_8x.yaml", "models/model_autoencoder_8x.pt"),
                                           ("factors_16x.yaml", "models/model_autoencoder_16x.pt")])
def test_shipped_autoencoders_load_with_their_overlay(overlay, ckpt):
    """Each shipped autoencoder loads into inference_autoencoder.yaml with its one overlay, and the
    preprocessing it records is the config's default."""
    files = ["configs/inference_autoencoder.yaml"] + ([f"configs/examples/{overlay}"] if overlay else [])
    parser = parse(*files, device=torch.device("cpu"))
    assert Path(parser.get_parsed_content("autoencoder_ckpt")).resolve() == (REPO / ckpt).resolve()
    saved = parser.get_parsed_content("load_autoencoder")
    for key in ("spacing", "modality", "intensity_percentiles", "ct_window"):
        assert saved["preprocessing"][key] == parser[key], key


def test_sampling_config_loads_the_shipped_diffusion_pair():
    """inference.yaml describes model.pt and the autoencoder it was trained with (GroupNorm, 3 latent
    channels), and the default norm channel would refuse that autoencoder, naming both norms."""
    parser = parse("configs/inference.yaml", device=torch.device("cpu"))
    for step in ("load_autoencoder", "diffusion_checkpoint", "check_pair", "latent_shape"):
        parser.get_parsed_content(step)
    with pytest.raises(Exception) as info:
        parse("configs/inference.yaml", device=torch.device("cpu"), norm="channel").get_parsed_content("load_autoencoder")
    assert "trained with norm='group', but the config has norm='channel'" in _chained(info.value)


def test_reconstruction_config_defaults_to_what_training_writes():
    """The network and preprocessing keys default as in train_autoencoder.yaml, so a model trained with
    the defaults reconstructs with the defaults; the reconstruction windows keep a centre."""
    train = parse("configs/train_autoencoder.yaml")
    recon = parse("configs/inference_autoencoder.yaml", device=torch.device("cpu"))
    for key in ("norm", "spacing", "layout", "downsample_factors", "channels", "latent_channels", "modality"):
        assert recon[key] == train[key], key
    trained_args = train.get_parsed_content("autoencoder_args")
    args = recon.get_parsed_content("autoencoder_args")
    assert {k: v for k, v in args.items() if k != "use_checkpoint"} == {
        k: v for k, v in trained_args.items() if k != "use_checkpoint"
    }
    inferer = recon.get_parsed_content("inferer")
    assert type(inferer).__name__ == "TiledInferer"
    assert inferer.roi_size == (256, 256, 128) and inferer.margins == (32, 32, 32)


def _chained(error: BaseException) -> str:
    parts = []
    while error is not None:
        parts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(parts)
