"""The latent diffusion model's pieces, built on MONAI's ``DiffusionModelUNet``,
``DiffusionPrepareBatch`` and its inferers: a class-conditioned UNet that MONAI's inferers guide as
they are, the training volumes encoded once into latents, the latent scale factor, the training
batch (latents sampled and scaled, class labels dropped for classifier-free guidance), and the
checks of latent and image sizes against the UNet, made before any training or sampling starts."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from monai.engines.utils import DiffusionPrepareBatch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import Scheduler

from scripts.checkpoints import load_checkpoint

logger = logging.getLogger(__name__)

NO_CLASS = -1  # the label of "no class": MONAI's cfg_fill_value default, what guidance fills the unconditioned half with


class ClassConditionedDiffusionModelUNet(DiffusionModelUNet):
    """MONAI's ``DiffusionModelUNet`` whose class label arrives as the condition of MONAI's inferers.

    ``DiffusionInferer`` and ``LatentDiffusionInferer`` hand a condition to the network as ``context``
    (cross-attention). With ``num_class_embeds`` set, this UNet reads an integer ``context`` of shape
    (N,) as the class labels instead; its last embedding stands for "no class", given as label -1
    (the ``cfg_fill_value`` that classifier-free guidance fills the unconditioned half with) or as
    no context at all. So ``LatentDiffusionInferer.sample(..., conditioning=labels, cfg=scale)``
    guides with MONAI's own sampling loop. Same arguments and weights as ``DiffusionModelUNet``;
    with ``num_class_embeds=None`` it is that network.
    """

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        down_block_additional_residuals: tuple[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if context is not None and not torch.is_floating_point(context):
            context, class_labels = None, context.reshape(-1)
        if self.num_class_embeds is None:
            if class_labels is not None:
                raise ValueError("this diffusion model is unconditional (num_class_embeds is None), but class labels were given.")
        else:
            no_class = self.num_class_embeds - 1
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), NO_CLASS, device=x.device, dtype=torch.long)
            # checked where reading them costs no wait for the GPU: labels on the GPU come from the
            # datalist's classes (scripts.data.with_class_index) or a checked --condition, and a
            # check there would stop the host at every step until the GPU caught up
            if class_labels.device.type == "cpu" and bool(((class_labels < NO_CLASS) | (class_labels >= no_class)).any()):
                raise ValueError(
                    f"class labels {class_labels.tolist()} out of range: expected 0..{no_class - 1}, or {NO_CLASS} for no class."
                )
            class_labels = class_labels.to(device=x.device, dtype=torch.long)
            class_labels = torch.where(class_labels == NO_CLASS, no_class, class_labels)
        return super().forward(
            x, timesteps, context, class_labels, down_block_additional_residuals, mid_block_additional_residual
        )


@torch.no_grad()
def encode_volumes(autoencoder: nn.Module, data_loader: Iterable, device: torch.device | str, flips: bool = True) -> list[dict]:
    """Every training volume through the frozen encoder once, and with ``flips`` its left-right
    mirror image too: the posterior's mean and spread (``z_mu``, ``z_sigma``) of each, with the
    volume's class label (``class_index``). Training then samples latents from them at each step and
    never runs the autoencoder again, so a step costs the UNet alone. They are kept where
    :func:`latent_storage` says."""
    autoencoder.eval()
    latents: list[dict] = []
    volumes = 0
    for batch in data_loader:
        images = batch["image"].as_tensor() if hasattr(batch["image"], "as_tensor") else batch["image"]
        images = images.to(device)
        volumes += len(images)
        for view in (images, images.flip(2)) if flips else (images,):
            z_mu, z_sigma = autoencoder.encode(view)
            for i in range(len(view)):
                item = {"z_mu": z_mu[i].float().cpu(), "z_sigma": z_sigma[i].float().cpu()}
                if "class_index" in batch:
                    item["class_index"] = int(batch["class_index"][i])
                latents.append(item)
    if not latents:
        raise ValueError("the training data loader gave no volume; nothing to train the diffusion model on.")
    storage = latent_storage(latents, device)
    logger.info(f"encoded {volumes} training volume(s) into {len(latents)} latents of shape {list(latents[0]['z_mu'].shape)}, "
                f"kept in {'GPU' if storage.type == 'cuda' else 'host'} memory")
    return [{k: v.to(storage) if torch.is_tensor(v) else v for k, v in item.items()} for item in latents]


def latent_storage(latents: Sequence[dict], device: torch.device | str, share: float = 0.25) -> torch.device:
    """Where the training latents live: on the GPU that trains, where they take at most ``share`` of
    its memory (each step's batch is then gathered there, with no copy from the host: the latents are
    small, 4 MB per 128^3 volume at 4x), else in host memory, which any number of volumes fits."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.device("cpu")
    size = sum(v.numel() * v.element_size() for item in latents for v in item.values() if torch.is_tensor(v))
    return device if size <= share * torch.cuda.get_device_properties(device).total_memory else torch.device("cpu")


