"""Tests for scripts/diffusion.py: the class-conditioned UNet under MONAI's inferers (and their
classifier-free guidance), the volumes encoded once, the latent scale factor, the training batch
(latents sampled and scaled, the prediction target, class labels dropped) and the size checks."""

from __future__ import annotations

import math

import pytest
import torch
from monai.data import DataLoader
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from conftest import TINY_AUTOENCODER
from scripts.checkpoints import save_atomic
from scripts.diffusion import (
    NO_CLASS,
    ClassConditionedDiffusionModelUNet,
    LatentDiffusionPrepareBatch,
    check_full_batches,
    check_latent_fits_unet,
    describe_scale,
    encode_volumes,
    latent_noise_shape,
    latent_scale,
    latent_scale_factor,
)
from scripts.networks import FactorAutoencoderKL

UNET = dict(
    spatial_dims=3, in_channels=4, out_channels=4, channels=[8, 8], attention_levels=[False, False],
    num_res_blocks=1, num_head_channels=8, norm_num_groups=8,
)


def unet(num_class_embeds: int | None = 4, seed: int = 0) -> ClassConditionedDiffusionModelUNet:
    torch.manual_seed(seed)
    network = ClassConditionedDiffusionModelUNet(**UNET, num_class_embeds=num_class_embeds).eval()
    with torch.no_grad():  # MONAI zero-initialises the output convolution: give the classes a visible effect
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return network


def test_unconditional_unet_is_monais_network():
    ours = unet(None)
    theirs = DiffusionModelUNet(**UNET)
    theirs.load_state_dict(ours.state_dict())  # the same parameter names
    x, t = torch.randn(2, 4, 8, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), theirs.eval()(x, t))
        with pytest.raises(ValueError, match="unconditional"):
            ours(x, t, context=torch.tensor([0, 1]))


def test_class_labels_arrive_as_the_inferers_condition():
    network = unet()
    x, t = torch.randn(2, 4, 8, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        by_context = network(x, t, context=torch.tensor([0, 2]))
        by_keyword = network(x, t, class_labels=torch.tensor([0, 2]))
        torch.testing.assert_close(by_context, by_keyword)
        # -1 and no label at all are "no class", the last embedding
        no_class = DiffusionModelUNet.forward(network, x, t, class_labels=torch.tensor([3, 3]))
        torch.testing.assert_close(network(x, t, context=torch.tensor([-1, -1])), no_class)
        torch.testing.assert_close(network(x, t), no_class)
        assert not torch.allclose(network(x, t, context=torch.tensor([0, 0])), network(x, t, context=torch.tensor([1, 1])))
        with pytest.raises(ValueError, match=r"class labels \[3, 0\] out of range: expected 0..2, or -1"):
            network(x, t, context=torch.tensor([3, 0]))


def test_guided_sampling_through_monais_inferer_is_the_guidance_formula():
    network = unet()
    scheduler = DDIMScheduler(num_train_timesteps=50)
    scheduler.set_timesteps(1)
    noise = torch.randn(1, 4, 8, 8, 8)
    guided = DiffusionInferer(scheduler).sample(noise, network, scheduler, conditioning=torch.tensor([1]), cfg=3.0, verbose=False)
    t = scheduler.timesteps[0]
    with torch.no_grad():
        uncond = network(noise, torch.tensor([t]), context=torch.tensor([NO_CLASS]))
        cond = network(noise, torch.tensor([t]), context=torch.tensor([1]))
    expected, _ = scheduler.step(uncond + 3.0 * (cond - uncond), t, noise)
    torch.testing.assert_close(guided, expected)


def tiny_autoencoder() -> FactorAutoencoderKL:
    torch.manual_seed(0)
    return FactorAutoencoderKL(**TINY_AUTOENCODER, downsample_factors=[2, 2], layout="space_to_depth").eval()


def test_encode_volumes_keeps_each_volume_and_its_mirror_image():
    ae = tiny_autoencoder()
    items = [{"image": torch.rand(1, 16, 16, 16) * (i + 1), "class_index": i % 2} for i in range(3)]
    latents = encode_volumes(ae, DataLoader(items, batch_size=2), "cpu")
    assert len(latents) == 6 and [item["class_index"] for item in latents] == [0, 1, 0, 1, 0, 0]
    with torch.no_grad():
        z_mu, z_sigma = ae.encode(items[2]["image"][None].flip(2))
    torch.testing.assert_close(latents[5]["z_mu"], z_mu[0])
    torch.testing.assert_close(latents[5]["z_sigma"], z_sigma[0])
    assert len(encode_volumes(ae, DataLoader(items, batch_size=2), "cpu", flips=False)) == 3
    with pytest.raises(ValueError, match="no volume"):
        encode_volumes(ae, [], "cpu")


def test_latents_live_on_the_training_gpu_where_they_take_at_most_a_quarter_of_it(monkeypatch):
    from types import SimpleNamespace

    from scripts.diffusion import latent_storage

    latents = [{"z_mu": torch.zeros(4, 8, 8, 8), "z_sigma": torch.zeros(4, 8, 8, 8), "class_index": 0} for _ in range(4)]
    size = 4 * 2 * 4 * 8**3 * 4  # bytes: four latents, mean and spread, float32
    assert latent_storage(latents, "cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=4 * size))
    assert latent_storage(latents, "cuda:1") == torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=4 * size - 1))
    assert latent_storage(latents, "cuda:1") == torch.device("cpu")


