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


def test_inference_configs_load_the_shipped_weights_with_norm_group():
    """The weights in models/ are GroupNorm networks saved before norm was recorded: the
    reconstruction and sampling configs load them with norm group (the 8x overlay the 8x weights),
    and their default, norm channel, refuses them naming both norms."""
    for files, ckpt in (
        (("configs/inference_autoencoder.yaml",), None),
        (("configs/inference_autoencoder.yaml", "configs/examples/factors_8x.yaml"), "models/model_autoencoder_8x.pt"),
    ):
        overrides = {"device": torch.device("cpu")} | ({"autoencoder_ckpt": str(REPO / ckpt)} if ckpt else {})
        parse(*files, norm="group", **overrides).get_parsed_content("load_autoencoder")
        with pytest.raises(Exception) as info:
            parse(*files, **overrides).get_parsed_content("load_autoencoder")
        assert "trained with norm='group', but the config has norm='channel'" in _chained(info.value)
    parser = parse("configs/inference.yaml", device=torch.device("cpu"), norm="group")
    for step in ("load_autoencoder", "diffusion_checkpoint", "check_pair", "latent_shape"):
        parser.get_parsed_content(step)
    with pytest.raises(Exception) as info:
        parse("configs/inference.yaml", device=torch.device("cpu")).get_parsed_content("load_autoencoder")
    assert "norm='channel'" in _chained(info.value)


def test_inference_configs_default_to_what_training_writes():
    """norm and spacing default as in train_autoencoder.yaml, so a model trained with the defaults
    reconstructs and samples with the defaults; the reconstruction windows keep a centre."""
    train = parse("configs/train_autoencoder.yaml")
    recon = parse("configs/inference_autoencoder.yaml", device=torch.device("cpu"))
    generate = parse("configs/inference.yaml", device=torch.device("cpu"))
    for key in ("norm", "spacing", "layout", "downsample_factors", "channels", "modality"):
        assert recon[key] == train[key], key
    trained_args = train.get_parsed_content("autoencoder_args")
    for parser in (recon, generate):
        args = parser.get_parsed_content("autoencoder_args")
        assert args["norm"] == "channel" == trained_args["norm"]
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
