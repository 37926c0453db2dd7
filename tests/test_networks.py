"""Tests for scripts/networks.py: the factor-aware AutoencoderKL and its building blocks.

Every network here is tiny (8/16 channels, one res block, no attention unless the test is about
attention) and every input is the smallest size the total factor allows, so the file runs on a
2-core CPU in seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from monai.inferers import LatentDiffusionInferer
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.nets.autoencoderkl import AEKLDownsample
from monai.networks.schedulers import DDPMScheduler

from scripts import networks
from scripts.networks import (
    ChannelNorm,
    DepthToSpace,
    FactorAutoencoderKL,
    FactorDownsample,
    Reconstructor,
    SpaceToDepth,
    cosine_basis,
    shortcut_factors,
    total_factor,
)

LAYOUTS = ("strided", "space_to_depth")
TINY = dict(
    num_res_blocks=1,
    norm_num_groups=8,
    latent_channels=3,
    with_encoder_nonlocal_attn=False,
    with_decoder_nonlocal_attn=False,
)


def tiny_kwargs(spatial_dims: int, channels=(8, 16, 16), **overrides) -> dict:
    kwargs = dict(TINY, spatial_dims=spatial_dims, channels=channels, attention_levels=(False,) * len(channels))
    kwargs.update(overrides)
    return kwargs


def make_ae(spatial_dims: int, factors=None, layout: str = "strided", channels=(8, 16, 16), seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return FactorAutoencoderKL(
        downsample_factors=factors, layout=layout, **tiny_kwargs(spatial_dims, channels, **overrides)
    )


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# (spatial_dims, downsample_factors, channels, total factor per axis, input spatial shape)
# Input shapes are the total factor times a small multiplier that differs per axis, so a swapped
# axis would show in the shapes.
SHAPE_CASES = [
    (2, [2, 2], (8, 16, 16), (4, 4), (8, 4)),
    (2, [4, 2], (8, 16, 16), (8, 8), (16, 8)),
    (2, [8, 2], (8, 16, 16), (16, 16), (32, 16)),
    (2, [4, 4], (8, 16, 16), (16, 16), (32, 16)),
    (2, [2, 2, 2], (8, 16, 16, 16), (8, 8), (16, 8)),
    (2, [[2, 1], [2, 2]], (8, 16, 16), (4, 2), (8, 4)),
    (3, [2, 2], (8, 16, 16), (4, 4, 4), (4, 8, 4)),
    (3, [4, 2], (8, 16, 16), (8, 8, 8), (8, 16, 8)),
    (3, [8, 2], (8, 16, 16), (16, 16, 16), (16, 32, 16)),
    (3, [4, 4], (8, 16, 16), (16, 16, 16), (16, 32, 16)),
    (3, [2, 2, 2], (8, 16, 16, 16), (8, 8, 8), (8, 16, 8)),
    (3, [[2, 2, 1], [2, 2, 2]], (8, 16, 16), (4, 4, 2), (4, 8, 2)),
]
SHAPE_IDS = [f"{d}d-{f}".replace(" ", "") for d, f, *_ in SHAPE_CASES]


# --------------------------------------------------------------------------------------------
# Shapes of latents and outputs, both layouts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spatial_dims,factors,channels,total,spatial", SHAPE_CASES, ids=SHAPE_IDS)
def test_forward_shapes(spatial_dims, factors, channels, total, spatial, layout):
    ae = make_ae(spatial_dims, factors, layout, channels)
    x = torch.randn(2, 1, *spatial)
    recon, z_mu, z_sigma = ae(x)
    latent = tuple(s // t for s, t in zip(spatial, total))
    assert z_mu.shape == (2, 3, *latent)
    assert z_sigma.shape == (2, 3, *latent)
    assert recon.shape == x.shape
    assert torch.isfinite(recon).all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spatial_dims,factors,channels,total,spatial", SHAPE_CASES, ids=SHAPE_IDS)
def test_helpers_agree_with_encoder(spatial_dims, factors, channels, total, spatial, layout):
    ae = make_ae(spatial_dims, factors, layout, channels)
    assert ae.total_factor == total
    assert ae.spatial_multiple == total
    assert total_factor(ae.downsample_factors) == total
    z_mu, z_sigma = ae.encode(torch.randn(1, 1, *spatial))
    assert ae.latent_shape(spatial) == tuple(z_mu.shape[2:]) == tuple(z_sigma.shape[2:])


def test_total_factor_function():
    assert total_factor(((4, 4, 4), (2, 2, 1))) == (8, 8, 4)
    assert total_factor(((2, 3), (5, 1), (1, 7))) == (10, 21)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_latent_shape_rejects_non_divisible(layout):
    ae = make_ae(3, [4, 2], layout)  # needs multiples of 8
    with pytest.raises(ValueError, match="not divisible"):
        ae.latent_shape((16, 16, 12))
    with pytest.raises(ValueError, match="axes"):
        ae.latent_shape((16, 16))
    aniso = make_ae(3, [[2, 2, 1], [2, 2, 2]], layout)  # needs multiples of (4, 4, 2)
    assert aniso.latent_shape((8, 4, 6)) == (2, 1, 3)
    with pytest.raises(ValueError, match="not divisible"):
        aniso.latent_shape((8, 4, 3))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_factor_one_keeps_resolution(layout):
    ae = make_ae(3, [1, 2], layout)
    x = torch.randn(1, 1, 4, 6, 2)
    recon, z_mu, _ = ae(x)
    assert ae.total_factor == (2, 2, 2)
    assert z_mu.shape == (1, 3, 2, 3, 1)
    assert recon.shape == x.shape


@pytest.mark.parametrize(
    "spatial_dims,factors,layout,spatial",
    [
        (3, [4, 2], "strided", (8, 16, 8)),
        (3, [4, 2], "space_to_depth", (8, 16, 8)),
        (3, [[2, 2, 1], [2, 2, 2]], "strided", (4, 8, 2)),
        (3, [[2, 2, 1], [2, 2, 2]], "space_to_depth", (4, 8, 2)),
        (2, [8, 2], "strided", (32, 16)),
        (2, [1, 4], "space_to_depth", (8, 4)),
    ],
)
def test_convtranspose_shapes(spatial_dims, factors, layout, spatial):
    ae = make_ae(spatial_dims, factors, layout, use_convtranspose=True)
    assert any(isinstance(m, torch.nn.modules.conv._ConvTransposeNd) for m in ae.decoder.modules())
    x = torch.randn(1, 1, *spatial)
    recon, z_mu, _ = ae(x)
    assert z_mu.shape[2:] == ae.latent_shape(spatial)
    assert recon.shape == x.shape


# --------------------------------------------------------------------------------------------
# Backward compatibility with MONAI's AutoencoderKL
# --------------------------------------------------------------------------------------------

COMPAT_CONFIGS = {
    "3d-plain": (tiny_kwargs(3), (8, 8, 8)),
    "2d-4levels": (tiny_kwargs(2, channels=(8, 16, 16, 16)), (16, 16)),
    "2d-attention": (
        tiny_kwargs(
            2,
            channels=(8, 16),
            attention_levels=(False, True),
            with_encoder_nonlocal_attn=True,
            with_decoder_nonlocal_attn=True,
        ),
        (8, 8),
    ),
    "3d-attention": (
        tiny_kwargs(
            3,
            channels=(8, 16),
            attention_levels=(False, True),
            with_encoder_nonlocal_attn=True,
            with_decoder_nonlocal_attn=True,
        ),
        (4, 4, 4),
    ),
    "3d-convtranspose": (tiny_kwargs(3, use_convtranspose=True), (8, 8, 8)),
}


def _all_twos(kwargs: dict, per_axis: bool):
    levels = len(kwargs["channels"]) - 1
    return [[2] * kwargs["spatial_dims"]] * levels if per_axis else [2] * levels


@pytest.mark.parametrize("factors", ["omitted", "explicit", "explicit-per-axis"])
@pytest.mark.parametrize("config", list(COMPAT_CONFIGS))
def test_monai_compatible_state_dict_and_outputs(config, factors):
    kwargs, spatial = COMPAT_CONFIGS[config]
    torch.manual_seed(0)
    monai_ae = AutoencoderKL(**kwargs).eval()
    extra = {} if factors == "omitted" else {"downsample_factors": _all_twos(kwargs, factors == "explicit-per-axis")}
    torch.manual_seed(1)
    ours = FactorAutoencoderKL(layout="strided", **kwargs, **extra).eval()
    assert ours.is_monai_default

    monai_sd, our_sd = monai_ae.state_dict(), ours.state_dict()
    assert list(our_sd) == list(monai_sd)
    assert {k: v.shape for k, v in our_sd.items()} == {k: v.shape for k, v in monai_sd.items()}
    if kwargs.get("with_encoder_nonlocal_attn"):
        assert any(".attn." in k for k in monai_sd)  # the attention blocks' keys are really covered

    ours.load_state_dict(monai_sd)
    x = torch.randn(2, 1, *spatial)
    with torch.no_grad():
        assert max_abs_diff(ours.reconstruct(x), monai_ae.reconstruct(x)) <= 1e-5
        for a, b in zip(ours.encode(x), monai_ae.encode(x)):
            assert max_abs_diff(a, b) <= 1e-5


def test_factor_two_downsample_is_monai_aekl_downsample():
    torch.manual_seed(0)
    ref = AEKLDownsample(spatial_dims=3, in_channels=4)
    ours = FactorDownsample(3, 4, (2, 2, 2))
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 4, 6, 8, 4)
    assert torch.allclose(ours(x), ref(x), atol=1e-6)


# --------------------------------------------------------------------------------------------
# State-dict guards: factors and layout are recorded and checked
# --------------------------------------------------------------------------------------------


def test_monai_state_dict_refused_by_factor_4_2_network():
    monai_sd = AutoencoderKL(**tiny_kwargs(3)).state_dict()
    ae = make_ae(3, [4, 2])
    with pytest.raises(ValueError) as err:
        ae.load_state_dict(monai_sd)
    assert "(2, 2)" in str(err.value) and "(4, 2)" in str(err.value)


def test_factor_4_2_state_dict_refused_by_default_network():
    sd = make_ae(3, [4, 2]).state_dict()
    default = make_ae(3)
    with pytest.raises(ValueError) as err:
        default.load_state_dict(sd)
    assert "(4, 2)" in str(err.value) and "(2, 2)" in str(err.value)


@pytest.mark.parametrize("src,dst", [("space_to_depth", "strided"), ("strided", "space_to_depth")])
def test_layout_mismatch_refused(src, dst):
    sd = make_ae(3, [2, 2], src).state_dict()
    with pytest.raises(ValueError) as err:
        make_ae(3, [2, 2], dst).load_state_dict(sd)
    assert "'space_to_depth'" in str(err.value) and "'strided'" in str(err.value)


def test_matching_non_default_state_dict_round_trips():
    src = make_ae(3, [[2, 2, 1], [4, 4, 2]], "space_to_depth", seed=0).eval()
    dst = make_ae(3, [[2, 2, 1], [4, 4, 2]], "space_to_depth", seed=1).eval()
    dst.load_state_dict(src.state_dict())
    x = torch.randn(1, 1, 8, 8, 4)
    with torch.no_grad():
        assert torch.equal(dst.reconstruct(x), src.reconstruct(x))


def test_mismatched_state_dict_is_refused_with_strict_false_too():
    # Two space_to_depth networks whose factors differ only in which axis is packed first:
    # every key and shape agrees, so the factor check is the only thing that can object.
    src = make_ae(3, [[2, 4, 2], 2], "space_to_depth", seed=0)
    dst = make_ae(3, [[4, 2, 2], 2], "space_to_depth", seed=1)
    assert {k: v.shape for k, v in src.state_dict().items()} == {k: v.shape for k, v in dst.state_dict().items()}
    before = [p.clone() for p in dst.parameters()]
    with pytest.raises(ValueError) as err:
        dst.load_state_dict(src.state_dict(), strict=False)
    assert "[[2, 4, 2], [2, 2, 2]]" in str(err.value) and "[[4, 2, 2], [2, 2, 2]]" in str(err.value)
    assert all(torch.equal(p, q) for p, q in zip(before, dst.parameters())), "nothing may be loaded"


# --------------------------------------------------------------------------------------------
# norm: "group" (MONAI's GroupNorm) or "channel" (ChannelNorm), recorded and checked like the factors
# --------------------------------------------------------------------------------------------


def _recorded_norm(state_dict: dict) -> str | None:
    return bytes(state_dict["norm"].tolist()).decode() if "norm" in state_dict else None


@pytest.mark.parametrize("layout", LAYOUTS)
def test_norm_is_recorded_and_refused_on_mismatch(layout):
    channel = make_ae(3, [2, 2], layout, norm="channel", seed=0)
    group = make_ae(3, [2, 2], layout, norm="group", seed=1)
    channel_sd = channel.state_dict()
    assert _recorded_norm(channel_sd) == "channel"
    # ChannelNorm's parameters are named and shaped as GroupNorm's: only the record can object
    records = ("downsample_factors", "layout", "norm", "shortcut")  # (a strided 2x2 GroupNorm network is MONAI's: none)
    shapes = {k: v.shape for k, v in channel_sd.items() if k not in records}
    assert shapes == {k: v.shape for k, v in group.state_dict().items() if k not in records}
    before = [p.clone() for p in group.parameters()]
    for strict in (True, False):
        with pytest.raises(ValueError) as err:
            group.load_state_dict(channel_sd, strict=strict)
        msg = str(err.value)
        assert "norm 'channel'" in msg and "norm 'group'" in msg, msg
    assert all(torch.equal(p, q) for p, q in zip(before, group.parameters())), "nothing may be loaded"
    with pytest.raises(ValueError, match=r"saved with .*norm 'group'.*this network has .*norm 'channel'"):
        make_ae(3, [2, 2], layout, norm="channel").load_state_dict(group.state_dict())
    # the matching network loads it and reconstructs the same
    other = make_ae(3, [2, 2], layout, norm="channel", seed=2).eval()
    other.load_state_dict(channel_sd)
    x = torch.rand(1, 1, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(other.reconstruct(x), channel.eval().reconstruct(x))


def test_state_dict_saved_before_norm_was_recorded_loads_as_group():
    """The shipped checkpoints record factors and layout but not norm: they hold GroupNorm weights."""
    old_sd = make_ae(3, [4, 2], "space_to_depth", norm="group").state_dict()
    assert _recorded_norm(old_sd) == "group" and "downsample_factors" in old_sd
    del old_sd["norm"]
    make_ae(3, [4, 2], "space_to_depth", norm="group", seed=1).load_state_dict(old_sd)
    with pytest.raises(ValueError) as err:
        make_ae(3, [4, 2], "space_to_depth", norm="channel").load_state_dict(old_sd)
    assert "norm 'group'" in str(err.value) and "norm 'channel'" in str(err.value)


def test_channel_norm_is_not_monai_default():
    """Strided, factor 2 everywhere but ChannelNorm: not MONAI's network, so its record is kept and
    MONAI's (GroupNorm) weights are refused."""
    group = make_ae(3, [2, 2], "strided", norm="group")
    channel = make_ae(3, [2, 2], "strided", norm="channel")
    assert group.is_monai_default and "norm" not in group.state_dict()
    assert not channel.is_monai_default and _recorded_norm(channel.state_dict()) == "channel"
    with pytest.raises(ValueError, match=r"norm 'group', shortcut None \(no factors recorded: MONAI's default\).*norm 'channel'"):
        channel.load_state_dict(AutoencoderKL(**tiny_kwargs(3)).state_dict())


