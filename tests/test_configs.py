"""The example overlays and the inference configs describe the networks they say they do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import error_text

REPO = Path(__file__).resolve().parents[1]


def parse(*files: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(REPO / f) for f in files])
    parser.update({"bundle_root": str(REPO), **overrides})
    return parser


@pytest.mark.parametrize(
    "example, total, latent",
    [
        ("factors_8x.yaml", (8, 8, 8), (192, 16, 16, 8)),
        ("factors_16x.yaml", (16, 16, 16), (1024, 8, 8, 4)),
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


def test_finetune_decoder_overlay_trains_only_the_shipped_decoder():
    """configs/examples/finetune_decoder.yaml: the run starts from the shipped 4x weights, and the
    optimizer holds every decoder parameter and none of those that make the latents."""
    parser = parse("configs/train_autoencoder.yaml", "configs/examples/finetune_decoder.yaml")
    assert Path(parser.get_parsed_content("init_from")) == REPO / "models" / "model_autoencoder.pt"
    autoencoder = parser.get_parsed_content("autoencoder")
    trained = {id(q) for group in parser.get_parsed_content("optimizer_g").param_groups for q in group["params"]}
    assert all(id(q) in trained for q in autoencoder.decoder.parameters())
    for name in ("encoder", "quant_conv_mu", "quant_conv_log_sigma"):
        assert not any(id(q) in trained or q.requires_grad for q in getattr(autoencoder, name).parameters()), name


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
    settings = parser.get_parsed_content("preprocessing_args")
    for key in ("spacing", "modality", "intensity_percentiles", "ct_window"):
        assert settings[key] == saved["preprocessing"][key], key


def test_sampling_config_builds_the_shipped_pair_from_model_pt():
    """inference.yaml needs no network keys: it builds both networks from the arguments model.pt
    records, loads the shipped 4x autoencoder against them, and samples at the size model.pt learned."""
    parser = parse("configs/inference.yaml", device=torch.device("cpu"))
    shipped = torch.load(REPO / "models" / "model.pt", map_location="cpu", weights_only=True)
    for step in ("load_diffusion", "load_autoencoder", "latent_shape"):
        parser.get_parsed_content(step)
    assert parser.get_parsed_content("diffusion_args") == shipped["diffusion_args"]
    assert parser.get_parsed_content("classes") == shipped["classes"] == ["EPI", "T1", "T2"]
    image_size = shipped["image_size"]
    assert parser.get_parsed_content("latent_shape") == [32, *(s // 4 for s in image_size)]
    assert parser.get_parsed_content("scheduler").prediction_type == shipped["noise_schedule"]["prediction_type"]


@pytest.mark.parametrize("factor, overlay, latent", [(8, "factors_8x.yaml", [192, 16, 16, 16]), (16, "factors_16x.yaml", [1024, 8, 8, 8])])
def test_shipped_diffusion_models_of_other_factors_load_with_their_overlay(factor, overlay, latent):
    """diffusion_Nx.yaml names the shipped pair for sampling, and merged over the training configs it
    builds the UNet that the shipped model records, on the autoencoder it was trained with."""
    sample = parse("configs/inference.yaml", f"configs/examples/diffusion_{factor}x.yaml", device=torch.device("cpu"))
    shipped = torch.load(REPO / "models" / f"model_{factor}x.pt", map_location="cpu", weights_only=True)
    for step in ("load_diffusion", "load_autoencoder"):
        sample.get_parsed_content(step)
    assert sample.get_parsed_content("latent_shape") == latent
    assert sample.get_parsed_content("classes") == shipped["classes"] == ["EPI", "T1", "T2"]
    train = parse("configs/train_autoencoder.yaml", f"configs/examples/{overlay}", "configs/train_diffusion.yaml", f"configs/examples/diffusion_{factor}x.yaml")
    unconditional = dict(shipped["diffusion_args"], num_class_embeds=None)  # the classes come from the data
    assert train.get_parsed_content("diffusion_args") == unconditional
    assert train.get_parsed_content("autoencoder_args") == shipped["autoencoder_args"]
    assert Path(train.get_parsed_content("autoencoder_ckpt")).name == f"model_autoencoder_{factor}x.pt"


def test_sampling_refuses_an_autoencoder_other_than_model_pts(tmp_path):
    with pytest.raises(Exception) as info:
        parse(
            "configs/inference.yaml", device=torch.device("cpu"), autoencoder_ckpt=str(REPO / "models" / "model_autoencoder_8x.pt")
        ).get_parsed_content("load_autoencoder")
    assert "(the autoencoder of diffusion_ckpt)" in error_text(info.value)
    assert "was trained with" in error_text(info.value)


def test_reconstruction_builds_the_network_the_checkpoint_records():
    """inference_autoencoder.yaml has no network keys: each shipped autoencoder is built from its
    own autoencoder_args; the reconstruction windows keep a centre."""
    for name, factors in (("model_autoencoder.pt", [2, 2]), ("model_autoencoder_8x.pt", [4, 2]), ("model_autoencoder_16x.pt", [4, 4])):
        recon = parse("configs/inference_autoencoder.yaml", device=torch.device("cpu"), autoencoder_ckpt=str(REPO / "models" / name))
        saved = torch.load(REPO / "models" / name, map_location="cpu", weights_only=True)["autoencoder_args"]
        assert recon.get_parsed_content("autoencoder_args") == saved and saved["downsample_factors"] == factors
        recon.get_parsed_content("load_autoencoder")
    # what training writes by default is what reconstruction then builds
    train = parse("configs/train_autoencoder.yaml")
    assert {k: v for k, v in train.get_parsed_content("autoencoder_args").items() if k != "use_checkpoint"} == {
        k: v for k, v in parse("configs/inference_autoencoder.yaml").get_parsed_content("autoencoder_args").items() if k != "use_checkpoint"
    }
    inferer = parse("configs/inference_autoencoder.yaml", device=torch.device("cpu")).get_parsed_content("inferer")
    assert type(inferer).__name__ == "TiledInferer"
    assert inferer.roi_size == (256, 256, 128) and inferer.margins == (32, 32, 32)


def test_reconstruction_of_a_state_dict_without_arguments_asks_for_them(tmp_path):
    """MONAI's AutoencoderKL weights are a bare state dict: the error says how to give the network."""
    bare = tmp_path / "monai_autoencoder.pt"
    torch.save({"encoder.blocks.0.conv.weight": torch.zeros(1)}, bare)
    with pytest.raises(Exception) as info:
        parse("configs/inference_autoencoder.yaml", device=torch.device("cpu"), autoencoder_ckpt=str(bare)).get_parsed_content("network")
    text = error_text(info.value)
    assert f"autoencoder_ckpt '{bare}' records no autoencoder_args" in text and "--autoencoder_args" in text


