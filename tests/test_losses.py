"""Tests for scripts/losses.py: the KL term, the perceptual-loss fallback when its weights cannot be
reached, and the auxiliary losses that need no download."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO
from scripts.losses import SpectralLoss, build_auxiliary_losses, build_perceptual_loss, kl_loss


def test_kl_loss():
    z = torch.zeros(2, 3, 4, 4, 4)
    assert float(kl_loss(z, torch.ones_like(z))) == 0.0
    # mu = 1, sigma = 1: 0.5 per latent value, summed per sample, averaged over the batch
    assert float(kl_loss(torch.ones_like(z), torch.ones_like(z))) == pytest.approx(0.5 * 3 * 64)
    sigma = torch.full_like(z, 2.0)  # 0.5 * (4 - log 4 - 1) per value
    assert float(kl_loss(z, sigma)) == pytest.approx(0.5 * (3 - math.log(4)) * 192, rel=1e-6)
    assert float(kl_loss(z[:1], sigma[:1])) == pytest.approx(float(kl_loss(z, sigma)))


def test_perceptual_loss_disabled_is_none():
    assert build_perceptual_loss(False) is None
    assert build_perceptual_loss(False, 3, "radimagenet_resnet50", "/nonexistent") is None


def test_perceptual_loss_unreachable_weights_fall_back(tmp_path):
    """With no network (a dead proxy) and an empty torch.hub cache, the perceptual loss is off with a
    warning that names the network and says training goes on. In a subprocess: torch.hub's cache
    directory and the proxy are process-wide."""
    code = textwrap.dedent(
        """
        import logging, sys
        logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(message)s")
        from scripts.losses import build_perceptual_loss
        for net in ("squeeze", "radimagenet_resnet50"):
            print("RESULT", net, build_perceptual_loss(True, 3, net, sys.argv[1]))
        """
    )
    env = dict(
        os.environ,
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
        https_proxy="http://127.0.0.1:9",
        http_proxy="http://127.0.0.1:9",
        TORCH_HOME=str(tmp_path / "torch_home"),
        PYTHONPATH=str(REPO),
        PYTHONWARNINGS="ignore",
    )
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "hub")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for net in ("squeeze", "radimagenet_resnet50"):
        assert f"RESULT {net} None" in out
    # squeeze needs the lpips package: missing here, which is said as such; the torch.hub network
    # needs its weights, which the dead proxy keeps out of reach
    lpips_missing = importlib.util.find_spec("lpips") is None
    if lpips_missing:
        assert "WARNING perceptual loss disabled: 'squeeze' needs a package that is not installed" in out
    else:
        assert "WARNING perceptual loss disabled: the pretrained 'squeeze' weights could not be loaded" in out
    assert "WARNING perceptual loss disabled: the pretrained 'radimagenet_resnet50' weights could not be loaded" in out
    assert out.count("Training without it") == 2
    assert not any((tmp_path / "hub").rglob("*.pth")), "nothing should have been downloaded"


def test_build_auxiliary_losses():
    from monai.losses import JukeboxLoss, SSIMLoss

    assert build_auxiliary_losses(3, 0.0, 0.0) == {}
    losses = build_auxiliary_losses(3, ssim_weight=0.2, spectral_weight=0.05)
    assert sorted(losses) == ["spectral_loss", "ssim_loss"]
    assert isinstance(losses["ssim_loss"][0], SSIMLoss) and losses["ssim_loss"][1] == 0.2
    assert isinstance(losses["spectral_loss"][0], JukeboxLoss) and losses["spectral_loss"][1] == 0.05
    assert list(build_auxiliary_losses(3, spectral_weight=1.0)) == ["spectral_loss"]
    with pytest.raises(ValueError, match="mse_weight must be >= 0"):
        build_auxiliary_losses(3, mse_weight=-1.0)
    mse = build_auxiliary_losses(3, mse_weight=20.0)
    assert list(mse) == ["mse_loss"] and mse["mse_loss"][1] == 20.0
    losses |= mse
    # each is 0 for a perfect reconstruction and positive for a blurred one
    torch.manual_seed(0)
    x = torch.rand(1, 1, 16, 16, 16)
    blurred = torch.nn.functional.avg_pool3d(x, 3, 1, 1)
    for name, (loss, _) in losses.items():
        assert loss(x, x).item() == pytest.approx(0.0, abs=1e-4), name
        assert loss(blurred, x).item() > 1e-3, name


def test_spectral_loss_has_finite_gradients_where_an_amplitude_is_zero():
    """A volume repeated 2x along an axis (what a network started at its pool shortcut's code returns)
    has Fourier amplitudes of exactly 0: MONAI's JukeboxLoss gives NaN gradients there, SpectralLoss
    the same value with finite gradients."""
    from monai.losses import JukeboxLoss

    torch.manual_seed(0)
    target, half = torch.rand(2, 1, 8, 8, 8), torch.rand(2, 1, 4, 8, 8)
    for loss in (JukeboxLoss(spatial_dims=3), SpectralLoss(spatial_dims=3)):
        blocky = half.repeat_interleave(2, dim=2).requires_grad_()
        value = loss(blocky, target)
        value.backward()
        if isinstance(loss, SpectralLoss):
            assert torch.isfinite(blocky.grad).all()
            torch.testing.assert_close(value, expected)
        else:
            assert torch.isnan(blocky.grad).any()  # why SpectralLoss exists: if MONAI fixes this, drop it
            expected = value.detach()