def test_channel_norm_network_has_no_group_norm_without_attention():
    ae = make_ae(3, [2, 2], "space_to_depth", norm="channel")
    norms = [m for m in ae.modules() if isinstance(m, (ChannelNorm, torch.nn.GroupNorm))]
    assert norms and all(isinstance(m, ChannelNorm) for m in norms)
    assert not any(isinstance(m, ChannelNorm) for m in make_ae(3, [2, 2], "space_to_depth", norm="group").modules())


def test_channel_norm_is_layer_norm_over_channels():
    torch.manual_seed(0)
    norm = ChannelNorm(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 6, 5, 4, 3) * 3 + 1
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-6) * norm.weight.view(1, -1, 1, 1, 1) + norm.bias.view(1, -1, 1, 1, 1)
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)
    assert [name for name, _ in norm.named_parameters()] == ["weight", "bias"]


def test_channel_norm_output_does_not_depend_on_other_voxels():
    """A voxel's output is a function of that voxel's channels alone (GroupNorm's is not)."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 6, 5, 4)
    changed = torch.randn_like(x) * 10 + 5  # every other voxel replaced, with other statistics
    voxel = (..., 2, 3, 1)
    changed[voxel] = x[voxel]
    channel, group = ChannelNorm(8), torch.nn.GroupNorm(2, 8)
    with torch.no_grad():
        assert torch.equal(channel(x)[voxel], channel(changed)[voxel])
        assert not torch.allclose(group(x)[voxel], group(changed)[voxel], atol=1e-3)


def test_unknown_norm(nothing_built):
    with pytest.raises(ValueError) as err:
        FactorAutoencoderKL(downsample_factors=[2, 2], norm="batch", **tiny_kwargs(3))
    msg = str(err.value)
    assert "norm must be one of" in msg and "'batch'" in msg and "'group'" in msg and "'channel'" in msg


# --------------------------------------------------------------------------------------------
# Downsampling operator and space-to-depth rearrangement
# --------------------------------------------------------------------------------------------


def _input_grad(conv_module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        for p in conv_module.parameters():
            p.copy_(p.abs() + 0.01)  # all-positive kernel: no cancellation can hide a zero
    x = x.clone().requires_grad_(True)
    conv_module(x).sum().backward()
    return x.grad


@pytest.mark.parametrize(
    "spatial_dims,factor,spatial",
    [
        (3, (4, 4, 4), (8, 12, 4)),
        (3, (2, 2, 1), (4, 6, 3)),
        (3, (3, 3, 3), (6, 9, 3)),
        (2, (4, 2), (8, 6)),
    ],
)
def test_factor_downsample_reads_every_voxel(spatial_dims, factor, spatial):
    torch.manual_seed(0)
    down = FactorDownsample(spatial_dims, 2, factor)
    x = torch.randn(1, 2, *spatial)
    assert down(x).shape[2:] == tuple(s // f for s, f in zip(spatial, factor))
    grad = _input_grad(down, x)
    assert (grad != 0).all(), f"{(grad == 0).sum().item()} input voxels never reach the output"


def test_kernel3_stride4_conv_skips_voxels():
    # The contrast that makes the test above meaningful: kernel 3 at stride 4 never reads 1 row in 4.
    torch.manual_seed(0)
    grad = _input_grad(torch.nn.Conv3d(2, 2, kernel_size=3, stride=4), torch.randn(1, 2, 8, 12, 4))
    assert (grad == 0).any()
    assert (grad[:, :, 3::4] == 0).all()


@pytest.mark.parametrize("factor,spatial", [((2, 4, 1), (4, 8, 3)), ((3, 1, 2), (6, 5, 4)), ((2, 2), (4, 6))])
def test_space_to_depth_round_trip(factor, spatial):
    x = torch.randn(2, 3, *spatial)
    packed = SpaceToDepth(factor)(x)
    prod = 1
    for f in factor:
        prod *= f
    assert packed.shape == (2, 3 * prod, *(s // f for s, f in zip(spatial, factor)))
    assert torch.equal(DepthToSpace(factor)(packed), x)
    y = torch.randn_like(packed)
    assert torch.equal(SpaceToDepth(factor)(DepthToSpace(factor)(y)), y)


def test_space_to_depth_channel_order_3d():
    # channel c * prod(f) + (i * f1 + j) * f2 + k holds voxel (x * f0 + i, y * f1 + j, z * f2 + k)
    f0, f1, f2 = 2, 3, 2
    x = torch.randn(1, 2, 4, 6, 2)
    packed = SpaceToDepth((f0, f1, f2))(x)
    prod = f0 * f1 * f2
    for c in range(2):
        for i in range(f0):
            for j in range(f1):
                for k in range(f2):
                    ch = c * prod + (i * f1 + j) * f2 + k
                    assert torch.equal(packed[:, ch], x[:, c, i::f0, j::f1, k::f2])


@pytest.mark.parametrize("r", [2, 3, 4])
def test_space_to_depth_2d_matches_pixel_shuffle(r):
    x = torch.randn(2, 3, 4 * r, 2 * r)
    assert torch.equal(SpaceToDepth((r, r))(x), F.pixel_unshuffle(x, r))
    y = torch.randn(2, 3 * r * r, 4, 2)
    assert torch.equal(DepthToSpace((r, r))(y), F.pixel_shuffle(y, r))


# --------------------------------------------------------------------------------------------
# Validation errors
# --------------------------------------------------------------------------------------------


@pytest.fixture
def nothing_built(monkeypatch):
    """Any attempt to build the encoder or decoder fails the test: errors must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a submodule was built before validation failed")

    monkeypatch.setattr(networks, "FactorEncoder", refuse)
    monkeypatch.setattr(networks, "FactorDecoder", refuse)


