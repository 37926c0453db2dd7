"""The autoencoder's losses beside L1: the KL term of the VAE, MONAI's perceptual loss (which needs
downloaded weights, so it may be absent) and the auxiliary losses that need no download."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn
from monai.losses import JukeboxLoss, PerceptualLoss, SSIMLoss
from torch.fft import fftn

__all__ = ["SpectralLoss", "build_auxiliary_losses", "build_perceptual_loss", "kl_loss"]

logger = logging.getLogger(__name__)


def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL divergence to the unit Gaussian, summed over the latent and averaged over the batch."""
    kl = 0.5 * (z_mu.float().pow(2) + z_sigma.float().pow(2) - torch.log(z_sigma.float().pow(2)) - 1)
    return kl.flatten(1).sum(1).mean()


class SpectralLoss(JukeboxLoss):
    """MONAI's ``JukeboxLoss`` (L1 between Fourier amplitudes) with a finite gradient where an
    amplitude is exactly 0. ``JukeboxLoss`` takes the square root of the summed squares, whose
    gradient there is NaN; a volume repeated along an axis has such zeros, and a network that starts
    at its pool shortcut's code returns one (``scripts.networks.start_at_shortcut``). The complex
    absolute value gives the same amplitude with a zero gradient at 0."""

    def _get_fft_amplitude(self, images: torch.Tensor) -> torch.Tensor:
        return fftn(images, s=self.fft_signal_size, dim=self.fft_dim, norm=self.fft_norm).abs()


def build_perceptual_loss(
    enabled: bool, spatial_dims: int = 3, network_type: str = "squeeze", cache_dir: str | None = None, **kwargs: Any
) -> nn.Module | None:
    """MONAI's ``PerceptualLoss``, or ``None`` with a logged reason when its pretrained weights cannot
    be reached (offline, or no cached copy): training then goes on without it."""
    if not enabled:
        return None
    try:
        return PerceptualLoss(spatial_dims=spatial_dims, network_type=network_type, cache_dir=cache_dir, **kwargs)
    except ImportError as e:  # e.g. the lpips package behind the torchvision-style networks
        logger.warning(
            f"perceptual loss disabled: '{network_type}' needs a package that is not installed ({e}). "
            f"Training without it; install it, or pick another perceptual_network."
        )
    except Exception as e:  # a download or torch.hub failure: say so and go on
        logger.warning(
            f"perceptual loss disabled: the pretrained '{network_type}' weights could not be loaded "
            f"(cache_dir={cache_dir!r}): {type(e).__name__}: {e}. Training without it; point "
            f"perceptual_cache_dir at a torch.hub cache that holds them to use it offline."
        )
    return None


def build_auxiliary_losses(
    spatial_dims: int = 3, ssim_weight: float = 0.0, spectral_weight: float = 0.0, mse_weight: float = 0.0
) -> dict:
    """Reconstruction losses beside L1 that need no download, as ``{name: (loss, weight)}`` for the
    weights above 0: ``ssim_loss`` (MONAI's ``SSIMLoss``: 1 - SSIM, local structure and contrast),
    ``spectral_loss`` (:class:`SpectralLoss`, MONAI's ``JukeboxLoss``: L1 between Fourier amplitudes,
    which penalises the loss of high frequencies that L1 alone lets a model trade for blur) and
    ``mse_loss`` (the squared error that PSNR measures: L1 and PSNR disagree once a network starts
    at a least-squares code, such as the cosine shortcut's)."""
    for name, weight in (("ssim_weight", ssim_weight), ("spectral_weight", spectral_weight), ("mse_weight", mse_weight)):
        if weight < 0:
            raise ValueError(f"{name} must be >= 0 (0 turns the loss off), got {weight!r}.")
    losses: dict[str, tuple[nn.Module, float]] = {}
    if mse_weight > 0:
        losses["mse_loss"] = (nn.MSELoss(), float(mse_weight))
    if ssim_weight > 0:
        losses["ssim_loss"] = (SSIMLoss(spatial_dims=spatial_dims, data_range=1.0), float(ssim_weight))
    if spectral_weight > 0:
        losses["spectral_loss"] = (SpectralLoss(spatial_dims=spatial_dims), float(spectral_weight))
    return losses
