"""Shared helpers and fixtures for the bundle's tests.

Everything is tiny so that the whole suite runs on a 2-core CPU: 8/16-channel autoencoders, an
8-channel two-level diffusion UNet, volumes of ~30^3 voxels at 2 mm resampled to 4 mm (~15^3
voxels), 16^3 training patches, batch size 1 and one or two short epochs. Expensive artefacts (a
trained autoencoder checkpoint, a trained diffusion checkpoint) are built once per session. No
test writes into the repository: every output_dir, dataset_dir, cache and MLflow store lives
under pytest's tmp_path.

Most bundle runs use MONAI's ``ConfigWorkflow`` in this process (what ``python -m monai.bundle
run`` builds, without a new interpreter); ``run_bundle`` runs the real CLI where its argument
parsing, log output or exit status is what a test is about.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scripts.data import _phantom  # noqa: E402

CONFIGS = REPO / "configs"
AE_CONFIG = str(CONFIGS / "train_autoencoder.yaml")
DIFFUSION_CONFIGS = [AE_CONFIG, str(CONFIGS / "train_diffusion.yaml")]
RECON_CONFIG = str(CONFIGS / "inference_autoencoder.yaml")
GENERATE_CONFIG = str(CONFIGS / "inference.yaml")

# the network and data keys shared by every config, at their tiny values
# a tiny autoencoder built directly in Python (the config overrides below build the same shape)
TINY_AUTOENCODER = dict(
    spatial_dims=3,
    in_channels=1,
    out_channels=1,
    channels=(8, 16, 16),
    latent_channels=16,
    num_res_blocks=1,
    attention_levels=(False, False, False),
    norm_num_groups=8,
    with_encoder_nonlocal_attn=False,
    with_decoder_nonlocal_attn=False,
    shortcut=True,
)
TINY_NET = dict(channels=[8, 16, 16], norm_num_groups=8, latent_channels=16, spacing=[4.0, 4.0, 4.0], mixed_precision=None)
# training-only keys
TINY_TRAIN = dict(
    TINY_NET,
    patch_size=[16, 16, 16],
    batch_size=1,
    max_epochs=1,
    val_interval=1,
    use_mlflow=False,
    seed=0,
    discriminator_num_layers=2,  # three strided layers do not fit a 16^3 patch
    discriminator_channels=8,
    adv_weight=0.01,  # the critic's code paths (off by default)
)
TINY_DIFFUSION = dict(
    image_size=[16, 16, 16],
    epoch_length=None,  # one pass over the latents
    diffusion_channels=[8, 8],
    diffusion_attention_levels=[False, False],
    diffusion_num_head_channels=8,
    # 4 channels per group: the timestep and class embeddings enter each residual block as a shift per
    # channel before its GroupNorm, which a group of one channel would subtract whole
    diffusion_norm_num_groups=2,
    num_train_timesteps=50,
)

# shapes and spacings of the tiny phantoms (x, y, z): different sizes and voxel sizes, so that
# resampling and padding are exercised; at 4 mm they are ~15^3 voxels
SHAPES = ((32, 36, 28), (30, 34, 26), (28, 32, 24), (34, 38, 30))
SPACINGS = ((2.0, 2.0, 2.0), (1.8, 1.8, 2.2), (2.2, 2.2, 2.0), (2.0, 2.0, 2.4))


def affine_for(shape, spacing, origin_shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A RAS affine with the given voxel size, centred on the origin (plus a shift)."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(n - 1) * s / 2 + o for n, s, o in zip(shape, spacing, origin_shift)]
    return affine


def phantom(shape=(32, 36, 28), spacing=(2.0, 2.0, 2.0), seed: int = 0) -> np.ndarray:
    """A head-like phantom (the demo dataset's generator) in an MRI-like intensity scale."""
    return _phantom(shape, spacing, np.random.default_rng(seed)).astype(np.float32)


def write_volume(path, array: np.ndarray, spacing=(2.0, 2.0, 2.0), affine=None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if affine is None:
        affine = affine_for(array.shape[:3], spacing, origin_shift=(3.0, -5.0, 7.0))
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def write_dataset(folder, num_volumes: int = 4, seed: int = 0, suffix: str = ".nii.gz") -> list[Path]:
    """``num_volumes`` tiny phantoms of different shapes and spacings in ``folder``."""
    paths = []
    for i in range(num_volumes):
        shape, spacing = SHAPES[i % len(SHAPES)], SPACINGS[i % len(SPACINGS)]
        paths.append(write_volume(Path(folder) / f"vol_{i:02d}{suffix}", phantom(shape, spacing, seed + i), spacing))
    return paths


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes, to show that a run left inputs untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def train_overrides(tmp: Path, dataset_dir, **overrides) -> dict:
    """Overrides that keep a training run tiny and inside ``tmp``."""
    values = dict(
        TINY_TRAIN,
        bundle_root=str(REPO),
        dataset_dir=str(dataset_dir),
        output_dir=str(tmp / "out"),
        tracking_uri=f"sqlite:///{tmp / 'mlruns.db'}",
    )
    values.update(overrides)
    return values


def error_text(error: BaseException) -> str:
    """The messages of an error and of every error it was raised from or during, one per line:
    MONAI's config parser wraps the error an expression raises."""
    parts = []
    while error is not None:
        parts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


def make_workflow(config_file, **overrides):
    """MONAI's ConfigWorkflow (what ``python -m monai.bundle run`` builds), in this process."""
    from monai.bundle import ConfigWorkflow

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "config runs code" notice and missing metadata.json
        return ConfigWorkflow(
            config_file=config_file,
            meta_file=None,
            logging_file=False,
            workflow_type=None,
            **overrides,
        )


def run_workflow(config_file, **overrides):
    """initialize, run and finalize a bundle workflow in-process; returns it for inspection."""
    workflow = make_workflow(config_file, **overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


def cli_value(value) -> str:
    """A config value as the bundle CLI (python-fire) takes it."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(cli_value(v) for v in value) + "]"
    return str(value)


def run_bundle(config_file, run_id: str | None = None, timeout: float = 300, **overrides) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` in a subprocess from the repository root; returns the result
    with stdout and stderr merged into ``.stdout``."""
    config_arg = config_file if isinstance(config_file, str) else "[" + ",".join(f"'{c}'" for c in config_file) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run"]
    if run_id is not None:
        cmd.append(run_id)
    cmd += ["--config_file", config_arg]
    for key, value in overrides.items():
        cmd += [f"--{key}", cli_value(value)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["PYTHONWARNINGS"] = "ignore"
    return subprocess.run(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )


# ---------------------------------------------------------------------------------------------
# session fixtures: a tiny dataset, a trained autoencoder and a trained diffusion model


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Four tiny phantoms; read-only for the tests that use it."""
    folder = tmp_path_factory.mktemp("tiny_dataset")
    write_dataset(folder, 4)
    return folder


@pytest.fixture(scope="session")
def trained_autoencoder(tmp_path_factory, tiny_dataset) -> dict:
    """A tiny autoencoder trained for two epochs of 30 iterations with factors [2, 2] (enough for
    reconstructions with structure: ~15 dB validation PSNR over the body), the adversarial loss on from epoch 2: its output
    folder, the overrides it was trained with and the trainer's epoch-2 metrics (the uninterrupted
    reference of the resume test)."""
    tmp = tmp_path_factory.mktemp("trained_autoencoder")
    overrides = train_overrides(
        tmp,
        tiny_dataset,
        max_epochs=2,
        epoch_length=30,
        learning_rate=2e-3,
        downsample_factors=[2, 2],
        adv_warmup_epochs=1,
    )
    workflow = run_workflow(AE_CONFIG, **overrides)
    trainer = workflow.parser.get_parsed_content("train#trainer", lazy=True)
    out = tmp / "out"
    assert (out / "model_autoencoder.pt").is_file()
    return {
        "dir": out,
        "ckpt": out / "model_autoencoder.pt",
        "overrides": overrides,
        "metrics": dict(trainer.state.metrics),
        "epoch": trainer.state.epoch,
    }


@pytest.fixture(scope="session")
def trained_diffusion(tmp_path_factory, tiny_dataset, trained_autoencoder) -> dict:
    """A tiny class-conditioned diffusion model trained for one epoch on the latents of
    ``trained_autoencoder``, the tiny dataset's volumes labelled "a" or "b" in a datalist JSON.

    ``scripts.diffusion.encode_volumes`` is observed while it runs (the volumes it is given and the
    latents it returns), so a test can recompute the latents and the scale factor with its own copy
    of the autoencoder."""
    import json

    import scripts.diffusion

    tmp = tmp_path_factory.mktemp("trained_diffusion")
    data = tmp / "data"
    data.mkdir()
    items = []
    for i, path in enumerate(sorted(Path(tiny_dataset).glob("*.nii.gz"))):
        (data / path.name).write_bytes(path.read_bytes())
        items.append({"image": path.name, "class": "ab"[i % 2]})
    (data / "datalist.json").write_text(json.dumps({"training": items}))
    overrides = train_overrides(
        tmp,
        data,
        downsample_factors=[2, 2],
        autoencoder_ckpt=str(trained_autoencoder["ckpt"]),
        condition_key="class",
        **TINY_DIFFUSION,
    )
    seen = {"images": [], "calls": 0}
    original = scripts.diffusion.encode_volumes

    def observed(autoencoder, data_loader, device, flips=True):
        def batches():
            for batch in data_loader:
                seen["images"].append(batch["image"].as_tensor().clone())
                yield batch

        seen["calls"] += 1
        seen["latents"] = original(autoencoder, batches(), device, flips)
        return seen["latents"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scripts.diffusion, "encode_volumes", observed)
        workflow = run_workflow(DIFFUSION_CONFIGS, **overrides)
    out = tmp / "out"
    assert (out / "model.pt").is_file()
    return {"dir": out, "ckpt": out / "model.pt", "data": data, "overrides": overrides, "workflow": workflow, "encoded": seen}


@pytest.fixture(autouse=True)
def _restore_global_random_state():
    """Bundle runs in this process reseed the global RNGs; leave them as they were for other tests."""
    states = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.random.set_rng_state(states[0])
    np.random.set_state(states[1])
    random.setstate(states[2])