@pytest.mark.parametrize(
    "channels,factors,fragments",
    [
        ((8, 16, 16), [4], ["1 entries", "(8, 16, 16)", "needs 2", "len(downsample_factors) == len(channels) - 1"]),
        ((8, 16, 16), [4, 2, 2], ["3 entries", "(8, 16, 16)", "needs 2", "len(channels) - 1"]),
        ((8, 16, 16, 16), [2, 2], ["2 entries", "(8, 16, 16, 16)", "needs 3", "len(channels) - 1"]),
    ],
)
def test_wrong_length(nothing_built, channels, factors, fragments):
    with pytest.raises(ValueError) as err:
        FactorAutoencoderKL(downsample_factors=factors, **tiny_kwargs(3, channels))
    msg = str(err.value)
    assert "downsample_factors" in msg
    for fragment in fragments:
        assert fragment in msg, msg


@pytest.mark.parametrize(
    "factors,bad",
    [
        ([0, 2], "0"),
        ([2, -2], "-2"),
        ([2.5, 2], "2.5"),
        ([True, 2], "True"),
        (["2", 2], "'2'"),
        ([[2, 2.0, 2], 2], "2.0"),
        ([[2, 0, 1], 2], "0"),
    ],
    ids=["zero", "negative", "float", "bool", "string", "float-in-axes", "zero-in-axes"],
)
def test_bad_factor_value(nothing_built, factors, bad):
    with pytest.raises(ValueError) as err:
        FactorAutoencoderKL(downsample_factors=factors, **tiny_kwargs(3))
    msg = str(err.value)
    index = next(i for i, f in enumerate(factors) if f != 2)
    assert f"downsample_factors[{index}]" in msg
    assert "positive integer" in msg
    assert f"got {bad}" in msg, msg