def test_latent_scale_factor_at_power_1_is_one_over_the_std_of_each_channel_of_sampled_latents(tmp_path):
    torch.manual_seed(0)
    # four channels as a cosine shortcut gives them: a wide first one (the cell mean), narrower others
    widths = torch.tensor([3.0, 1.0, 0.1, 0.01]).reshape(4, 1, 1, 1)
    latents = [{"z_mu": torch.randn(4, 2, 2, 2) * widths + 1, "z_sigma": torch.full((4, 2, 2, 2), 0.001)} for _ in range(50)]
    samples = torch.stack([item["z_mu"] + item["z_sigma"] * torch.randn(4, 2, 2, 2) for item in latents for _ in range(40)])
    scale = latent_scale_factor(latents, power=1.0)
    assert isinstance(scale, list) and len(scale) == 4
    assert scale == pytest.approx((1.0 / samples.transpose(0, 1).flatten(1).std(1)).tolist(), rel=0.02)
    for c in range(4):
        mu = torch.cat([item["z_mu"][c].flatten() for item in latents]).double()
        assert scale[c] == pytest.approx(1.0 / math.sqrt(mu.var(unbiased=False).item() + 1e-6), rel=1e-9)
    # so every channel of the scaled latents has unit variance
    scaled = samples * latent_scale(scale, 4)
    torch.testing.assert_close(scaled.transpose(0, 1).flatten(1).std(1), torch.ones(4), rtol=0.03, atol=0)
    # a channel constant on the training data is scaled as if 1e-3 as wide as the widest, not by 1 / 0
    for item in latents:
        item["z_mu"][3], item["z_sigma"][3] = 5.0, 0.0
    assert latent_scale_factor(latents, power=1.0)[3] == pytest.approx(1.0 / (1e-3 * math.sqrt(9.0 + 1e-6)), rel=0.1)
    # power 0: one factor for all channels, the scaled latents of unit variance over all of them;
    # power 0.5 (the default) in between: the wide channel keeps more weight than at power 1
    for item in latents:
        item["z_mu"][3] = torch.randn(2, 2, 2) * 0.01 + 1
    one = latent_scale_factor(latents, power=0.0)
    assert isinstance(one, float)
    assert (samples * one).transpose(0, 1).flatten(1).var(1).mean().item() == pytest.approx(1.0, rel=0.05)
    half, full = latent_scale_factor(latents), latent_scale_factor(latents, power=1.0)
    scaled_var = lambda s: (samples * latent_scale(s, 4)).transpose(0, 1).flatten(1).var(1)  # noqa: E731
    assert scaled_var(half).mean().item() == pytest.approx(1.0, rel=0.05)
    assert scaled_var(one)[0] > scaled_var(half)[0] > scaled_var(full)[0]
    with pytest.raises(ValueError, match="latent_scale_power must be between 0"):
        latent_scale_factor(latents, power=1.5)
    # a run that continues a model reuses its value, also a single one of a model trained before
    save_atomic({"diffusion": {}, "scale_factor": [0.5, 0.25]}, tmp_path / "model.pt")
    assert latent_scale_factor([], str(tmp_path / "model.pt")) == [0.5, 0.25]
    save_atomic({"diffusion": {}, "scale_factor": 0.125}, tmp_path / "model.pt")
    assert latent_scale_factor([], str(tmp_path / "model.pt")) == 0.125
    save_atomic({"autoencoder": {}}, tmp_path / "ae.pt")
    with pytest.raises(ValueError, match="holds no scale_factor"):
        latent_scale_factor([], str(tmp_path / "ae.pt"))
    with pytest.raises(ValueError, match="no training latents"):
        latent_scale_factor([])