# a latent channel nearly constant on the training data is scaled as if it spread this much of the widest one
MIN_RELATIVE_STD = 1e-3


def check_power(key: str, value: float) -> float:
    """``value`` as a float if it lies in [0, 1], as the power of the latent scale factor must; else
    an error naming ``key``. Training checks it before it encodes any volume."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{key} must be between 0 and 1, got {value!r}.")
    return float(value)


def latent_scale_factor(
    latents: Sequence[dict], resume_from: str | None = None, power: float = 0.5, sample_posterior: bool = True
) -> float | list[float]:
    """The latent scale factor of ``LatentDiffusionInferer`` (Rombach et al.) from the latents that
    training learns (``z_mu``, plus ``z_sigma`` times noise with ``sample_posterior``): per channel, ``g / std ** power``, with ``g``
    such that the scaled latents have unit variance over all channels. ``power`` 0 gives one factor
    for all channels, 1 every channel unit variance, 0.5 (the default) a spread between. Where the
    channels differ (a cosine shortcut's first channel, the cell mean, is several times wider than
    the rest, its highest frequencies hundreds of times narrower), one factor leaves the narrow
    channels below the noise of the last sampling steps (voxel noise in the samples), and unit
    variance weighs the model's errors alike in every channel although the cell mean's weigh most in
    the image (blocks of the latent cell); 0.5 gave neither at 8x and 16x, and 0.75 a third lower
    Fréchet distances than 0.5 at 16x (docs/generation.md). Where the channels have
    equal spreads (the 4x pool shortcut) every power gives the same factor. Computed once at the start
    of diffusion training and saved with the diffusion model; a run that continues a model.pt or a
    checkpoint reuses its value (a single float in models trained before)."""
    power = check_power("latent_scale_power", power)
    if resume_from is not None:
        scale = load_checkpoint(resume_from, "checkpoint").get("scale_factor")
        if scale is None:
            raise ValueError(f"checkpoint '{resume_from}' holds no scale_factor; is it a diffusion model.pt or checkpoint?")
        logger.info(f"latent scale factor {describe_scale(scale)}, from {resume_from}")
        return scale
    if not latents:
        raise ValueError("no training latents; cannot compute the latent scale factor.")
    mu = torch.stack([item["z_mu"].double() for item in latents]).transpose(0, 1).flatten(1)
    sigma = torch.stack([item["z_sigma"].double() for item in latents]).transpose(0, 1).flatten(1)
    std = (mu.var(1, unbiased=False) + sample_posterior * sigma.pow(2).mean(1)).sqrt()  # of mu (+ sigma * noise), per channel
    if not std.max() > 0:
        raise ValueError("the autoencoder's latents have zero spread on the training data; is the checkpoint trained?")
    std = std.clamp(min=MIN_RELATIVE_STD * std.max().item())
    scale = std.pow(-power) / (std.pow(2 - 2 * power).mean().sqrt())
    if power == 0:
        logger.info(f"latent scale factor, one for all channels: {scale[0].item():.6f} over {mu.shape[1]} values per channel")
        return scale[0].item()
    rule = "1/std" if power == 1 else f"g / std ** {power:g}"
    logger.info(f"latent scale factor {rule} per channel: {describe_scale(scale.tolist())} over {mu.shape[1]} values per channel")
    return scale.tolist()


def describe_scale(scale: float | Sequence[float]) -> str:
    """A scale factor in one short line: the value, or the range of the per-channel values."""
    values = torch.as_tensor(scale, dtype=torch.float64).flatten()
    if values.numel() == 1:
        return f"{values.item():.6f}"
    return f"{values.min().item():.6f} to {values.max().item():.6f} ({values.numel()} channels)"


def latent_scale(scale_factor: float | Sequence[float], latent_channels: int, source: str = "the diffusion model") -> torch.Tensor:
    """The saved scale factor as a tensor that multiplies latents of shape (N, C, *spatial): 0-d for
    a single factor, (C, 1, 1, 1) per channel. Refuses a per-channel factor of another width, naming
    ``source`` (the checkpoint it came from)."""
    scale = torch.as_tensor(scale_factor, dtype=torch.float32)
    if scale.ndim == 0:
        return scale
    if scale.ndim != 1 or len(scale) != latent_channels:
        raise ValueError(
            f"the latent scale factor of {source} has {scale.numel()} values, but the latent has {latent_channels} "
            "channels; expected one value per channel (or a single value)."
        )
    return scale.reshape(-1, 1, 1, 1)


def check_full_batches(latents: Sequence[dict], batch_size: int) -> Sequence[dict]:
    """The latents, once it is clear that every process gets at least one full batch of them. The
    training loader drops a short last batch: with a few dozen latents and data-parallel processes
    it would otherwise be a batch of one or two every other step, costing a whole step and weighing
    its latents several times more than the others."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    per_process = math.ceil(len(latents) / world)
    if per_process < batch_size:
        raise ValueError(
            f"batch_size {batch_size} needs at least {batch_size * world} training latents for {world} process(es), "
            f"but the training volumes gave {len(latents)} (each volume gives two with latent_flips): "
            f"set batch_size to {max(per_process, 1)} or less, or train on more volumes."
        )
    return latents