@pytest.mark.parametrize("factors", ["42", 4])
def test_factors_not_a_list(nothing_built, factors):
    with pytest.raises(ValueError, match="downsample_factors must be a list"):
        FactorAutoencoderKL(downsample_factors=factors, **tiny_kwargs(3))


@pytest.mark.parametrize(
    "spatial_dims,factors,index,axes",
    [(3, [[2, 2], [2, 2, 2]], 0, 2), (3, [2, [2, 2, 2, 2]], 1, 4), (2, [[2, 2, 1], 2], 0, 3)],
)
def test_per_axis_entry_with_wrong_number_of_axes(nothing_built, spatial_dims, factors, index, axes):
    with pytest.raises(ValueError) as err:
        FactorAutoencoderKL(downsample_factors=factors, **tiny_kwargs(spatial_dims))
    msg = str(err.value)
    assert f"downsample_factors[{index}]" in msg
    assert f"has {axes} axes" in msg and f"spatial_dims is {spatial_dims}" in msg, msg


def test_unknown_layout(nothing_built):
    with pytest.raises(ValueError) as err:
        FactorAutoencoderKL(downsample_factors=[2, 2], layout="pixel_shuffle", **tiny_kwargs(3))
    msg = str(err.value)
    assert "layout" in msg and "'pixel_shuffle'" in msg
    assert "'strided'" in msg and "'space_to_depth'" in msg


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "factors,spatial,multiple",
    [([4, 2], (16, 16, 12), "(8, 8, 8)"), ([[2, 2, 1], [2, 2, 2]], (8, 8, 5), "(4, 4, 2)")],
)
def test_forward_on_non_divisible_input(layout, factors, spatial, multiple):
    ae = make_ae(3, factors, layout)
    with pytest.raises(ValueError) as err:
        ae(torch.randn(1, 1, *spatial))
    msg = str(err.value)
    assert str(spatial) in msg and multiple in msg, msg


