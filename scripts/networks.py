"""Factor-aware AutoencoderKL: a downsampling factor per level, and per axis, instead of a fixed 2.

Two layouts share one set of arguments:

- ``"strided"``: MONAI's layout. Level 0 runs at full resolution and each level ends in a strided
  convolution. With every factor 2 the module is MONAI's ``AutoencoderKL`` exactly (same state-dict
  keys, shapes and outputs), so existing MONAI checkpoints load unchanged.
- ``"space_to_depth"``: the memory-efficient layout. The first factor is taken by a lossless
  space-to-depth rearrangement of the input (and depth-to-space at the output), so no wide tensor
  ever exists at full resolution; level 0's blocks see the voxels packed into channels. Activation
  memory then shrinks with the first factor, which is what makes large factors pay off.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import numbers
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import torch
import torch.nn as nn
from einops import rearrange, reduce, repeat
from monai.networks.blocks import Convolution, SpatialAttentionBlock, Upsample
from monai.networks.nets import AutoencoderKL
from monai.networks.nets.autoencoderkl import AEKLResBlock, AsymmetricPad
from monai.utils import ensure_tuple_rep

__all__ = [
    "LAYOUTS",
    "NORMS",
    "ChannelNorm",
    "FactorAutoencoderKL",
    "FactorDecoder",
    "FactorDownsample",
    "FactorEncoder",
    "SpaceToDepth",
    "DepthToSpace",
    "Reconstructor",
    "format_factors",
    "init_posterior",
    "start_at_shortcut",
    "SHORTCUTS",
    "cosine_basis",
    "shortcut_factors",
    "normalize_factors",
    "total_factor",
]

LAYOUTS = ("strided", "space_to_depth")
NORMS = ("group", "channel")
SHORTCUTS = ("pool", "cosine")
Factors = tuple[tuple[int, ...], ...]


def normalize_factors(
    factors: Sequence[int | Sequence[int]] | None,
    num_levels: int,
    spatial_dims: int,
    name: str = "downsample_factors",
    channels: Sequence[int] | None = None,
) -> Factors:
    """Validate ``factors`` and return one tuple of per-axis integers per level transition.

    ``None`` means 2 on every axis at every transition (MONAI's behaviour). Errors name the
    parameter, the rule and what came, so a config mistake is caught before anything is built.
    """
    expected = num_levels - 1
    if factors is None:
        return tuple((2,) * spatial_dims for _ in range(expected))
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence):
        raise ValueError(f"{name} must be a list of factors, one per level transition; got {factors!r}.")
    if len(factors) != expected:
        source = f"channels {tuple(channels)}" if channels is not None else f"{num_levels} levels"
        raise ValueError(
            f"{name} has {len(factors)} entries {list(factors)!r}, but {source} needs {expected}: "
            f"the rule is len({name}) == len(channels) - 1."
        )
    out = []
    for i, entry in enumerate(factors):
        if isinstance(entry, Sequence) and not isinstance(entry, (str, bytes)):
            if len(entry) != spatial_dims:
                raise ValueError(
                    f"{name}[{i}] = {list(entry)!r} has {len(entry)} axes, but spatial_dims is {spatial_dims}: "
                    f"give one integer per spatial axis, or a single integer for all axes."
                )
            axes = tuple(entry)
        else:
            axes = (entry,) * spatial_dims
        for f in axes:
            if isinstance(f, bool) or not isinstance(f, numbers.Integral) or f < 1:
                raise ValueError(f"{name}[{i}] = {entry!r}: every factor must be a positive integer, got {f!r}.")
        out.append(tuple(int(f) for f in axes))
    return tuple(out)


def total_factor(factors: Factors) -> tuple[int, ...]:
    """Product of the per-level factors, per axis."""
    return tuple(math.prod(axis) for axis in zip(*factors)) if factors else ()


class FactorDownsample(nn.Module):
    """Strided convolution with kernel ``f + 1`` and stride ``f`` per axis, after a (0, 1) pad.

    A kernel smaller than its stride skips voxels (kernel 3 at stride 4 never reads one row in
    four), so the kernel grows with the factor: each output voxel reads its own ``f``-cell plus one
    voxel of the next, and every input voxel reaches the output. For ``f = 2`` this is MONAI's
    ``AEKLDownsample`` (kernel 3, stride 2), with the same parameter names.
    """

    def __init__(self, spatial_dims: int, in_channels: int, factor: Sequence[int]) -> None:
        super().__init__()
        self.factor = tuple(factor)
        self.pad = AsymmetricPad(spatial_dims=spatial_dims)
        self.conv = Convolution(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=in_channels,
            strides=self.factor,
            kernel_size=tuple(f + 1 for f in self.factor),
            padding=0,
            conv_only=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pad(x))


def _cell_patterns(n: int, pool: bool = False) -> tuple[str, str, list[str], list[str]]:
    """einops patterns of ``n`` spatial axes: the full-resolution side (each axis split into coarse
    ``s``, packed ``k`` and, with ``pool``, averaged ``p`` positions) and the packed side, where the
    ``k`` positions become channels in the order ``(c k0 k1 ...)``."""
    s, k, p = ([f"{name}{i}" for i in range(n)] for name in "skp")
    full = " ".join(f"({a} {b}{' ' + c if pool else ''})" for a, b, c in zip(s, k, p))
    packed = f"b (c {' '.join(k)}) {' '.join(s)}"
    return f"b c {full}", packed, k, p


def _space_to_depth(x: torch.Tensor, factor: Sequence[int]) -> torch.Tensor:
    full, packed, k, _ = _cell_patterns(len(factor))
    return rearrange(x, f"{full} -> {packed}", **dict(zip(k, factor)))


def _depth_to_space(x: torch.Tensor, factor: Sequence[int]) -> torch.Tensor:
    full, packed, k, _ = _cell_patterns(len(factor))
    return rearrange(x, f"{packed} -> {full}", **dict(zip(k, factor)))


class SpaceToDepth(nn.Module):
    """Lossless rearrangement of each ``f``-cell of voxels into channels (pixel-unshuffle, any dims)."""

    def __init__(self, factor: Sequence[int]) -> None:
        super().__init__()
        self.factor = tuple(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _space_to_depth(x, self.factor)


class DepthToSpace(nn.Module):
    """Inverse of :class:`SpaceToDepth` (pixel-shuffle, any dims)."""

    def __init__(self, factor: Sequence[int]) -> None:
        super().__init__()
        self.factor = tuple(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _depth_to_space(x, self.factor)


def shortcut_factors(total: Sequence[int], in_channels: int, latent_channels: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """How the latent shortcut maps each ``total``-cell of voxels to ``latent_channels`` values:
    average-pool by ``pool`` per axis, then space-to-depth by ``keep`` (``total = pool * keep`` per
    axis, ``in_channels * prod(keep) = latent_channels``). Among the ways to split, the pooling is
    the most even over the axes, so the shortcut blurs no axis more than it must."""
    best = None
    for keep in itertools.product(*(_divisors(f) for f in total)):
        if in_channels * math.prod(keep) != latent_channels:
            continue
        pool = tuple(f // k for f, k in zip(total, keep))
        spread = max(pool) / min(pool)
        if best is None or spread < best[0]:
            best = (spread, pool, tuple(keep))
    if best is None:
        raise ValueError(
            f"shortcut='pool' needs latent_channels ({latent_channels}) = in_channels ({in_channels}) x a product of one "
            f"divisor of each axis' total factor {list(total)} (e.g. {in_channels * math.prod(total)} keeps every voxel); "
            f"choose such latent_channels, or shortcut='cosine', which takes any."
        )
    return best[1], best[2]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def cosine_basis(total: Sequence[int], in_channels: int, latent_channels: int) -> torch.Tensor:
    """The ``cosine`` shortcut's analysis matrix, ``(prod(total), latent_channels // in_channels)``:
    the orthonormal DCT-II basis of a ``total``-cell of voxels, lowest spatial frequencies first
    (by the sum over the axes of cycles per voxel, then the largest), scaled by ``1 / prod(total)**0.5``
    so that the first column takes the cell's mean. Keeping the lowest frequencies is the linear
    code that natural images compress best into: at 8x with 128 values per 8x8x8 cell it keeps
    3.3 dB more of the validation MRI than average-pooling into as many values (docs/quality.md)."""
    n = math.prod(total)
    if latent_channels % in_channels or not 0 < latent_channels // in_channels <= n:
        raise ValueError(
            f"shortcut='cosine' needs latent_channels ({latent_channels}) = in_channels ({in_channels}) x a number of "
            f"frequencies from 1 to {n} (the voxels of a {'x'.join(map(str, total))} cell); choose such latent_channels."
        )
    axes = []
    for f in total:  # DCT-II, orthonormal: rows are frequencies
        i = torch.arange(f, dtype=torch.float64)
        rows = torch.cos(math.pi * (i[None] + 0.5) * i[:, None] / f) * math.sqrt(2.0 / f)
        rows[0] /= math.sqrt(2.0)
        axes.append(rows)

    def order(freq: tuple[int, ...]) -> tuple:
        cycles = [Fraction(a, f) for a, f in zip(freq, total)]
        return sum(cycles), max(cycles), freq

    kept = sorted(itertools.product(*(range(f) for f in total)), key=order)[: latent_channels // in_channels]
    columns = []
    for freq in kept:
        column = axes[0][freq[0]]
        for rows, a in zip(axes[1:], freq[1:]):
            column = torch.outer(column, rows[a]).flatten()
        columns.append(column)
    return (torch.stack(columns, 1) / math.sqrt(n)).float()


class ChannelNorm(nn.Module):
    """Layer normalisation over the channels of each voxel, with a learned scale and shift per channel.

    Unlike ``GroupNorm`` it takes no statistics over space, so a voxel's output depends on its
    receptive field alone: a volume reconstructed in sliding windows equals the volume reconstructed
    whole (up to the windows' borders), and a network trained on patches sees the same statistics at
    inference on whole volumes. Its parameters are named as ``GroupNorm``'s (``weight``, ``bias``).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.layer_norm(x.movedim(1, -1), (self.num_channels,), self.weight, self.bias, self.eps)
        return x.movedim(-1, 1)


def _conv3(spatial_dims: int, in_channels: int, out_channels: int) -> Convolution:
    return Convolution(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        strides=1,
        kernel_size=3,
        padding=1,
        conv_only=True,
    )


def _upsample(spatial_dims: int, channels: int, factor: Sequence[int], use_convtranspose: bool) -> nn.Module:
    """MONAI's upsampling (transposed conv, or nearest + conv) with a per-axis integer factor."""
    if use_convtranspose:
        return Upsample(
            spatial_dims=spatial_dims,
            mode="deconv",
            in_channels=channels,
            out_channels=channels,
            scale_factor=tuple(factor),
        )
    scale: float | tuple[float, ...] = 2.0 if set(factor) == {2} else tuple(float(f) for f in factor)
    return Upsample(
        spatial_dims=spatial_dims,
        mode="nontrainable",
        in_channels=channels,
        out_channels=channels,
        interp_mode="nearest",
        scale_factor=scale,
        post_conv=_conv3(spatial_dims, channels, channels),
        align_corners=None,
    )


class _LevelBuilder:
    """Shared block builder, so encoder and decoder stack levels the way MONAI's do."""

    def __init__(
        self, spatial_dims: int, norm_num_groups: int, norm_eps: float, attn_kwargs: dict[str, Any], norm: str = "group"
    ):
        self.spatial_dims = spatial_dims
        self.norm_num_groups = norm_num_groups
        self.norm_eps = norm_eps
        self.attn_kwargs = attn_kwargs
        self.norm_type = norm

    def res(self, in_channels: int, out_channels: int) -> AEKLResBlock:
        block = AEKLResBlock(self.spatial_dims, in_channels, self.norm_num_groups, self.norm_eps, out_channels)
        if self.norm_type == "channel":
            block.norm1 = self.norm(in_channels)
            block.norm2 = self.norm(out_channels)
        return block

    def attn(self, channels: int) -> SpatialAttentionBlock:
        return SpatialAttentionBlock(
            spatial_dims=self.spatial_dims,
            num_channels=channels,
            norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps,
            **self.attn_kwargs,
        )

    def level(self, in_channels: int, out_channels: int, num_res_blocks: int, attention: bool) -> list[nn.Module]:
        blocks: list[nn.Module] = []
        for _ in range(num_res_blocks):
            blocks.append(self.res(in_channels, out_channels))
            in_channels = out_channels
            if attention:
                blocks.append(self.attn(in_channels))
        return blocks

    def nonlocal_attn(self, channels: int) -> list[nn.Module]:
        return [self.res(channels, channels), self.attn(channels), self.res(channels, channels)]

    def norm(self, channels: int) -> nn.Module:
        if self.norm_type == "channel":
            return ChannelNorm(channels, eps=self.norm_eps)
        return nn.GroupNorm(num_groups=self.norm_num_groups, num_channels=channels, eps=self.norm_eps, affine=True)


class FactorEncoder(nn.Module):
    """MONAI's AutoencoderKL ``Encoder`` with a downsampling factor per level and axis.

    Block order matches MONAI's, so with all factors 2 and the ``"strided"`` layout the
    ``blocks.N`` parameter names are MONAI's.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int],
        out_channels: int,
        num_res_blocks: Sequence[int],
        norm_num_groups: int,
        norm_eps: float,
        attention_levels: Sequence[bool],
        with_nonlocal_attn: bool = True,
        include_fc: bool = True,
        use_combined_linear: bool = False,
        use_flash_attention: bool = False,
        downsample_factors: Sequence[int | Sequence[int]] | None = None,
        layout: str = "strided",
        norm: str = "group",
    ) -> None:
        super().__init__()
        _check_layout(layout, len(channels))
        _check_norm(norm)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.channels = channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.norm_num_groups = norm_num_groups
        self.norm_eps = norm_eps
        self.attention_levels = attention_levels
        self.layout = layout
        self.downsample_factors = normalize_factors(
            downsample_factors, len(channels), spatial_dims, "downsample_factors", channels
        )
        build = _LevelBuilder(
            spatial_dims,
            norm_num_groups,
            norm_eps,
            dict(include_fc=include_fc, use_combined_linear=use_combined_linear, use_flash_attention=use_flash_attention),
            norm,
        )

        blocks: list[nn.Module] = []
        if layout == "space_to_depth":
            stem = self.downsample_factors[0]
            blocks += [SpaceToDepth(stem), _conv3(spatial_dims, in_channels * math.prod(stem), channels[0])]
        else:
            blocks.append(_conv3(spatial_dims, in_channels, channels[0]))
        level_in = channels[0]
        for i, level_out in enumerate(channels):
            blocks += build.level(level_in, level_out, num_res_blocks[i], attention_levels[i])
            level_in = level_out
            if i == len(channels) - 1:
                break
            if layout == "strided":
                blocks.append(FactorDownsample(spatial_dims, level_in, self.downsample_factors[i]))
            elif i > 0:
                blocks.append(FactorDownsample(spatial_dims, level_in, self.downsample_factors[i]))
        if with_nonlocal_attn:
            blocks += build.nonlocal_attn(channels[-1])
        blocks += [build.norm(channels[-1]), _conv3(spatial_dims, channels[-1], out_channels)]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class FactorDecoder(nn.Module):
    """MONAI's AutoencoderKL ``Decoder`` with an upsampling factor per level and axis.

    ``upsample_factors`` is in the decoder's own order (deepest transition first); ``None`` means
    2 everywhere. The autoencoder passes the mirror of its encoder's factors.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: Sequence[int],
        in_channels: int,
        out_channels: int,
        num_res_blocks: Sequence[int],
        norm_num_groups: int,
        norm_eps: float,
        attention_levels: Sequence[bool],
        with_nonlocal_attn: bool = True,
        use_convtranspose: bool = False,
        include_fc: bool = True,
        use_combined_linear: bool = False,
        use_flash_attention: bool = False,
        upsample_factors: Sequence[int | Sequence[int]] | None = None,
        layout: str = "strided",
        norm: str = "group",
    ) -> None:
        super().__init__()
        _check_layout(layout, len(channels))
        _check_norm(norm)
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.norm_num_groups = norm_num_groups
        self.norm_eps = norm_eps
        self.attention_levels = attention_levels
        self.layout = layout
        self.upsample_factors = normalize_factors(
            upsample_factors, len(channels), spatial_dims, "upsample_factors", channels
        )
        build = _LevelBuilder(
            spatial_dims,
            norm_num_groups,
            norm_eps,
            dict(include_fc=include_fc, use_combined_linear=use_combined_linear, use_flash_attention=use_flash_attention),
            norm,
        )

        rev_channels = list(reversed(channels))
        rev_attention = list(reversed(attention_levels))
        rev_res_blocks = list(reversed(num_res_blocks))
        last = len(channels) - 1
        blocks: list[nn.Module] = [_conv3(spatial_dims, in_channels, rev_channels[0])]
        if with_nonlocal_attn:
            blocks += build.nonlocal_attn(rev_channels[0])
        level_in = rev_channels[0]
        for i, level_out in enumerate(rev_channels):
            blocks += build.level(level_in, level_out, rev_res_blocks[i], rev_attention[i])
            level_in = level_out
            if i == last:
                break
            if layout == "strided" or i < last - 1:
                blocks.append(_upsample(spatial_dims, level_in, self.upsample_factors[i], use_convtranspose))
        blocks.append(build.norm(level_in))
        if layout == "space_to_depth":
            head = self.upsample_factors[-1]
            blocks += [_conv3(spatial_dims, level_in, out_channels * math.prod(head)), DepthToSpace(head)]
        else:
            blocks.append(_conv3(spatial_dims, level_in, out_channels))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")


def _check_shortcut(shortcut: str | bool | None) -> str | None:
    """``None`` (no shortcut), ``"pool"`` or ``"cosine"``; ``True`` is ``"pool"``, as before ``"cosine"`` existed."""
    if shortcut is None or shortcut is False:
        return None
    if shortcut is True:
        return "pool"
    if shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {SHORTCUTS}, True (pool), False or None, got {shortcut!r}.")
    return shortcut


def _read_shortcut(saved: torch.Tensor | None) -> str | None:
    if saved is None:  # saved before the shortcut existed
        return None
    if saved.dtype == torch.bool:
        return "pool" if bool(saved) else None
    return bytes(saved.tolist()).decode()


def _check_layout(layout: str, num_levels: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    if layout == "space_to_depth" and num_levels < 2:
        raise ValueError("layout 'space_to_depth' needs at least two levels (len(channels) >= 2).")


_FACTORS_KEY = "downsample_factors"
_LAYOUT_KEY = "layout"
_NORM_KEY = "norm"
_SHORTCUT_KEY = "shortcut"


class FactorAutoencoderKL(AutoencoderKL):
    """MONAI's ``AutoencoderKL`` whose downsampling factor is chosen per level, and per axis.

    Args:
        downsample_factors: one entry per level transition (``len(channels) - 1``), each an integer
            (same factor on every axis) or one integer per spatial axis, e.g. ``[[2, 2, 1], [2, 2, 2]]``
            for thick-slice MRI. ``None`` means 2 everywhere. A factor of 1 keeps that axis' resolution.
        layout: ``"strided"`` (MONAI's layout, loads MONAI weights) or ``"space_to_depth"`` (the
            memory-efficient layout, see the module docstring).
        norm: ``"group"`` (MONAI's ``GroupNorm``: statistics over each input, so a volume processed in
            windows differs from the volume processed whole) or ``"channel"`` (:class:`ChannelNorm`,
            statistics over the channels of each voxel: the result does not depend on the window).
            The attention blocks keep ``GroupNorm`` and attend within a window: use ``"channel"``
            without attention where windowed inference must match whole-volume inference.
        shortcut: add a parameter-free linear code of each cell of voxels (a cell per latent voxel)
            to ``z_mu``, and its inverse to the decoder's output (residual autoencoding): the network
            then learns what the linear code misses instead of carrying every intensity through its
            normalisation layers. ``"cosine"``: the cell's lowest spatial frequencies
            (:func:`cosine_basis`), any ``latent_channels`` up to ``in_channels`` x the cell's voxels;
            ``"pool"`` (or ``True``): the cell average-pooled and packed into channels, repeated back
            (:func:`shortcut_factors`), ``latent_channels = in_channels x`` a product of divisors of
            the total factor. ``None`` or ``False``: no shortcut.

    The other arguments are MONAI's. ``encode``/``decode``/``sampling``/``reconstruct``/
    ``encode_stage_2_inputs``/``decode_stage_2_outputs`` are MONAI's, so ``LatentDiffusionInferer``
    works unchanged. Networks with non-default factors or layout record them in their state dict, and
    loading a state dict recorded with other factors fails with an error that names both (with
    ``strict=False`` too: drop the two entries yourself to transplant weights on purpose).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        out_channels: int = 1,
        num_res_blocks: Sequence[int] | int = (2, 2, 2, 2),
        channels: Sequence[int] = (32, 64, 64, 64),
        attention_levels: Sequence[bool] = (False, False, True, True),
        latent_channels: int = 3,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        with_encoder_nonlocal_attn: bool = True,
        with_decoder_nonlocal_attn: bool = True,
        use_checkpoint: bool = False,
        use_convtranspose: bool = False,
        include_fc: bool = True,
        use_combined_linear: bool = False,
        use_flash_attention: bool = False,
        downsample_factors: Sequence[int | Sequence[int]] | None = None,
        layout: str = "strided",
        norm: str = "group",
        shortcut: str | bool | None = False,
    ) -> None:
        # MONAI's __init__ hard-codes its Encoder/Decoder (factor 2): calling it would build and then
        # discard two networks. We build the same submodules (same names, so state dicts are
        # interchangeable) with the factor-aware ones, validating everything first. What MONAI's methods
        # and blocks expect of us is pinned by tests/test_networks.py::test_monai_internals_we_build_on.
        nn.Module.__init__(self)
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}.")
        if any(c % norm_num_groups != 0 for c in channels):
            raise ValueError(f"every entry of channels {tuple(channels)} must be a multiple of norm_num_groups={norm_num_groups}.")
        if len(channels) != len(attention_levels):
            raise ValueError(
                f"attention_levels {tuple(attention_levels)} must have one entry per level of channels {tuple(channels)}."
            )
        num_res_blocks = ensure_tuple_rep(num_res_blocks, len(channels))
        _check_layout(layout, len(channels))
        _check_norm(norm)
        factors = normalize_factors(downsample_factors, len(channels), spatial_dims, "downsample_factors", channels)

        self.spatial_dims = spatial_dims
        self.downsample_factors: Factors = factors
        self.layout = layout
        self.norm = norm
        self.shortcut = _check_shortcut(shortcut)
        if self.shortcut == "pool":
            self.shortcut_pool, self.shortcut_keep = shortcut_factors(total_factor(factors), in_channels, latent_channels)
        elif self.shortcut == "cosine":  # rebuilt from the arguments, not saved
            self.register_buffer("shortcut_basis", cosine_basis(total_factor(factors), in_channels, latent_channels), persistent=False)
        shared = dict(
            spatial_dims=spatial_dims,
            channels=channels,
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            attention_levels=attention_levels,
            include_fc=include_fc,
            use_combined_linear=use_combined_linear,
            use_flash_attention=use_flash_attention,
            layout=layout,
            norm=norm,
        )
        self.encoder: nn.Module = FactorEncoder(
            in_channels=in_channels,
            out_channels=latent_channels,
            with_nonlocal_attn=with_encoder_nonlocal_attn,
            downsample_factors=factors,
            **shared,
        )
        self.decoder: nn.Module = FactorDecoder(
            in_channels=latent_channels,
            out_channels=out_channels,
            with_nonlocal_attn=with_decoder_nonlocal_attn,
            use_convtranspose=use_convtranspose,
            upsample_factors=tuple(reversed(factors)),
            **shared,
        )
        self.quant_conv_mu = self._conv1(latent_channels)
        self.quant_conv_log_sigma = self._conv1(latent_channels)
        self.post_quant_conv = self._conv1(latent_channels)
        self.latent_channels = latent_channels
        self.use_checkpoint = use_checkpoint
        self.register_state_dict_post_hook(_record_factors)
        self.register_load_state_dict_pre_hook(_check_factors)

    def _conv1(self, channels: int) -> Convolution:
        return Convolution(
            spatial_dims=self.spatial_dims,
            in_channels=channels,
            out_channels=channels,
            strides=1,
            kernel_size=1,
            padding=0,
            conv_only=True,
        )

    @property
    def total_factor(self) -> tuple[int, ...]:
        """Total downsampling per spatial axis (the product of the per-level factors)."""
        return total_factor(self.downsample_factors)

    @property
    def spatial_multiple(self) -> tuple[int, ...]:
        """What every input spatial size must be divisible by, per axis (``DivisiblePadd``'s ``k``)."""
        return self.total_factor

    @property
    def is_monai_default(self) -> bool:
        """True when the network is MONAI's AutoencoderKL (strided layout, factor 2 everywhere)."""
        return (
            self.layout == "strided"
            and self.norm == "group"
            and not self.shortcut
            and all(set(f) == {2} for f in self.downsample_factors)
        )

    def latent_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Latent spatial shape for an input of ``spatial_shape``; raises if it is not divisible."""
        self._check_divisible(tuple(spatial_shape))
        return tuple(s // f for s, f in zip(spatial_shape, self.total_factor))

    def _check_divisible(self, spatial_shape: tuple[int, ...]) -> None:
        if len(spatial_shape) != self.spatial_dims:
            raise ValueError(
                f"input spatial shape {spatial_shape} has {len(spatial_shape)} axes, expected spatial_dims={self.spatial_dims}."
            )
        if any(s % m for s, m in zip(spatial_shape, self.spatial_multiple)):
            raise ValueError(
                f"input spatial shape {spatial_shape} is not divisible by {self.spatial_multiple}, the total "
                f"downsampling factor per axis of downsample_factors {format_factors(self.downsample_factors)}; pad the input "
                f"(e.g. DivisiblePadd(k={list(self.spatial_multiple)})) or crop it."
            )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            self._check_divisible(tuple(x.shape[2:]))
        z_mu, z_sigma = super().encode(x)
        if self.shortcut is not None:
            z_mu = z_mu + self._code(x).to(z_mu.dtype if self.shortcut == "pool" else torch.float32)  # cosine: float32 under autocast too
        return z_mu, z_sigma

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            return super().decode(z)
        cells = self._cells(z)
        if not self._adds_to_code(_output_convs(self)[0]):
            return cells  # the decoder's output is exactly zero: only its cost is skipped
        dec = super().decode(z)
        return dec + (cells.to(dec.dtype) if self.shortcut == "pool" else cells)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """MONAI's ``reconstruct`` (the decoded ``z_mu``), without the encoder where it adds nothing
        to the shortcut's code (``quant_conv_mu`` zero): its ``z_sigma`` is not used here."""
        if self.shortcut is None or self._adds_to_code(self.quant_conv_mu.conv):
            return super().reconstruct(x)
        self._check_divisible(tuple(x.shape[2:]))
        return self.decode(self._code(x))

    def _adds_to_code(self, conv: nn.Module) -> bool:
        """Whether ``conv``, one of the two layers that add to the shortcut's code (``_output_convs``),
        can change the output. The 4x and 8x networks that ship are their code alone (docs/quality.md):
        both layers are zero, and the encoder and decoder behind them, whose output they zero, cost
        seconds per volume on a CPU for nothing. Checked only outside autograd, compilation and
        tracing (inference, validation), so that training runs every layer as before."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return True
        return bool(conv.weight.any()) or (conv.bias is not None and bool(conv.bias.any()))

    def _code(self, x: torch.Tensor) -> torch.Tensor:
        """The shortcut's code of ``x``: each cell's mean (``pool``) or its lowest frequencies (``cosine``)."""
        if self.shortcut == "pool":
            full, packed, k, p = _cell_patterns(self.spatial_dims, pool=True)
            return reduce(x, f"{full} -> {packed}", "mean", **dict(zip(k, self.shortcut_keep)), **dict(zip(p, self.shortcut_pool)))
        return self._cosine(x, analysis=True)

    def _cells(self, z: torch.Tensor) -> torch.Tensor:
        """The cells that the shortcut's code ``z`` stands for: the inverse of :meth:`_code`."""
        if self.shortcut == "pool":
            full, packed, k, p = _cell_patterns(self.spatial_dims, pool=True)
            return repeat(z, f"{packed} -> {full}", **dict(zip(k, self.shortcut_keep)), **dict(zip(p, self.shortcut_pool)))
        return self._cosine(z, analysis=False)

    def _cosine(self, x: torch.Tensor, analysis: bool) -> torch.Tensor:
        """Each cell of ``x`` to its frequencies (``analysis``), or frequencies back to cells, in
        float32 whatever the autocast: the code carries every intensity the decoder returns."""
        s = " ".join(f"s{i}" for i in range(self.spatial_dims))
        k = [f"k{i}" for i in range(self.spatial_dims)]
        full = "b c " + " ".join(f"(s{i} {a})" for i, a in enumerate(k))
        cells, coeffs, packed = f"b {s} c ({' '.join(k)})", f"b {s} c j", f"b (c j) {s}"
        sizes = dict(zip(k, self.total_factor))
        basis = self.shortcut_basis.float()
        with torch.autocast(x.device.type, enabled=False):
            if analysis:
                return rearrange(rearrange(x.float(), f"{full} -> {cells}", **sizes) @ basis, f"{coeffs} -> {packed}")
            values = (rearrange(x.float(), f"{packed} -> {coeffs}", j=basis.shape[1]) * basis.shape[0]) @ basis.T  # scale the few coefficients, not the basis
            return rearrange(values, f"{cells} -> {full}", **sizes)


def format_factors(factors: Factors) -> str:
    """Factors as a user wrote them: ``(4, 2)`` when isotropic, per-axis lists otherwise."""
    if all(len(set(f)) == 1 for f in factors):
        return str(tuple(f[0] for f in factors))
    return str([list(f) for f in factors])


def _record_factors(module: FactorAutoencoderKL, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    if not module.is_monai_default:
        state_dict[prefix + _FACTORS_KEY] = torch.tensor(module.downsample_factors, dtype=torch.int64)
        state_dict[prefix + _LAYOUT_KEY] = torch.tensor(list(module.layout.encode()), dtype=torch.uint8)
        state_dict[prefix + _NORM_KEY] = torch.tensor(list(module.norm.encode()), dtype=torch.uint8)
        # False and True (pool) as saved before the cosine shortcut existed, so that older code reads them
        kind = module.shortcut
        state_dict[prefix + _SHORTCUT_KEY] = torch.tensor(list(kind.encode()), dtype=torch.uint8) if kind == "cosine" else torch.tensor(kind == "pool")


def _check_factors(
    module: FactorAutoencoderKL,
    state_dict: dict,
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    """Refuse a state dict recorded with other factors or layout, naming both sides. (PyTorch gives
    load pre-hooks ``strict=True`` whatever the caller asked, so this refuses in both modes.)"""
    factors_t = state_dict.pop(prefix + _FACTORS_KEY, None)
    layout_t = state_dict.pop(prefix + _LAYOUT_KEY, None)
    norm_t = state_dict.pop(prefix + _NORM_KEY, None)
    shortcut_t = state_dict.pop(prefix + _SHORTCUT_KEY, None)
    if factors_t is None:
        theirs = (tuple((2,) * module.spatial_dims for _ in module.downsample_factors), "strided", "group", None)
        origin = " (no factors recorded: MONAI's default)"
    else:
        theirs = (
            tuple(tuple(int(v) for v in row) for row in factors_t.tolist()),
            bytes(layout_t.tolist()).decode() if layout_t is not None else "strided",
            bytes(norm_t.tolist()).decode() if norm_t is not None else "group",  # saved before norm was recorded
            _read_shortcut(shortcut_t),
        )
        origin = ""
    ours = (module.downsample_factors, module.layout, module.norm, module.shortcut)
    if theirs != ours:  # also with strict=False: weights of other factors are never what was meant
        raise ValueError(
            f"checkpoint was saved with downsample_factors {format_factors(theirs[0])}, layout {theirs[1]!r}, norm {theirs[2]!r}, "
            f"shortcut {theirs[3]!r}{origin}, but this network has downsample_factors {format_factors(ours[0])}, layout {ours[1]!r}, "
            f"norm {ours[2]!r}, shortcut {ours[3]!r}."
        )


def start_at_shortcut(autoencoder: AutoencoderKL) -> AutoencoderKL:
    """Make a new network with a latent shortcut reconstruct exactly its shortcut's code: zero the
    decoder's output convolution and ``quant_conv_mu``, so that the network adds nothing to the code
    until training finds what the code misses (both layers get gradients from the first step).
    Started at random instead, a network with the cosine shortcut begins far below its code and
    spends thousands of iterations getting back to it (docs/quality.md). A network without a
    shortcut is returned unchanged."""
    if getattr(autoencoder, "shortcut", None):
        with torch.no_grad():
            for conv in _output_convs(autoencoder):
                conv.weight.zero_()
                conv.bias.zero_()
    return autoencoder


def _output_convs(autoencoder: AutoencoderKL) -> tuple[nn.Module, nn.Module]:
    """The two layers whose output adds to the shortcut's code: the decoder's last convolution and
    ``quant_conv_mu``."""
    output = [m for m in autoencoder.decoder.blocks if isinstance(m, Convolution)][-1]
    return output.conv, autoencoder.quant_conv_mu.conv


def parameter_groups(autoencoder: AutoencoderKL, learning_rate: float, output_lr_scale: float = 1.0) -> list[dict]:
    """The optimizer's parameter groups: the output layers of a network with a latent shortcut
    (``_output_convs``) at ``output_lr_scale`` times the learning rate, the rest at it.

    Adam moves every weight by about the learning rate whatever its gradient, and an output voxel
    adds up over a thousand such weights, so at full rate these layers shake the reconstruction
    by more than what training can add above the code; a network fitting two patches climbed
    7.6 dB above its code only with them at 1/100 (docs/quality.md). A scale of 1, or a network
    without a shortcut, gives one group, as ``autoencoder.parameters()``."""
    if output_lr_scale <= 0:
        raise ValueError(f"output_lr_scale must be > 0, got {output_lr_scale}.")
    trained = [q for q in autoencoder.parameters() if q.requires_grad]  # not a frozen encoder's (freeze_encoder)
    if output_lr_scale == 1 or not getattr(autoencoder, "shortcut", None):
        return [{"params": trained, "lr": learning_rate}]
    outputs = {id(q) for conv in _output_convs(autoencoder) for q in conv.parameters()}
    groups = [
        {"params": [q for q in trained if id(q) not in outputs], "lr": learning_rate},
        {"params": [q for q in trained if id(q) in outputs], "lr": learning_rate * output_lr_scale},
    ]
    return [group for group in groups if group["params"]]


ENCODER_MODULES = ("encoder", "quant_conv_mu", "quant_conv_log_sigma")  # what makes the latents


def encoder_fingerprint(autoencoder: AutoencoderKL) -> str:
    """A short sha256 of the weights that make the latents (``ENCODER_MODULES``), in half precision
    as the shipped weights are stored, so a checkpoint and its half-precision copy agree. A
    diffusion model records it, and sampling refuses an autoencoder whose latents it never saw."""
    digest = hashlib.sha256()
    for name in ENCODER_MODULES:
        for key, value in sorted(getattr(autoencoder, name).state_dict().items()):
            value = value.detach().cpu()
            digest.update(f"{name}.{key}".encode())
            digest.update((value.half() if value.is_floating_point() else value).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def freeze_encoder(autoencoder: AutoencoderKL, freeze: bool, init_from: str | None) -> AutoencoderKL:
    """Keep the encoder of the weights ``init_from`` names and train only the decoder: the encoder,
    ``quant_conv_mu`` and ``quant_conv_log_sigma`` get no gradients, so every latent (and the
    ``encoder_fingerprint``) stays what it was, and a diffusion model trained on those latents stays
    valid with the new decoder."""
    if freeze:
        if not init_from:
            raise ValueError(
                "freeze_encoder: true keeps the encoder of a trained autoencoder, but init_from is null; "
                "set init_from to the model_autoencoder.pt whose encoder (and latent space) to keep."
            )
        for name in ENCODER_MODULES:
            getattr(autoencoder, name).requires_grad_(False)
    return autoencoder


def init_posterior(autoencoder: AutoencoderKL, log_var: float | None) -> AutoencoderKL:
    """Start the posterior narrow: set the bias of ``quant_conv_log_sigma`` (it outputs the log
    variance of ``z``) to ``log_var``; ``None`` keeps PyTorch's initialisation.

    With the default bias near 0 the sampled latent starts with noise of standard deviation 1, as
    large as the signal, and with a small KL weight only the reconstruction loss narrows it, slowly.
    With the latent shortcut that noise also reaches the output directly, so a narrow start
    (``log_var = -8``: sigma 0.02) trains faster early; without the shortcut it measured no better
    (docs/quality.md). ``log_var`` is the noise each output voxel gets through the shortcut: the
    cosine shortcut adds up the noise of its ``k`` frequencies in every voxel, so there each latent
    value starts ``k`` times narrower in variance.
    """
    if log_var is not None:
        if getattr(autoencoder, "shortcut", None) == "cosine":
            log_var = float(log_var) - math.log(autoencoder.shortcut_basis.shape[1])
        nn.init.constant_(autoencoder.quant_conv_log_sigma.conv.bias, float(log_var))
    return autoencoder


class Reconstructor(nn.Module):
    """An autoencoder as one tensor in, one tensor out: the deterministic reconstruction (decoded
    ``z_mu``) in float32. For sliding-window inference, metrics, ``verify_net_in_out`` and TorchScript
    export; its state dict is the autoencoder's own, so the autoencoder's checkpoints load into it.
    Use it as the top-level module (nested in another module its keys would not round-trip)."""

    def __init__(self, autoencoder: AutoencoderKL) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.reconstruct(x).float()

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:  # type: ignore[override]
        return self.autoencoder.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        return self.autoencoder.load_state_dict(state_dict, strict=strict, assign=assign)