def check_latent_fits_unet(latent_shape: Sequence[int], diffusion_channels: Sequence[int]) -> list[int]:
    """The latent spatial shape, if the diffusion UNet can halve it once per level below the top."""
    multiple = 2 ** (len(diffusion_channels) - 1)
    if any(s % multiple for s in latent_shape):
        raise ValueError(
            f"the latent shape {list(latent_shape)} (patch_size over the total factor) is not divisible by "
            f"{multiple}, which the diffusion UNet with diffusion_channels {list(diffusion_channels)} needs; "
            f"use a larger patch_size, smaller downsample_factors, or fewer diffusion levels."
        )
    return list(latent_shape)


class LatentDiffusionPrepareBatch(DiffusionPrepareBatch):
    """MONAI's ``DiffusionPrepareBatch`` over encoded latents (:func:`encode_volumes`): the batch's
    latents sampled from their posterior (``z_mu + z_sigma * noise``, as ``encode_stage_2_inputs``
    does), or with ``sample_posterior`` false their means ``z_mu`` (the posterior's noise, learnt
    as part of the data, decodes to speckle where the volume is empty: docs/generation.md),
    multiplied by the latent scale factor (:func:`latent_scale`), then noised for
    ``DiffusionInferer``, with the target of the scheduler's ``prediction_type``. For a
    class-conditioned model each item's class label (``condition_name``) is replaced by "no class"
    with probability ``condition_dropout``: the model learns the unconditioned prediction beside the
    conditioned one, which classifier-free guidance needs at sampling."""

    def __init__(
        self,
        scheduler: Scheduler,
        scale_factor: float | torch.Tensor,
        condition_name: str | None = None,
        condition_dropout: float = 0.0,
        sample_posterior: bool = True,
    ) -> None:
        super().__init__(scheduler.num_train_timesteps, condition_name)
        if not 0.0 <= condition_dropout < 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1), got {condition_dropout!r}.")
        self.scheduler = scheduler
        self.scale_factor = torch.as_tensor(scale_factor, dtype=torch.float32)  # 0-d, or (C, 1, 1, 1): see latent_scale
        self.condition_dropout = condition_dropout
        self.sample_posterior = sample_posterior

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet learns to predict, as its scheduler's ``prediction_type`` says: the noise, or
        the velocity (MONAI's ``VPredictionPrepareBatch``), which keeps few-step sampling stable."""
        if self.scheduler.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(images, noise, timesteps)
        if self.scheduler.prediction_type != "epsilon":
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {self.scheduler.prediction_type!r}.")
        return noise

    def __call__(self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any) -> tuple:
        latents = batchdata["z_mu"].to(device, non_blocking=non_blocking)
        if self.sample_posterior:
            latents = latents + batchdata["z_sigma"].to(device, non_blocking=non_blocking) * torch.randn_like(latents)
        latents = latents * self.scale_factor.to(latents.device)  # no copy where already there
        images, target, args, infer_kwargs = super().__call__(dict(batchdata, image=latents), device, non_blocking, **kwargs)
        if "condition" in infer_kwargs and self.condition_dropout > 0:
            labels = infer_kwargs["condition"].long()
            dropped = torch.rand(labels.shape, device=labels.device) < self.condition_dropout
            infer_kwargs["condition"] = torch.where(dropped, NO_CLASS, labels)
        return images, target, args, infer_kwargs


def latent_noise_shape(
    latent_channels: int, image_size: Sequence[int], total_factor: Sequence[int], unet_levels: int
) -> list[int]:
    """The latent shape (channels first) that decodes to ``image_size``, refusing, before sampling
    starts, a size that the autoencoder cannot produce or the diffusion UNet cannot halve once per
    level below the top."""
    multiple = [f * 2 ** (unet_levels - 1) for f in total_factor]
    if any(s % m for s, m in zip(image_size, multiple)):
        raise ValueError(
            f"image_size {list(image_size)} does not fit the networks: each axis must be a multiple of "
            f"{multiple} (the autoencoder's total factor {list(total_factor)} times 2^{unet_levels - 1} for "
            f"the diffusion UNet's {unet_levels} levels); use e.g. {[math.ceil(s / m) * m for s, m in zip(image_size, multiple)]}."
        )
    return [latent_channels, *(s // f for s, f in zip(image_size, total_factor))]