# --------------------------------------------------------------------------------------------
# Gradient checkpointing, flash attention
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factors,layout,spatial",
    [([4, 2], "space_to_depth", (8, 16, 8)), ([[2, 2, 1], [2, 2, 2]], "strided", (4, 8, 2))],
)
def test_checkpointing_gives_same_gradients(factors, layout, spatial):
    plain = make_ae(3, factors, layout, use_checkpoint=False)
    ckpt = make_ae(3, factors, layout, use_checkpoint=True, seed=1)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, *spatial)

    def run(model):
        torch.manual_seed(123)  # same sampling noise for both
        recon, z_mu, z_sigma = model(x)
        loss = (recon - x).square().mean() + z_mu.square().mean() + z_sigma.mean()
        loss.backward()
        return recon.detach(), {n: p.grad for n, p in model.named_parameters()}

    recon_a, grads_a = run(plain)
    recon_b, grads_b = run(ckpt)
    assert max_abs_diff(recon_a, recon_b) <= 1e-5
    assert grads_a.keys() == grads_b.keys()
    assert all(g is not None for g in grads_b.values())
    assert any(g.abs().sum() > 0 for g in grads_b.values())
    for name in grads_a:
        assert max_abs_diff(grads_a[name], grads_b[name]) <= 1e-5, name


def test_flash_attention_runs_on_cpu_with_factors():
    attn = dict(
        attention_levels=(False, True, True), with_encoder_nonlocal_attn=True, with_decoder_nonlocal_attn=True
    )
    flash = make_ae(3, [4, 2], use_flash_attention=True, **attn).eval()
    plain = make_ae(3, [4, 2], use_flash_attention=False, seed=1, **attn).eval()
    plain.load_state_dict(flash.state_dict())
    x = torch.randn(1, 1, 8, 16, 8)
    recon, z_mu, _ = flash(x)
    assert recon.shape == x.shape and z_mu.shape == (1, 3, 1, 2, 1)
    recon.sum().backward()
    with torch.no_grad():
        assert max_abs_diff(flash.reconstruct(x), plain.reconstruct(x)) <= 1e-4


