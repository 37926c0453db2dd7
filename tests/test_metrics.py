"""Tests for scripts/metrics.py: the bundle's one quality measure (PSNR/SSIM over the body, clipped to
the input's [p0.5, p99.5]; MAE in the input's units), its MONAI metric form and the interpolation
floor. Volumes are ~32^3 voxels, so the file runs in about a second."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from conftest import phantom
from scripts.metrics import (
    BODY_DILATION,
    PERCENTILES,
    BodyQualityMetric,
    body_mask,
    interpolation_floor,
    masked_quality,
    score,
)

SHAPE = (32, 36, 28)
BODY_SHAPE = (48, 48, 40)
SSIM_RADIUS = 5  # the SSIM window (11 voxels) reaches this far around a body voxel


def body_volume(shape=BODY_SHAPE, seed: int = 0, background: float = 0.0) -> np.ndarray:
    """A textured ellipsoid (values ~600 +- 80) in an exactly constant background, so that body and
    air are unambiguous; 12 voxels of air at each face."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) / (n / 2 - 12) for n in shape], indexing="ij")
    inside = sum(g**2 for g in grid) <= 1
    texture = gaussian_filter(rng.normal(size=shape), 1.5)
    volume = np.full(shape, background, np.float32)
    volume[inside] = (600 + 1000 * texture[inside]).astype(np.float32)
    return volume


def far_from_body(reference: np.ndarray) -> np.ndarray:
    """Voxels that neither the body mask nor any SSIM window centred in it reaches."""
    mask = body_mask(to01(reference, reference)).float()
    reach = torch.nn.functional.max_pool3d(mask, 2 * SSIM_RADIUS + 1, 1, SSIM_RADIUS) > 0
    return ~reach[0, 0].numpy()


def to01(volume: np.ndarray, reference: np.ndarray) -> torch.Tensor:
    low, high = np.percentile(reference, PERCENTILES)
    return torch.from_numpy(((volume - low) / (high - low)).astype(np.float32))[None, None]


def test_blur_scores_lower_than_light_noise():
    """The measure prefers a faithful, slightly noisy reconstruction to a smooth, blurry one."""
    reference = phantom(SHAPE, seed=3)
    low, high = np.percentile(reference, PERCENTILES)
    blurred = gaussian_filter(reference, sigma=1.5)
    noisy = reference + np.random.default_rng(0).normal(scale=0.01 * (high - low), size=reference.shape)
    blur, noise = score(reference, blurred), score(reference, noisy.astype(np.float32))
    assert blur["psnr"] < noise["psnr"] and blur["ssim"] < noise["ssim"], (blur, noise)
    assert noise["psnr"] > 35 and 0.9 < noise["ssim"] <= 1.0
    assert blur["mae"] > noise["mae"] > 0


def test_identical_volumes():
    reference = phantom(SHAPE, seed=4)
    result = score(reference, reference.copy())
    assert result["psnr"] == math.inf and result["mae"] == 0.0
    assert result["ssim"] == pytest.approx(1.0, abs=1e-5)


def test_body_mask_is_the_body_dilated():
    reference = body_volume()
    ref01 = to01(reference, reference)
    mask = body_mask(ref01)
    assert mask.shape == ref01.shape and mask.dtype == torch.bool
    body = torch.from_numpy(reference > 0)[None, None]
    assert mask[body].all(), "every body voxel counts"
    assert not mask[0, 0, :3].any() and not mask[0, 0, :, :, -3:].any(), "the air at the faces does not"
    # dilated by BODY_DILATION voxels (a cube): a voxel that far from the body counts, one further does not
    pooled = torch.nn.functional.max_pool3d(body.float(), 2 * BODY_DILATION + 1, 1, BODY_DILATION) > 0
    assert torch.equal(mask, pooled)
    assert mask.sum() > body.sum()


def test_background_far_from_the_body_does_not_change_the_score():
    """A model's errors in the air do not count: a blurry model cannot hide behind an easy background,
    nor is a good one punished for noise outside the body."""
    reference = body_volume()
    test = gaussian_filter(reference, 0.7).astype(np.float32)
    base = score(reference, test)
    ref01 = to01(reference, reference)
    far = far_from_body(reference)
    assert far.sum() > 10000
    changed = test.copy()
    changed[far] = np.random.default_rng(1).uniform(-500, 5000, size=int(far.sum()))
    assert score(reference, changed) == base
    # ... while a change inside the body does count
    inside = body_mask(ref01)[0, 0].numpy()
    worse = test.copy()
    worse[inside] += np.random.default_rng(2).normal(scale=300, size=int(inside.sum())).astype(np.float32)
    result = score(reference, worse)
    assert result["psnr"] < base["psnr"] - 3 and result["ssim"] < base["ssim"] and result["mae"] > base["mae"]
    # and a whole-volume PSNR would have moved with the background change
    whole = lambda t: 10 * math.log10(1.0 / float(((to01(t, reference) - ref01).clamp(-1, 1) ** 2).mean()))  # noqa: E731
    assert abs(whole(changed) - whole(test)) > 1.0


