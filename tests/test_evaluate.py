"""Tests for scripts/evaluate.py (``python -m scripts.evaluate``): a folder of tiny volumes scored with a
tiny autoencoder checkpoint in the bundle's format, a failing file among good ones, checkpoints with
and without their preprocessing recorded. Everything is ~30^3 voxels on the CPU: a few seconds."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from conftest import SHAPES, SPACINGS, TINY_AUTOENCODER, phantom, write_volume
from scripts import evaluate
from scripts.checkpoints import save_atomic
from scripts.networks import FactorAutoencoderKL

PREPROCESSING = dict(
    spacing=None, modality="mri", intensity_percentiles=[0.5, 99.5], ct_window=[-1000, 1000], patch_size=[16, 16, 16]
)
CLI = ["--device", "cpu", "--mixed_precision", "none"]


def autoencoder_args(factors=(2, 2), norm="channel") -> dict:
    args = dict(TINY_AUTOENCODER, channels=list(TINY_AUTOENCODER["channels"]), use_checkpoint=False)
    args.update(attention_levels=list(args["attention_levels"]), downsample_factors=list(factors), layout="space_to_depth")
    if norm is not None:
        args["norm"] = norm
    return args


def write_checkpoint(path, factors=(2, 2), preprocessing=PREPROCESSING, norm="channel", seed=0):
    """An autoencoder checkpoint as the training config saves model_autoencoder.pt (untrained weights)."""
    torch.manual_seed(seed)
    args = autoencoder_args(factors, norm)
    network = FactorAutoencoderKL(**args)
    ckpt = {"autoencoder": network.state_dict(), "autoencoder_args": args}
    if norm is None:  # saved before norm existed: neither the args nor the state dict record it
        del ckpt["autoencoder"]["norm"]
    if preprocessing is not None:
        ckpt["preprocessing"] = preprocessing
    save_atomic(ckpt, path)
    return path


def write_volumes(folder, n=2):
    return [
        write_volume(folder / f"vol_{i}.nii.gz", phantom(SHAPES[i], SPACINGS[i], seed=i), SPACINGS[i]) for i in range(n)
    ]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Two good volumes and a corrupt one, evaluated once with a 4x checkpoint."""
    tmp = tmp_path_factory.mktemp("evaluate")
    volumes = write_volumes(tmp / "in")
    (tmp / "in" / "zz_corrupt.nii.gz").write_bytes(b"\x1f\x8b not a volume" * 20)
    ckpt = write_checkpoint(tmp / "model_autoencoder.pt")
    status = evaluate.main(["--dataset_dir", str(tmp / "in"), "--checkpoint", str(ckpt), "--output_dir", str(tmp / "out"), *CLI])
    return dict(tmp=tmp, volumes=volumes, ckpt=ckpt, status=status, out=tmp / "out")


def test_evaluation_tables(evaluated):
    out = evaluated["out"]
    assert (out / "evaluation.csv").is_file() and (out / "evaluation.md").is_file()
    rows = {row["file"]: row for row in read_rows(out / "evaluation.csv")}
    assert sorted(rows) == ["vol_0.nii.gz", "vol_1.nii.gz", "zz_corrupt.nii.gz"]
    for i in range(2):
        row = rows[f"vol_{i}.nii.gz"]
        assert row["error"] == ""
        assert row["shape"] == "x".join(map(str, SHAPES[i]))  # scored in the file's own grid
        assert row["spacing"] == "x".join(f"{z:g}" for z in SPACINGS[i])
        values = {k: float(row[k]) for k in ("psnr", "psnr_floor", "ssim", "ssim_floor", "mae", "mae_floor")}
        assert all(math.isfinite(v) for v in values.values()), row
        assert 0 < values["psnr"] < 60 and 0 < values["psnr_floor"] < 60
        assert -1 <= values["ssim"] <= 1 and 0 < values["ssim_floor"] <= 1 and values["mae"] > 0
        # the floor (average-pool by 4 + trilinear) is a fair reconstruction; an untrained network is not
        assert values["psnr_floor"] > values["psnr"]
    markdown = (out / "evaluation.md").read_text()
    assert str(evaluated["ckpt"]) in markdown and "| vol_0.nii.gz | 32x36x28 |" in markdown
    assert "**mean of 2**" in markdown and "| zz_corrupt.nii.gz | failed: " in markdown


def test_a_failing_volume_is_a_row_and_exit_status_1(evaluated):
    assert evaluated["status"] == 1
    (row,) = [r for r in read_rows(evaluated["out"] / "evaluation.csv") if r["file"] == "zz_corrupt.nii.gz"]
    assert "zz_corrupt.nii.gz" in row["error"] and row["psnr"] == "" and row["psnr_floor"] == ""