# --------------------------------------------------------------------------------------------
# MONAI's LatentDiffusionInferer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factors,layout,spatial",
    [([4, 2], "space_to_depth", (16, 16, 16)), ([[2, 2, 1], [2, 2, 2]], "strided", (8, 8, 4))],
)
def test_latent_diffusion_inferer_round_trip(factors, layout, spatial):
    ae = make_ae(3, factors, layout).eval()
    unet = DiffusionModelUNet(
        spatial_dims=3,
        in_channels=3,
        out_channels=3,
        channels=(8, 8),
        attention_levels=(False, False),
        num_res_blocks=1,
        norm_num_groups=8,
    ).eval()
    scheduler = DDPMScheduler(num_train_timesteps=10)
    inferer = LatentDiffusionInferer(scheduler)
    latent = (2, 3, *ae.latent_shape(spatial))
    x = torch.randn(2, 1, *spatial)
    with torch.no_grad():
        pred = inferer(
            inputs=x,
            autoencoder_model=ae,
            diffusion_model=unet,
            noise=torch.randn(latent),
            timesteps=torch.randint(0, 10, (2,)),
        )
        assert pred.shape == latent
        image = inferer.sample(
            input_noise=torch.randn(latent),
            autoencoder_model=ae,
            diffusion_model=unet,
            scheduler=scheduler,
            verbose=False,
        )
    assert image.shape == x.shape
    assert torch.isfinite(image).all()


# --------------------------------------------------------------------------------------------
# Reconstructor
# --------------------------------------------------------------------------------------------


def test_reconstructor_output_is_float32_reconstruction():
    ae = make_ae(3, [4, 2], "space_to_depth").eval()
    x = torch.randn(2, 1, 8, 16, 8)
    with torch.no_grad():
        out = Reconstructor(ae)(x)
        assert isinstance(out, torch.Tensor)
        assert out.dtype == torch.float32
        assert torch.equal(out, ae.reconstruct(x))
        ae64 = ae.double()
        out64 = Reconstructor(ae64)(x.double())
        assert out64.dtype == torch.float32
        assert torch.equal(out64, ae64.reconstruct(x.double()).float())


def test_reconstructor_state_dict_is_the_autoencoders():
    ae = make_ae(3, [4, 2], "space_to_depth", seed=0).eval()
    recon_sd, ae_sd = Reconstructor(ae).state_dict(), ae.state_dict()
    assert list(recon_sd) == list(ae_sd)
    assert "downsample_factors" in recon_sd  # the factor record travels with it
    assert all(torch.equal(recon_sd[k], ae_sd[k]) for k in ae_sd)

    fresh = Reconstructor(make_ae(3, [4, 2], "space_to_depth", seed=1)).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(fresh(x), ae.reconstruct(x))
        fresh.load_state_dict(ae_sd)
        assert torch.equal(fresh(x), ae.reconstruct(x))
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        Reconstructor(make_ae(3, [2, 2], "space_to_depth")).load_state_dict(ae_sd)


def test_shortcut_alone_is_average_pooling_and_back():
    """With every weight zero only the shortcut is left: the reconstruction is the volume
    average-pooled by the shortcut's pool factors and repeated back, exactly."""
    ae = make_ae(3, [2, 2], "space_to_depth", norm="channel", latent_channels=16, shortcut=True)
    assert (ae.shortcut_pool, ae.shortcut_keep) == ((2, 2, 1), (2, 2, 4))
    with torch.no_grad():
        for p in ae.parameters():
            p.zero_()
        x = torch.rand(1, 1, 16, 16, 8)
        expected = F.avg_pool3d(x, (2, 2, 1)).repeat_interleave(2, 2).repeat_interleave(2, 3)
        assert torch.allclose(ae.reconstruct(x), expected, atol=1e-6)
        assert ae.encode(x)[0].shape == (1, 16, 4, 4, 2)


@pytest.mark.parametrize(
    "total, latent, pool",
    [((4, 4, 4), 16, (2, 2, 1)), ((8, 8, 8), 32, (4, 2, 2)), ((16, 16, 16), 64, (4, 4, 4)), ((4, 4, 1), 16, (1, 1, 1))],
)
def test_shortcut_pools_as_evenly_as_the_latent_allows(total, latent, pool):
    assert shortcut_factors(total, 1, latent)[0] == pool


def test_shortcut_refuses_latent_channels_it_cannot_fill():
    with pytest.raises(ValueError, match=r"shortcut='pool' needs latent_channels \(3\)"):
        make_ae(3, [2, 2], "space_to_depth", norm="channel", latent_channels=3, shortcut=True)
    with pytest.raises(ValueError, match=r"shortcut='cosine' needs latent_channels \(65\).*from 1 to 64"):
        make_ae(3, [2, 2], "space_to_depth", norm="channel", latent_channels=65, shortcut="cosine")
    with pytest.raises(ValueError, match=r"shortcut must be one of \('pool', 'cosine'\).*got 'dct'"):
        make_ae(3, [2, 2], "space_to_depth", norm="channel", latent_channels=16, shortcut="dct")