TINY = dict(channels=[8, 16, 16], norm_num_groups=8, latent_channels=16)


def tiny_autoencoder_checkpoint(path: Path, preprocessing: dict | None) -> Path:
    """A tiny autoencoder checkpoint as training writes it, with the given preprocessing entry (None: an
    older checkpoint without one)."""
    train = parse("configs/train_autoencoder.yaml", **TINY)
    ckpt = {"autoencoder": train.get_parsed_content("autoencoder_def").state_dict(), "autoencoder_args": train.get_parsed_content("autoencoder_args")}
    if preprocessing is not None:
        ckpt["preprocessing"] = preprocessing
    torch.save(ckpt, path)
    return path


def reconstruction_transforms(ckpt: Path, **overrides) -> list:
    parser = parse("configs/inference_autoencoder.yaml", device=torch.device("cpu"), autoencoder_ckpt=str(ckpt), **TINY, **overrides)
    parser.get_parsed_content("load_autoencoder")
    return parser.get_parsed_content("preprocessing").transforms


def _spacing(transforms) -> list | None:
    found = [t.spacing_transform.pixdim.tolist() for t in transforms if type(t).__name__ == "Spacingd"]
    return found[0] if found else None


def test_reconstruction_runs_with_the_preprocessing_the_checkpoint_records(tmp_path, caplog):
    """Trained at 2 mm (train_autoencoder.yaml's preprocessing_args, saved in the checkpoint), reconstructed
    with the defaults: the reconstruction resamples to 2 mm too, with the checkpoint's intensity mapping."""
    trained = parse("configs/train_autoencoder.yaml", spacing=[2.0, 2.0, 2.0], modality="ct", ct_window=[-200, 300])
    ckpt = tiny_autoencoder_checkpoint(tmp_path / "ae.pt", trained.get_parsed_content("preprocessing_args"))
    caplog.set_level("WARNING")
    transforms = reconstruction_transforms(ckpt)
    assert _spacing(transforms) == [2.0, 2.0, 2.0]
    (intensity,) = [t for t in transforms if type(t).__name__ == "UnitIntensityRanged"]
    assert intensity.modality == "ct" and list(intensity.ct_window) == [-200, 300]
    assert not caplog.records, "the checkpoint's own settings need no warning"