def test_all_good_volumes_exit_status_0_and_never_overwrite(tmp_path, evaluated):
    ckpt = evaluated["ckpt"]
    inputs = tmp_path / "in"
    write_volumes(inputs)
    out = tmp_path / "out"
    args = ["--dataset_dir", str(inputs), "--checkpoint", str(ckpt), "--output_dir", str(out), *CLI]
    assert evaluate.main(args) == 0
    first = (out / "evaluation.csv").read_bytes()
    assert evaluate.main(args) == 0
    assert (out / "evaluation.csv").read_bytes() == first and (out / "evaluation_1.csv").is_file()
    assert (out / "evaluation_1.md").is_file()
    # deterministic: the same numbers again
    assert read_rows(out / "evaluation_1.csv")[0]["psnr"] == read_rows(out / "evaluation.csv")[0]["psnr"]


def test_network_and_preprocessing_come_from_the_checkpoint(tmp_path):
    """An 8x checkpoint scores against an 8x floor (coarser, so lower than the 4x floor), and a
    recorded spacing resamples (the table stays in the file's own grid)."""
    inputs = tmp_path / "in"
    write_volumes(inputs, n=1)
    floors = {}
    for name, factors, preprocessing in (
        ("4x", (2, 2), PREPROCESSING),
        ("8x", (4, 2), PREPROCESSING),
        ("4x_4mm", (2, 2), dict(PREPROCESSING, spacing=[4.0, 4.0, 4.0])),
    ):
        ckpt = write_checkpoint(tmp_path / f"{name}.pt", factors, preprocessing)
        out = tmp_path / name
        assert evaluate.main(["--dataset_dir", str(inputs), "--checkpoint", str(ckpt), "--output_dir", str(out), *CLI]) == 0
        (row,) = read_rows(out / "evaluation.csv")
        assert row["shape"] == "32x36x28"
        floors[name] = float(row["psnr_floor"])
    assert floors["8x"] < floors["4x"] and floors["4x_4mm"] < floors["4x"]


def test_checkpoint_without_preprocessing_needs_spacing_and_modality(tmp_path):
    """An older checkpoint (no preprocessing, no norm recorded: GroupNorm) is refused clearly unless
    the command line says how it was trained, and then evaluates."""
    ckpt = write_checkpoint(tmp_path / "old.pt", preprocessing=None, norm=None)
    inputs = tmp_path / "in"
    write_volumes(inputs, n=1)
    base = ["--dataset_dir", str(inputs), "--checkpoint", str(ckpt), "--output_dir", str(tmp_path / "out"), *CLI]
    with pytest.raises(ValueError) as info:
        evaluate.main(base)
    message = str(info.value)
    assert str(ckpt) in message and "does not record its preprocessing" in message
    assert "'spacing'" in message and "--spacing" in message
    with pytest.raises(ValueError, match=r"\['modality'\] missing"):
        evaluate.main([*base, "--spacing", "none"])
    assert not (tmp_path / "out" / "evaluation.csv").exists()
    assert evaluate.main([*base, "--spacing", "none", "--modality", "mri"]) == 0
    (row,) = read_rows(tmp_path / "out" / "evaluation.csv")
    assert row["error"] == "" and float(row["psnr_floor"]) > 0


def test_not_an_autoencoder_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    save_atomic({"diffusion": {"w": torch.ones(1)}, "scale_factor": 1.0}, path)
    with pytest.raises(ValueError, match=r"holds \['diffusion', 'scale_factor'\]; expected an autoencoder checkpoint"):
        evaluate.Evaluation(path, tmp_path / "out", device="cpu")


def test_markdown_table_means_and_gain():
    rows = [
        dict(file="a", shape="2x2x2", spacing="1x1x1", psnr="30", psnr_floor="25", ssim="0.9", ssim_floor="0.8",
             mae="10", mae_floor="20", seconds="1", error=""),
        dict(file="b", shape="2x2x2", spacing="1x1x1", psnr="20", psnr_floor="21", ssim="0.7", ssim_floor="0.6",
             mae="30", mae_floor="40", seconds="1", error=""),
        dict({k: "" for k in evaluate.FIELDS}, file="c", error="ValueError: broken"),
    ]
    table = evaluate.markdown_table(rows, "m.pt")
    assert "| a | 2x2x2 | 1x1x1 | 30.00 | 25.00 | +5.00 |" in table
    assert "| b | 2x2x2 | 1x1x1 | 20.00 | 21.00 | -1.00 |" in table
    assert "| c | failed: ValueError: broken |" in table
    assert "| **mean of 2** | | | 25.00 | 23.00 | +2.00 | 0.800 | 0.700 | 20.0 | 30.0 |" in table