def test_latent_scale_multiplies_each_channel_and_refuses_another_width():
    latents = torch.ones(2, 3, 4, 4, 4)
    torch.testing.assert_close(latents * latent_scale(0.5, 3), torch.full((2, 3, 4, 4, 4), 0.5))
    scaled = latents * latent_scale([1.0, 2.0, 3.0], 3)
    assert scaled[:, 0].eq(1).all() and scaled[:, 1].eq(2).all() and scaled[:, 2].eq(3).all()
    with pytest.raises(ValueError, match="of model.pt has 2 values, but the latent has 3 channels"):
        latent_scale([1.0, 2.0], 3, "model.pt")
    assert describe_scale(0.5) == "0.500000"
    assert describe_scale([1.0, 2.0, 3.0]) == "1.000000 to 3.000000 (3 channels)"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_prepare_batch_samples_scales_and_targets(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    prepare = LatentDiffusionPrepareBatch(scheduler, scale_factor=2.0, condition_name="class_index")
    batch = {"z_mu": torch.ones(3, 4, 2, 2, 2), "z_sigma": torch.zeros(3, 4, 2, 2, 2), "class_index": torch.tensor([0, 1, 2])}
    images, target, args, kwargs = prepare(batch, "cpu")
    torch.testing.assert_close(images, torch.full((3, 4, 2, 2, 2), 2.0))  # (mu + 0 * noise) * scale
    per_channel = LatentDiffusionPrepareBatch(scheduler, latent_scale([1.0, 2.0, 3.0, 4.0], 4))(batch, "cpu")[0]
    torch.testing.assert_close(per_channel, torch.arange(1.0, 5.0).reshape(1, 4, 1, 1, 1).expand(3, 4, 2, 2, 2))
    expected = kwargs["noise"] if prediction_type == "epsilon" else scheduler.get_velocity(images, kwargs["noise"], kwargs["timesteps"])
    torch.testing.assert_close(target, expected)
    assert kwargs["condition"].tolist() == [0, 1, 2] and args == ()
    with pytest.raises(ValueError, match="condition_dropout"):
        LatentDiffusionPrepareBatch(scheduler, 1.0, "class_index", condition_dropout=1.0)


def test_prepare_batch_learns_the_posterior_means_alone_without_sample_posterior():
    scheduler = DDPMScheduler(num_train_timesteps=100)
    batch = {"z_mu": torch.ones(2, 4, 2, 2, 2), "z_sigma": torch.full((2, 4, 2, 2, 2), 0.5)}
    torch.manual_seed(0)
    sampled = LatentDiffusionPrepareBatch(scheduler, 2.0)(batch, "cpu")[0]
    assert sampled.std() > 0.5  # (mu + 0.5 * noise) * 2
    means = LatentDiffusionPrepareBatch(scheduler, 2.0, sample_posterior=False)(batch, "cpu")[0]
    torch.testing.assert_close(means, torch.full((2, 4, 2, 2, 2), 2.0))
    # the scale factor then measures the spread of the means alone
    latents = [{"z_mu": torch.randn(2, 4, 4, 4), "z_sigma": torch.full((2, 4, 4, 4), 3.0)} for _ in range(20)]
    mu_std = torch.stack([item["z_mu"] for item in latents]).double().std(unbiased=False).item()
    assert latent_scale_factor(latents, power=0.0, sample_posterior=False) == pytest.approx(1.0 / mu_std, rel=0.05)
    assert latent_scale_factor(latents, power=0.0) < 0.5 / mu_std  # the posterior's spread of 3 counted


def test_prepare_batch_drops_class_labels_at_its_rate():
    prepare = LatentDiffusionPrepareBatch(DDPMScheduler(100), 1.0, "class_index", condition_dropout=0.25)
    batch = {"z_mu": torch.zeros(4000, 1, 1, 1, 1), "z_sigma": torch.zeros(4000, 1, 1, 1, 1), "class_index": torch.ones(4000, dtype=torch.long)}
    torch.manual_seed(0)
    labels = prepare(batch, "cpu")[3]["condition"]
    assert set(labels.tolist()) == {NO_CLASS, 1}
    assert (labels == NO_CLASS).float().mean().item() == pytest.approx(0.25, abs=0.03)


def test_check_full_batches():
    latents = [{"z_mu": torch.zeros(1)}] * 6
    assert check_full_batches(latents, 6) is latents
    with pytest.raises(ValueError) as info:
        check_full_batches(latents, 8)
    message = str(info.value)
    assert "batch_size 8 needs at least 8 training latents for 1 process(es)" in message
    assert "gave 6" in message and "set batch_size to 6 or less" in message


def test_check_latent_fits_unet():
    assert check_latent_fits_unet((4, 4, 2), [8, 8]) == [4, 4, 2]
    with pytest.raises(ValueError) as info:
        check_latent_fits_unet((8, 8, 6), [64, 128, 128])
    message = str(info.value)
    assert "latent shape [8, 8, 6]" in message and "not divisible by 4" in message
    assert "diffusion_channels [64, 128, 128]" in message and "patch_size" in message


def test_latent_noise_shape():
    assert latent_noise_shape(16, [128, 128, 64], [4, 4, 4], 3) == [16, 32, 32, 16]
    assert latent_noise_shape(32, [256, 256, 128], [8, 8, 8], 3) == [32, 32, 32, 16]
    with pytest.raises(ValueError, match=r"each axis must be a multiple of \[16, 16, 16\].*use e.g. \[128, 128, 80\]"):
        latent_noise_shape(16, [128, 128, 72], [4, 4, 4], 3)