@pytest.mark.parametrize("kind", ["mri", "ct"])
def test_mae_is_in_the_input_units(kind):
    """A reconstruction 10 units too bright inside the body has an MAE of 10 (HU for CT)."""
    reference = body_volume(background=0.0 if kind == "mri" else -1000.0)  # CT: air at -1000 HU
    mask = body_mask(to01(reference, reference))[0, 0].numpy()
    shifted = reference.copy()
    shifted[mask] += 10.0
    assert score(reference, shifted)["mae"] == pytest.approx(10.0, abs=1e-3)
    # a shift everywhere: the same, the air is not counted; and the sign does not matter
    assert score(reference, reference + 10.0)["mae"] == pytest.approx(10.0, abs=1e-3)
    assert score(reference, reference - 10.0)["mae"] == pytest.approx(10.0, abs=1e-3)
    # errors in the air alone: no MAE
    air = reference.copy()
    air[~mask] += 500.0
    assert score(reference, air)["mae"] == 0.0


def test_masked_quality_clips_to_the_unit_range():
    """Both volumes are clipped to [0, 1] (the input's [p0.5, p99.5]): overshoot above the range costs
    nothing where the reference is at its top, and values beyond do not dominate PSNR."""
    torch.manual_seed(0)
    ref = torch.rand(1, 1, 16, 16, 16)
    ref[..., :4, :, :] = 1.0
    over = ref.clone()
    over[..., :4, :, :] = 7.0  # far above 1 where the reference is 1
    mask = torch.ones_like(ref, dtype=torch.bool)
    assert masked_quality(ref, over, mask)["psnr"] == math.inf
    below = ref.clone()
    below[..., 4:, :, :] = -3.0  # far below 0: costs as much as 0 would
    zero = ref.clone()
    zero[..., 4:, :, :] = 0.0
    assert masked_quality(ref, below, mask) == masked_quality(ref, zero, mask)
    # no body at all: no number
    empty = masked_quality(ref, ref, torch.zeros_like(mask))
    assert math.isnan(empty["psnr"]) and math.isnan(empty["ssim"])


def test_body_quality_metric_is_masked_quality_per_volume():
    torch.manual_seed(0)
    reference = torch.stack([to01(body_volume(seed=s), body_volume(seed=s))[0] for s in (0, 1)])
    test = reference + 0.05 * torch.randn_like(reference)
    for quality in ("psnr", "ssim"):
        metric = BodyQualityMetric(quality)
        values = metric(test, reference)
        assert values.shape == (2, 1)
        for i in range(2):
            expected = masked_quality(reference[i : i + 1], test[i : i + 1], body_mask(reference[i : i + 1]))[quality]
            assert values[i, 0].item() == pytest.approx(expected, rel=1e-6)
        assert metric.aggregate().item() == pytest.approx(values.mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="quality must be 'psnr' or 'ssim'"):
        BodyQualityMetric("mae")


def test_interpolation_floor():
    factor = (4, 2, 2)
    constant = torch.full((1, 1, 16, 12, 8), 3.5)
    torch.testing.assert_close(interpolation_floor(constant, factor), constant)
    # a linear ramp: the block means lie on it, and trilinear interpolation between block centres
    # reproduces it exactly away from the borders
    ramp = torch.arange(16.0).view(1, 1, 16, 1, 1).expand(1, 1, 16, 12, 8).contiguous()
    floor = interpolation_floor(ramp, factor)
    assert floor.shape == ramp.shape
    torch.testing.assert_close(floor[:, :, 2:-2], ramp[:, :, 2:-2])
    # detail finer than the factor is lost: a checkerboard along x averages out
    checker = (torch.arange(16.0) % 2).view(1, 1, 16, 1, 1).expand(1, 1, 16, 12, 8).contiguous()
    torch.testing.assert_close(interpolation_floor(checker, factor), torch.full_like(checker, 0.5))