def test_a_differing_preprocessing_override_is_a_warning_naming_both(tmp_path, caplog):
    ckpt = tiny_autoencoder_checkpoint(
        tmp_path / "ae.pt", {"spacing": [2.0, 2.0, 2.0], "modality": "mri", "intensity_percentiles": [0.5, 99.5], "ct_window": [-1000, 1000]}
    )
    caplog.set_level("WARNING")
    assert _spacing(reconstruction_transforms(ckpt, spacing=[1.0, 1.0, 1.0])) == [1.0, 1.0, 1.0]
    assert f"autoencoder_ckpt '{ckpt}' was trained with spacing=[2.0, 2.0, 2.0]; running with spacing=[1.0, 1.0, 1.0]" in caplog.text
    caplog.clear()
    assert _spacing(reconstruction_transforms(ckpt, spacing="none")) is None  # the command line's None: native voxels
    assert "running with spacing=None" in caplog.text
    caplog.clear()
    reconstruction_transforms(ckpt, spacing=[2, 2, 2])  # the same value: no warning
    assert not caplog.records


def test_an_older_checkpoint_without_preprocessing_keeps_the_defaults(tmp_path):
    ckpt = tiny_autoencoder_checkpoint(tmp_path / "old.pt", None)
    transforms = reconstruction_transforms(ckpt)
    assert _spacing(transforms) is None
    (intensity,) = [t for t in transforms if type(t).__name__ == "UnitIntensityRanged"]
    assert intensity.modality == "mri"


def test_sampling_reads_the_noise_schedule_of_model_pt(tmp_path, caplog):
    """A model trained with 500 steps is sampled over 500; a model.pt without a noise_schedule (from
    before it was recorded) gets the 1000-step epsilon schedule; an override that differs is a
    warning naming both."""
    shipped = torch.load(REPO / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert shipped["noise_schedule"]["num_train_timesteps"] == 1000
    older = tmp_path / "model_older.pt"
    torch.save({k: v for k, v in shipped.items() if k != "noise_schedule"}, older)
    scheduler = parse("configs/inference.yaml", device=torch.device("cpu"), diffusion_ckpt=str(older)).get_parsed_content("scheduler")
    assert scheduler.num_train_timesteps == 1000 and scheduler.prediction_type == "epsilon"
    schedule = {"num_train_timesteps": 500, "schedule": "linear_beta", "beta_start": 0.001, "beta_end": 0.02, "prediction_type": "v_prediction"}
    path = tmp_path / "model_500.pt"
    torch.save(dict(shipped, noise_schedule=schedule), path)
    scheduler = parse("configs/inference.yaml", device=torch.device("cpu"), diffusion_ckpt=str(path)).get_parsed_content("scheduler")
    assert scheduler.num_train_timesteps == 500 and scheduler.prediction_type == "v_prediction"
    torch.testing.assert_close(scheduler.betas, torch.linspace(0.001, 0.02, 500))
    caplog.set_level("WARNING")
    parser = parse("configs/inference.yaml", device=torch.device("cpu"), diffusion_ckpt=str(path), num_train_timesteps=1000)
    assert parser.get_parsed_content("scheduler").num_train_timesteps == 1000
    assert f"diffusion_ckpt '{path}' was trained with num_train_timesteps=500; running with num_train_timesteps=1000" in caplog.text


def test_diffusion_training_saves_its_noise_schedule():
    train = parse("configs/train_autoencoder.yaml", "configs/train_diffusion.yaml", num_train_timesteps=500)
    saved = train.get_parsed_content("diffusion_checkpoint#noise_schedule")
    assert saved == {
        "num_train_timesteps": 500, "schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0195, "prediction_type": "v_prediction",
    }
    scheduler = train.get_parsed_content("noise_scheduler")
    assert scheduler.num_train_timesteps == 500 and scheduler.prediction_type == "v_prediction"


@pytest.mark.parametrize("files", [["configs/train_autoencoder.yaml"], ["configs/train_autoencoder.yaml", "configs/train_diffusion.yaml"]])
def test_training_marks_its_steps_for_cuda_graphs_only(files):
    from scripts.engines import CUDAGraphSteps

    assert isinstance(parse(*files, compile="reduce-overhead").get_parsed_content("cuda_graph_steps"), CUDAGraphSteps)
    for compile in (False, True, "max-autotune-no-cudagraphs"):
        assert parse(*files, compile=compile).get_parsed_content("cuda_graph_steps") is None


@pytest.mark.parametrize("files", [["configs/train_autoencoder.yaml"], ["configs/train_autoencoder.yaml", "configs/train_diffusion.yaml"]])
def test_training_runs_cuda_graphs_on_a_gpu_only(files, monkeypatch):
    import scripts.engines

    monkeypatch.setattr(scripts.engines, "_inductor_obstacle", lambda device: None)  # a GPU that Inductor compiles for
    assert parse(*files, device=torch.device("cuda")).get_parsed_content("compile") == "reduce-overhead"
    assert parse(*files, device=torch.device("cpu")).get_parsed_content("compile") is False
