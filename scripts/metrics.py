"""The bundle's one quality measure of a reconstruction, used by evaluation, inference and the
validation of training alike.

- Both volumes are clipped to the input's [p0.5, p99.5] range, which is also the data range of PSNR
  and SSIM (on volumes the bundle's preprocessing scaled to [0, 1], that range is [0, 1]).
- Only the body counts: voxels above p0.5 + 5% of that range, dilated by 3 voxels, so that a blurry
  model cannot hide behind an easy, empty background.
- The mean absolute error is taken in the input's own units (HU for CT), over the same voxels, unclipped.
- The interpolation floor is what no learning gives at the same factor: the volume average-pooled by
  the network's total factor per axis and upsampled trilinearly, one value per latent voxel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics.regression import RegressionMetric, compute_ssim_and_cs

__all__ = ["BodyQualityMetric", "body_mask", "interpolation_floor", "masked_quality", "score"]

PERCENTILES = (0.5, 99.5)
BODY_THRESHOLD = 0.05
BODY_DILATION = 3


def body_mask(reference01: torch.Tensor, threshold: float = BODY_THRESHOLD, dilation: int = BODY_DILATION) -> torch.Tensor:
    """Voxels of a [0, 1]-scaled volume (``(B, C, *spatial)``) above ``threshold``, dilated by
    ``dilation`` voxels (a cube), any channel counting."""
    mask = (reference01 > threshold).any(dim=1, keepdim=True).float()
    if dilation > 0:
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[mask.dim() - 2]
        mask = pool(mask, kernel_size=2 * dilation + 1, stride=1, padding=dilation)
    return mask > 0


def masked_quality(reference01: torch.Tensor, test01: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """PSNR and SSIM (data range 1) of ``test01`` against ``reference01`` over ``mask``, both volumes
    clipped to [0, 1] first. Shapes ``(1, C, *spatial)``; the SSIM map (Gaussian window of 11, or the
    largest odd size an axis allows) is averaged over the mask voxels it covers."""
    ref, test = reference01.float().clamp(0, 1), test01.float().clamp(0, 1)
    mask = mask.expand_as(ref)
    if not mask.any():
        return {"psnr": float("nan"), "ssim": float("nan")}
    mse = (ref - test)[mask].pow(2).mean().item()
    psnr = 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")
    spatial = ref.shape[2:]
    kernel = [min(11, s if s % 2 else s - 1) for s in spatial]
    ssim_map, _ = compute_ssim_and_cs(
        test, ref, spatial_dims=len(spatial), kernel_size=kernel, kernel_sigma=[1.5 * k / 11 for k in kernel], data_range=1.0
    )
    inner = mask[(..., *(slice(k // 2, s - k // 2) for k, s in zip(kernel, spatial)))]
    ssim = ssim_map[inner].mean().item() if inner.any() else float("nan")
    return {"psnr": psnr, "ssim": ssim}


class BodyQualityMetric(RegressionMetric):
    """The measure as a MONAI metric on volumes already scaled to [0, 1] (the bundle's preprocessing
    maps p0.5 and p99.5 of each MRI volume there): ``quality`` is ``"psnr"`` or ``"ssim"``. For the
    validation of training, where it equals the file-grid measure up to resampling."""

    def __init__(self, quality: str = "psnr", reduction: str = "mean", get_not_nans: bool = False) -> None:
        super().__init__(reduction=reduction, get_not_nans=get_not_nans)
        if quality not in ("psnr", "ssim"):
            raise ValueError(f"quality must be 'psnr' or 'ssim', got {quality!r}.")
        self.quality = quality

    def _compute_metric(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        values = [
            masked_quality(y[i : i + 1], y_pred[i : i + 1], body_mask(y[i : i + 1]))[self.quality] for i in range(len(y))
        ]
        return torch.tensor(values, device=y.device).unsqueeze(1)


def score(reference: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """The measure in the input's own units: ``reference`` and ``test`` are arrays of one grid."""
    low, high = (float(v) for v in np.percentile(reference, PERCENTILES))
    scale = max(high - low, 1e-12)
    ref = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32))[None, None]
    out = torch.from_numpy(np.ascontiguousarray(test, dtype=np.float32))[None, None]
    ref01, out01 = (ref - low) / scale, (out - low) / scale
    mask = body_mask(ref01)
    result = masked_quality(ref01, out01, mask)
    result["mae"] = (ref - out).abs()[mask].mean().item() if mask.any() else float("nan")
    return result


def interpolation_floor(image: torch.Tensor, factor: Sequence[int]) -> torch.Tensor:
    """Average-pool by ``factor`` per axis and upsample trilinearly back: one value per latent voxel."""
    pooled = F.avg_pool3d(image, kernel_size=tuple(factor), stride=tuple(factor))
    return F.interpolate(pooled, size=image.shape[2:], mode="trilinear", align_corners=False)