def test_shortcut_is_recorded_and_refused_on_mismatch():
    pool = make_ae(3, [2, 2], "space_to_depth", norm="channel", latent_channels=16, shortcut=True)
    cosine = make_ae(3, [2, 2], "space_to_depth", norm="channel", latent_channels=16, shortcut="cosine")
    without = make_ae(3, [2, 2], "space_to_depth", norm="channel", latent_channels=16)
    assert pool.shortcut == "pool" and without.shortcut is None
    # pool and none are recorded as before the cosine shortcut existed (True / False), so older code reads them
    assert pool.state_dict()["shortcut"].dtype == torch.bool and not without.state_dict()["shortcut"]
    with pytest.raises(ValueError, match="shortcut 'pool'.*shortcut None"):
        without.load_state_dict(pool.state_dict())
    with pytest.raises(ValueError, match="shortcut 'cosine'.*shortcut 'pool'"):
        pool.load_state_dict(cosine.state_dict())
    without.load_state_dict(make_ae(3, [2, 2], "space_to_depth", norm="channel", latent_channels=16).state_dict())
    # the basis is rebuilt from the arguments, not saved
    assert "shortcut_basis" not in cosine.state_dict()
    make_ae(3, [2, 2], "space_to_depth", norm="channel", latent_channels=16, shortcut="cosine", seed=1).load_state_dict(cosine.state_dict())


