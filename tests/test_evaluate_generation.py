"""Tests for scripts/evaluate_generation.py: the Fréchet distance (MONAI's definition, without
SciPy), MS-SSIM at the scales a volume allows, copy detection (also of a copy with speckle around
it or inside it), and the command on the session's tiny class-conditioned diffusion model (conftest.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.metrics import SSIMMetric
from torch.nn import functional as F

from scripts import evaluate_generation as eg
from conftest import phantom


def test_frechet_distance_is_monais_and_grows_with_the_gap():
    torch.manual_seed(0)
    a = torch.randn(300, 6)
    near, far = torch.randn(300, 6) * 1.1 + 0.1, torch.randn(300, 6) * 2 + 3
    assert eg.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert 0 < eg.frechet_distance(a, near) < eg.frechet_distance(a, far)
    try:
        from monai.metrics import FIDMetric

        expected = float(FIDMetric()(a.double(), near.double()))
    except TypeError:  # newer SciPy: MONAI's FIDMetric passes sqrtm an argument it no longer takes
        pytest.skip("MONAI's FIDMetric does not run with this SciPy")
    assert eg.frechet_distance(a, near) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_rank_deficient_features_is_finite():
    """A few volumes give fewer feature rows than dimensions: the covariances are singular."""
    torch.manual_seed(0)
    a, b = torch.randn(5, 32), torch.randn(7, 32) + 1
    value = eg.frechet_distance(a, b)
    assert np.isfinite(value) and value > 0


@pytest.mark.parametrize("size, scales", [((128, 128, 128), 5), ((64, 64, 64), 4), ((16, 16, 16), 2)])
def test_ms_ssim_uses_the_scales_the_volume_allows(size, scales):
    metric = eg.ms_ssim_metric(size)
    assert len(metric.weights) == scales and sum(metric.weights) == pytest.approx(1.0)
    if min(size) > 64:
        return  # MONAI accepts it (its size rule is what ms_ssim_metric applies); computing it takes seconds
    torch.manual_seed(0)
    x = torch.rand(1, 1, *size)
    assert float(metric(x, x).mean()) == pytest.approx(1.0, abs=1e-4)
    assert float(metric(x, torch.rand(1, 1, *size)).mean()) < 0.5


def test_nearest_finds_a_copy():
    torch.manual_seed(0)
    train = [torch.rand(1, 16, 16, 16) for _ in range(3)]
    samples = [train[1].clone(), torch.rand(1, 16, 16, 16)]
    near = eg.nearest(samples, train, SSIMMetric(spatial_dims=3, data_range=1.0))
    assert near[0] == pytest.approx(1.0, abs=1e-5) and near[1] < 0.5


def head(seed: int) -> torch.Tensor:
    """A phantom with clean air around it, as the training volumes have."""
    v = torch.from_numpy(phantom((32, 36, 28), seed=seed) / 1000.0).clamp(0, 1)
    return F.pad(torch.where(v > 0.1, v, 0), (10, 10, 8, 8, 8, 8))[None].float()


def test_a_copy_with_speckle_in_its_empty_space_is_still_a_copy():
    """Speckle in the air around a sample pulls its whole-volume SSIM down; compared with the empty space
    set to 0 and smoothed, the copy is found, and another anatomy stays below the copy."""
    train = [head(i) for i in range(3)]
    speckle = torch.rand(train[1].shape, generator=torch.Generator().manual_seed(0)) * 0.04
    copy = torch.where(train[1] > 0, train[1], speckle)
    assert eg.empty_space(copy) == pytest.approx(0.02, abs=0.002) and eg.empty_space(train[1]) == 0.0
    ssim = SSIMMetric(spatial_dims=3, data_range=1.0)
    assert eg.nearest([copy], train, ssim)[0] < 0.6
    assert all(torch.equal(eg.body(v), v) for v in train)  # a real volume's air is 0 already
    seen = [eg.compared(v) for v in train]
    found = eg.nearest([eg.compared(copy)], seen, ssim)[0]
    assert found > 0.97 and eg.nearest([seen[2]], seen[:2], ssim)[0] < found


def test_a_copy_with_speckle_inside_the_head_is_still_a_copy():
    """Speckle inside the head hides a copy from SSIM as much as speckle around it; smoothed by
    ``SMOOTHING`` voxels, the copy is nearer its training volume than another anatomy is."""
    train = [head(i) for i in range(3)]
    noise = torch.randn(train[1].shape, generator=torch.Generator().manual_seed(0)) * 0.2
    copy = torch.where(train[1] > 0, (train[1] + noise).clamp(0, 1), 0)
    ssim = SSIMMetric(spatial_dims=3, data_range=1.0)
    line = max(eg.nearest([train[i]], [train[j] for j in range(3) if j != i], ssim)[0] for i in range(3))
    assert eg.nearest([eg.body(copy)], train, ssim)[0] < line  # unsmoothed, the copy passes as a new head
    seen = [eg.compared(v) for v in train]
    line = max(eg.nearest([seen[i]], [seen[j] for j in range(3) if j != i], ssim)[0] for i in range(3))
    assert eg.nearest([eg.compared(copy)], seen, ssim)[0] > line


def test_empty_space_is_the_mean_of_the_eight_corner_cubes():
    volume = torch.zeros(1, 16, 16, 8)
    volume[:, 4:12, 4:12, 2:6] = 1.0  # a body in the middle: the corners are air
    assert eg.empty_space(volume) == 0.0
    volume[:, -2:, :2, -1:] = 0.8  # speckle filling one corner cube (2 x 2 x 1 at this size)
    assert eg.empty_space(volume) == pytest.approx(0.1)


def test_evaluate_generation_command(tmp_path, trained_diffusion, trained_autoencoder):
    def argv(out, num_samples=2):
        return [
            "--diffusion_ckpt", str(trained_diffusion["ckpt"]),
            "--autoencoder_ckpt", str(trained_autoencoder["ckpt"]),
            "--feature_ckpt", str(trained_autoencoder["ckpt"]),
            "--train_dir", str(trained_diffusion["data"]),
            "--val_dir", str(trained_diffusion["data"]),
            "--output_dir", str(out),
            "--num_samples", str(num_samples),
            "--num_inference_steps", "3",
            "--device", "cpu",
        ]  # fmt: skip

    out = tmp_path / "eval"
    assert eg.main(argv(out)) == 0
    results = json.loads((out / "generation.json").read_text())
    assert set(results["classes"]) == {"a", "b"}
    assert results["settings"]["smoothing"] == eg.SMOOTHING  # how the copies were compared travels with them
    # each training volume's nearest other, the largest of which is the copy line, named in the report
    pairs = results["train_nearest"]
    assert len(pairs) == 4 and all(pair["nearest"] in pairs and pair["nearest"] != volume for volume, pair in pairs.items())
    assert max(pair["ssim"] for pair in pairs.values()) == pytest.approx(results["classes"]["a"]["train_nearest_ssim_max"])
    assert "The copy line" in (out / "generation.md").read_text()
    for name, row in results["classes"].items():
        assert row["samples"] == 2 and row["train_volumes"] == 2 and row["held_out_volumes"] == 2
        # the held-out volumes are the training ones here: real against real is zero, their reconstructions
        # are not quite the volumes, and noise is far
        assert row["fd_real"] == pytest.approx(0.0, abs=1e-6) and 0 < row["fd_autoencoder"] < row["fd_noise"]
        assert row["copies"] == 0 and -1 <= row["nearest_ssim_max"] <= 1  # SSIM, which can dip below 0
        assert len(row["nearest_volumes"]) == 2 and {Path(v).name for v in pairs} >= set(row["nearest_volumes"])
        assert row["held_out_nearest_ssim_median"] == pytest.approx(1.0)  # each held-out volume is a training volume
        assert all(0 <= row[k] <= 1 for k in ("empty_samples", "empty_train", "empty_autoencoder"))
        assert (out / f"grid_{name}.png").stat().st_size > 0
        assert len(list((out / "samples" / name).glob(f"sample_{name}_seed0_*.nii.gz"))) == 2
    assert "| a | 2 |" in (out / "generation.md").read_text()
    assert "Nearest training volumes of the a samples: `" in (out / "generation.md").read_text()
    # a second run into the same folder, or one sample (no diversity to measure), is refused before any work
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(SystemExit):
        eg.main(argv(out))
    one = tmp_path / "one_volume"
    one.mkdir()
    shutil.copy(sorted(trained_diffusion["data"].glob("*.nii.gz"))[0], one)
    lone = argv(tmp_path / "eval_one")
    lone[lone.index("--train_dir") + 1] = str(one)
    with pytest.raises(SystemExit):
        eg.main(lone)  # nothing to measure how near two training volumes are
    assert not (tmp_path / "eval_one").exists()
    assert sorted(p.name for p in out.iterdir()) == before
    with pytest.raises(SystemExit):
        eg.main(argv(tmp_path / "one", num_samples=1))
    assert not (tmp_path / "one").exists()