@pytest.mark.parametrize("total, kept", [((4, 4, 4), 16), ((8, 8, 2), 10), ((2, 2), 3)])
def test_cosine_basis_is_orthonormal_and_lowest_frequencies_first(total, kept):
    basis = cosine_basis(total, 1, kept).double()
    n = math.prod(total)
    assert basis.shape == (n, kept)
    torch.testing.assert_close(basis.T @ basis * n, torch.eye(kept, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(basis[:, 0], torch.full((n,), 1.0 / n, dtype=torch.float64))  # the first value is the cell mean
    cells = basis.T.reshape(kept, *total)
    if len(set(total)) == 1:  # then the first cosine along each axis: one sign change along it, none along the others
        varies = []
        for column in cells[1 : 1 + len(total)]:
            changes = [int((torch.diff(torch.sign(column.sum(dim=[d for d in range(len(total)) if d != a]))) != 0).sum()) for a in range(len(total))]
            assert sorted(changes) == [0] * (len(total) - 1) + [1]
            varies.append(changes.index(1))
        assert sorted(varies) == list(range(len(total)))
    else:  # 8x8x2: the 10 lowest frequencies in cycles per voxel are all in-plane (a half cycle per voxel along z comes later)
        torch.testing.assert_close(cells[..., 0], cells[..., 1])


def test_cosine_shortcut_alone_is_the_linear_code_and_back():
    """With every weight zero only the shortcut is left: the reconstruction is the projection of each
    cell onto its kept frequencies. A volume made of those frequencies comes back exactly, and the
    first latent channel is each cell's mean, whatever the autocast."""
    ae = make_ae(3, [[2, 2, 1], [2, 2, 2]], "space_to_depth", norm="channel", latent_channels=6, shortcut="cosine")
    total = (4, 4, 2)
    basis = cosine_basis(total, 1, 6).double()
    with torch.no_grad():
        for p in ae.parameters():
            p.zero_()
        x = torch.rand(1, 1, 8, 12, 6, dtype=torch.float64).float()
        cells = rearrange(x.double(), "b c (s0 k0) (s1 k1) (s2 k2) -> b s0 s1 s2 c (k0 k1 k2)", k0=4, k1=4, k2=2)
        projected = rearrange(
            cells @ basis @ basis.T * 32, "b s0 s1 s2 c (k0 k1 k2) -> b c (s0 k0) (s1 k1) (s2 k2)", k0=4, k1=4, k2=2
        )
        torch.testing.assert_close(ae.reconstruct(x).double(), projected, atol=1e-5, rtol=0)
        z = ae.encode(x)[0]
        assert z.shape == (1, 6, 2, 3, 3)
        torch.testing.assert_close(z[:, 0], F.avg_pool3d(x, total)[:, 0], atol=1e-6, rtol=0)
        smooth = ae.reconstruct(projected.float())
        torch.testing.assert_close(smooth.double(), projected, atol=1e-5, rtol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(ae.encode(x)[0][:, 0].float(), z[:, 0], atol=1e-6, rtol=0)


def test_monai_internals_we_build_on():
    """FactorAutoencoderKL builds MONAI's submodules itself and reuses MONAI's private blocks: a MONAI
    upgrade that changes them must fail here, by name, rather than in a user's checkpoint."""
    import inspect
    import re

    from monai.networks.nets.autoencoderkl import AEKLResBlock, AsymmetricPad

    assert list(inspect.signature(AEKLResBlock).parameters) == [
        "spatial_dims", "in_channels", "norm_num_groups", "norm_eps", "out_channels"
    ]
    assert list(inspect.signature(AsymmetricPad).parameters) == ["spatial_dims"]
    block = AEKLResBlock(3, 8, 8, 1e-6, 16)
    assert {"norm1", "norm2", "conv1", "conv2", "nin_shortcut"} <= dict(block.named_children()).keys()
    ours = make_ae(3, [2, 2], "space_to_depth", norm="channel")
    for name in ("encode", "sampling", "decode", "reconstruct", "forward", "encode_stage_2_inputs", "decode_stage_2_outputs"):
        used = set(re.findall(r"self\.(\w+)", inspect.getsource(getattr(AutoencoderKL, name))))
        missing = sorted(a for a in used if not hasattr(ours, a))
        assert not missing, f"MONAI's AutoencoderKL.{name} uses {missing}, which FactorAutoencoderKL does not set"


@pytest.mark.parametrize("shortcut, latent", [("pool", 16), ("cosine", 16), ("cosine", 7)])
def test_a_new_network_starts_at_its_shortcut_code_and_learns_from_there(shortcut, latent):
    """start_at_shortcut: the untrained network reconstructs exactly what its shortcut alone does, and
    one optimizer step moves it (the zeroed layers get gradients)."""
    ae = networks.start_at_shortcut(make_ae(3, [2, 2], "space_to_depth", norm="channel", latent_channels=latent, shortcut=shortcut))
    code = make_ae(3, [2, 2], "space_to_depth", norm="channel", latent_channels=latent, shortcut=shortcut)
    with torch.no_grad():
        for p in code.parameters():
            p.zero_()
    x = torch.rand(2, 1, 16, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(ae.reconstruct(x), code.reconstruct(x), atol=1e-6, rtol=0)
    optimizer = torch.optim.Adam(ae.parameters(), lr=1e-3)
    torch.nn.functional.l1_loss(ae.reconstruct(x), x).backward()
    optimizer.step()
    with torch.no_grad():
        assert max_abs_diff(ae.reconstruct(x), code.reconstruct(x)) > 1e-4
    without = make_ae(3, [2, 2], "space_to_depth", norm="channel", latent_channels=latent)
    before = {k: v.clone() for k, v in without.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in networks.start_at_shortcut(without).state_dict().items())


@pytest.mark.parametrize("shortcut", ["pool", "cosine"])
def test_inference_skips_the_layers_that_add_nothing_to_the_code(shortcut):
    """With both output layers zero (a network at its code, as the shipped 4x and 8x files), inference
    runs neither the encoder nor the decoder, and returns exactly what running them returns; with
    gradients on (training) every layer runs, and a trained layer is never skipped."""
    ae = networks.start_at_shortcut(make_ae(3, [2, 2], "space_to_depth", norm="channel", latent_channels=16, shortcut=shortcut)).eval()
    x = torch.rand(2, 1, 16, 16, 8)
    full, full_z = ae.reconstruct(x), ae.decode(ae.encode(x)[0])  # gradients on: every layer runs
    calls = []
    for module in (ae.encoder, ae.decoder):
        module.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    with torch.no_grad():
        torch.testing.assert_close(ae.reconstruct(x), full, atol=0, rtol=0)
        torch.testing.assert_close(ae.decode(ae._code(x)), full_z, atol=0, rtol=0)
    assert calls == []
    ae.reconstruct(x)
    assert calls == ["FactorEncoder", "FactorDecoder"]
    with torch.no_grad():
        networks._output_convs(ae)[0].bias.fill_(0.5)  # the decoder now adds to the code: it runs, the encoder still need not
        calls.clear()
        assert max_abs_diff(ae.reconstruct(x), full) == pytest.approx(0.5)
    assert calls == ["FactorDecoder"]


def test_parameter_groups_slow_only_the_layers_that_add_to_the_code():
    """parameter_groups: with a shortcut, the two zero-started output layers get output_lr_scale
    times the learning rate and every other parameter the rate itself, once each; at scale 1 or
    without a shortcut there is one group, as autoencoder.parameters(); a scale <= 0 is refused."""
    ae = networks.start_at_shortcut(make_ae(3, [2, 2], "space_to_depth", norm="channel", latent_channels=16, shortcut="cosine"))
    rest, outputs = networks.parameter_groups(ae, 1e-3, 0.01)
    assert (rest["lr"], outputs["lr"]) == (1e-3, pytest.approx(1e-5))
    assert len(outputs["params"]) == 4 and all(not q.any() for q in outputs["params"])  # two convolutions, started at zero
    assert {id(ae.quant_conv_mu.conv.weight), id(ae.quant_conv_mu.conv.bias)} <= {id(q) for q in outputs["params"]}
    assert sorted(map(id, rest["params"] + outputs["params"])) == sorted(map(id, ae.parameters()))
    optimizer = torch.optim.Adam([rest, outputs])
    x = torch.rand(1, 1, 16, 16, 8)
    torch.nn.functional.mse_loss(ae.reconstruct(x), x).backward()
    before = ae.quant_conv_mu.conv.weight.clone()
    optimizer.step()
    assert 0 < max_abs_diff(ae.quant_conv_mu.conv.weight, before) <= 1.01e-5  # Adam's first step: about the rate
    for one in (networks.parameter_groups(ae, 1e-3), networks.parameter_groups(make_ae(3, [2, 2], "space_to_depth"), 1e-3, 0.01)):
        assert len(one) == 1 and one[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="output_lr_scale"):
        networks.parameter_groups(ae, 1e-3, 0.0)


def test_the_posterior_starts_with_the_same_noise_per_voxel_through_either_shortcut():
    """init_posterior's log variance is the noise an output voxel gets through the shortcut: the
    cosine synthesis adds up the noise of its k frequencies, so each latent value starts k times
    narrower there; the pool shortcut repeats each value, so it starts at log_var itself."""
    torch.manual_seed(0)
    for shortcut in ("pool", "cosine"):
        ae = networks.init_posterior(make_ae(3, [2, 2], "space_to_depth", norm="channel", latent_channels=16, shortcut=shortcut), -8.0)
        with torch.no_grad():
            for p in ae.decoder.parameters():
                p.zero_()
            ae.quant_conv_log_sigma.conv.weight.zero_()
            z_mu, z_sigma = ae.encode(torch.rand(1, 1, 32, 32, 32))
            noise = ae.decode(z_mu + z_sigma * torch.randn_like(z_sigma)) - ae.decode(z_mu)
        assert noise.std().item() == pytest.approx(math.exp(-4.0), rel=0.05), shortcut
