"""Ignite/MONAI engines: the VAE-GAN trainer of the autoencoder, and what every training run shares
(mixed precision, the learning-rate schedule, per-epoch reseeding, the time limit, the teardown of a
distributed run). The latent diffusion model's own pieces are in ``scripts.diffusion``."""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from ignite.handlers import EMAHandler
from ignite.handlers import TimeLimit as IgniteTimeLimit
from ignite.metrics import Average
from monai.engines import Trainer
from monai.engines.utils import default_prepare_batch
from monai.inferers import Inferer, SimpleInferer
from monai.losses import PatchAdversarialLoss
from monai.optimizers import WarmupCosineSchedule
from monai.transforms import Randomizable

from scripts.losses import kl_loss
from scripts.networks import FactorAutoencoderKL, format_factors
from scripts.tracking import active_parser  # the teardown below must drop the config's resolved objects

logger = logging.getLogger(__name__)

PRECISIONS = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(mixed_precision: str | None, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for ``mixed_precision`` on ``device``; mixed precision is a GPU feature, so
    on CPU it is ignored with a log line."""
    if isinstance(mixed_precision, str) and mixed_precision.lower() in ("none", "null", "fp32"):
        mixed_precision = None  # the command line cannot pass None: MONAI drops None overrides
    if mixed_precision not in PRECISIONS:
        raise ValueError(f"mixed_precision must be one of 'bf16', 'fp16' or null (fp32), got {mixed_precision!r}.")
    if mixed_precision is not None and torch.device(device).type != "cuda":
        logger.info(f"mixed_precision {mixed_precision!r} is ignored on {torch.device(device)}: running in float32.")
        return None
    return PRECISIONS[mixed_precision]


def check_flags(**flags: bool | Sequence[bool]) -> None:
    """Refuse a switch (or a list of them, as ``attention_levels``) that is not a boolean, before any
    work starts. The bundle runner passes ``--fast_dev_run false`` and ``--attention_levels
    '[false,true]'`` from the command line as the text 'false', and any text reads as true: the run
    would do the opposite of what was asked, or build another network, without a word.
    ``True``/``False`` arrive as booleans."""
    for name, value in flags.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or not all(isinstance(v, bool) for v in values):
            example = "'[False,True]'" if isinstance(value, (list, tuple)) else "False"
            raise ValueError(
                f"{name} must be true or false{' at each level' if isinstance(value, (list, tuple)) else ''}, got {value!r}. "
                f"On the command line write True and False with capitals (e.g. --{name} {example}): "
                "the lower-case words arrive as text, which reads as true."
            )


def autocast(device: torch.device | str, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``amp_dtype`` on ``device``; a no-op for ``None`` (float32)."""
    return torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None)


def lr_schedule(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int) -> Any:
    """The learning-rate schedule per optimizer step: ``constant`` (after a linear warm-up of
    ``warmup_steps``) or ``cosine`` (warm-up, then a cosine decay to 0 at ``total_steps``)."""
    if schedule == "cosine":
        return WarmupCosineSchedule(optimizer, warmup_steps=warmup_steps, t_total=max(total_steps, warmup_steps + 1))
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(warmup_steps, 1)))
    raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {schedule!r}.")


def _compile_choices() -> tuple[set[str], list[str], list[str]]:
    """Inductor's modes that run CUDA graphs (with the ``cudagraphs`` backend), its other modes, and the
    other torch.compile backends."""
    import torch._inductor  # here: its import costs every run a second or more

    all_modes = torch._inductor.list_mode_options()
    graphed = {m for m in all_modes if torch._inductor.list_mode_options(m).get("triton.cudagraphs")} | {"cudagraphs"}
    modes = [m for m in all_modes if m not in graphed]
    backends = sorted((set(torch._dynamo.list_backends(exclude_tags=())) | {"inductor"}) - graphed)
    return graphed, modes, backends


def default_compile(device: torch.device | str) -> str | bool:
    """The trainings' default ``compile``: ``"reduce-overhead"`` (CUDA graphs, 1.4x to 2.5x the steps
    per second of eager, docs/performance.md) on a GPU that Inductor can compile for, else ``False``
    (eager). Inductor's GPU kernels need Triton and a GPU of compute capability 7.0 or above; on an
    older card the default says so in one line and trains eagerly, where Inductor would fail at the
    first step and fall back with a long warning."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    obstacle = _inductor_obstacle(device)
    if obstacle is not None:
        logger.info(f"compile: eager on {device} ({obstacle}); set compile to choose another mode or backend.")
        return False
    return "reduce-overhead"


def _inductor_obstacle(device: torch.device) -> str | None:
    """Why Inductor cannot compile GPU kernels for ``device``, or None where it can."""
    if importlib.util.find_spec("triton") is None:
        return "Triton, which Inductor compiles GPU kernels with, is not installed"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 7:
        return f"compute capability {major}.{minor}; Triton needs 7.0 or above"
    return None


def uses_cuda_graphs(compile: bool | str | None) -> bool:
    """Whether ``compile`` (the training config's key) runs the networks as CUDA graphs
    (``reduce-overhead``, ``max-autotune``, the ``cudagraphs`` backend), so that the trainer must mark
    its steps (:class:`CUDAGraphSteps`)."""
    return isinstance(compile, str) and compile in _compile_choices()[0]


def compiled(network: nn.Module, compile: bool | str | None) -> nn.Module:
    """The module a trainer runs: ``network`` through ``torch.compile`` when ``compile`` is true
    (TorchInductor), names an Inductor mode (``"reduce-overhead"``, ...) or names another backend
    (``"aot_eager"``, ...), and ``network`` itself when it is false. The compiled module shares the
    network's parameters, so checkpoints, the moving average and validation keep using the bare
    network and its keys. Where a graph cannot be compiled (no C++ compiler for CPU kernels, an
    operation the compiler does not handle), TorchDynamo runs it eagerly and warns, instead of
    stopping the training.

    The modes with CUDA graphs (``reduce-overhead``, ``max-autotune``, the ``cudagraphs`` backend)
    replay each step's kernels as one graph, which is what pays where a step is bound by kernel
    launches (8x and 16x, the diffusion UNet). A graph's outputs live in memory that its next replay
    overwrites, so the trainer marks where each optimizer step begins (:class:`CUDAGraphSteps`, which
    the training configs attach for these modes); on a CPU they compile as the default mode."""
    if isinstance(compile, str) and compile.lower() in ("true", "false"):
        compile = compile.lower() == "true"  # the command line's `--compile false` arrives as a string
    if compile is None or compile is False:
        return network
    graphed, modes, backends = _compile_choices()
    if compile is True or compile in modes or (compile in graphed and compile != "cudagraphs"):
        kwargs, what = {"mode": None if compile is True else compile}, f"mode {'default' if compile is True else compile}"
    elif compile in backends or compile == "cudagraphs":
        kwargs, what = {"backend": compile}, f"backend {compile}"
    else:
        raise ValueError(
            f"compile must be true, false, an Inductor mode ({', '.join([*modes, *sorted(graphed - {'cudagraphs'})])}) "
            f"or a torch.compile backend ({', '.join(backends)}, cudagraphs); got {compile!r}."
        )
    torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly, with a warning
    bare = getattr(network, "module", network)  # the network inside DistributedDataParallel
    logger.info(f"torch.compile of {type(bare).__name__} ({what}): the first steps include the compilation")
    return torch.compile(network, **kwargs)


class CUDAGraphSteps:
    """Trainer handler for the compile modes with CUDA graphs: marks the start of every optimizer step
    (``torch.compiler.cudagraph_mark_step_begin``), so the graphs may overwrite the previous step's
    outputs, which nothing reads any more. Without it the graphs cannot tell a network's second call
    within a step from the next step's first, and a replay overwrote an output still in use. Within a
    window of gradient accumulation the micro-batches are one step: the gradients they accumulate stay
    where the graphs' replays cannot overwrite them. Counted per epoch, as the trainers count their
    windows (the last one of an epoch may be short)."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        length = engine.state.epoch_length
        local = (engine.state.iteration - 1) % length if length else engine.state.iteration - 1
        if local % getattr(engine, "accumulation_steps", 1) == 0:
            torch.compiler.cudagraph_mark_step_begin()


class EpochSeed:
    """Trainer handler that reseeds every random source from ``(seed, epoch)`` when an epoch starts,
    and starts the epoch on a fresh pass of the data loader.

    Data order, random crops and the VAE's sampling noise then depend on the epoch (and rank) alone,
    so a run resumed from a checkpoint sees exactly the batches and noise the uninterrupted run saw,
    whatever ``epoch_length``: ignite would otherwise carry a loader's pass over into the next epoch
    when ``epoch_length`` does not divide it, which a resumed run cannot repeat. (With
    ``epoch_length`` shorter than the loader, each epoch sees the first batches of its own shuffle.)
    """

    def __init__(self, seed: int, transform: Randomizable | None = None) -> None:
        self.seed = seed
        self.transform = transform

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        epoch_seed = (self.seed * 1_000_003 + engine.state.epoch * 1009 + rank) % (2**31)
        random.seed(epoch_seed)
        np.random.seed(epoch_seed)
        torch.manual_seed(epoch_seed)
        if self.transform is not None:
            self.transform.set_random_state(seed=epoch_seed)
        # a fresh pass, shuffled by the generators just seeded; not for the rest of an epoch that a
        # time-limited run stopped in the middle of: ignite resumes it for its remaining steps only
        starts_at_boundary = not engine.state.epoch_length or engine.state.iteration % engine.state.epoch_length == 0
        if engine.state.dataloader is not None and starts_at_boundary:
            engine.set_data(engine.state.dataloader)


class ReshuffleEachPass:
    """Trainer handler that reshuffles a ``DistributedSampler`` whenever the data loader runs out
    within an epoch. MONAI's workflow calls ``set_epoch`` once per epoch; with an ``epoch_length``
    longer than a pass (1,000 diffusion steps over a few dozen latents), every pass of the epoch
    would repeat the same shards in the same order, and the short last batch would be the same
    items each time. Seeded by the iteration, so a resumed run draws what the uninterrupted one drew."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.DATALOADER_STOP_ITERATION, self)

    def __call__(self, engine: Engine) -> None:
        sampler = getattr(engine.state.dataloader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(engine.state.iteration)


class Throughput:
    """Trainer handler: per epoch, the training steps per second and the share of the epoch's time
    spent waiting for the next batch (``steps_per_second``, ``data_wait`` in ``engine.state.metrics``,
    so StatsHandler prints them and MLflow records them). Attached before validation, it times the
    training steps alone. Against the step's own time (``scripts.benchmark``, ``scripts.plan``) it says
    how much of a GPU hour the data path and the host take."""

    def __init__(self) -> None:
        self.started = self.waiting_since = 0.0
        self.waited = 0.0
        self.first_iteration = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._start)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._wait)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._got)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._report)

    def _start(self, engine: Engine) -> None:
        self.started, self.waited, self.first_iteration = time.perf_counter(), 0.0, engine.state.iteration

    def _wait(self, engine: Engine) -> None:
        self.waiting_since = time.perf_counter()

    def _got(self, engine: Engine) -> None:
        self.waited += time.perf_counter() - self.waiting_since

    def _report(self, engine: Engine) -> None:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        engine.state.metrics["steps_per_second"] = (engine.state.iteration - self.first_iteration) / seconds
        engine.state.metrics["data_wait"] = self.waited / seconds


class MultiTensorEMAHandler(EMAHandler):
    """Ignite's ``EMAHandler`` whose update of the averaged weights is two multi-tensor operations over
    all parameters (``torch._foreach_mul_``, ``torch._foreach_add_``) instead of two per parameter:
    the same arithmetic, with some 540 fewer kernel launches at every step of the 8x diffusion UNet
    (181 parameters). Once each step replays as a CUDA graph, launches outside the graph are what a
    step costs. Buffers are handled as ignite's handler does."""

    def _update_ema_model(self, engine: Engine, name: str) -> None:
        if self.handle_buffers == "update":  # buffers of integer types need ignite's per-buffer fallback
            super()._update_ema_model(engine, name)
            return
        momentum = getattr(engine.state, name)
        averaged = list(self.ema_model.parameters())
        torch._foreach_mul_(averaged, 1.0 - momentum)
        torch._foreach_add_(averaged, [p.data for p in self.model.parameters()], alpha=momentum)
        if self.handle_buffers == "copy":
            for ema_b, model_b in zip(self.ema_model.buffers(), self.model.buffers()):
                ema_b.data = model_b.data


class TimeLimit(IgniteTimeLimit):
    """Ignite's ``TimeLimit`` as a MONAI handler: counted from the engine's start (data caching is not
    training time), checked after every iteration; the engine then ends as if complete, so the last
    checkpoint is written. For long trainings in stages of a fixed length.

    Under data parallelism every process must stop after the same iteration: one that stops alone
    leaves the others waiting in the next gradient all-reduce until the job is killed. So there the
    processes agree every ``sync_every`` iterations on the longest time any of them has run (one
    all-reduce of one number; checking at every step would add a host synchronisation per step)."""

    def __init__(self, limit_sec: int = 28800, sync_every: int = 10):
        super().__init__(limit_sec)
        self.sync_every = sync_every

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _start(self, engine: Engine) -> None:
        self.start_time = time.time()

    def __call__(self, engine: Engine) -> None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return super().__call__(engine)
        if engine.state.iteration % self.sync_every:
            return
        on_gpu = torch.distributed.get_backend() == "nccl"
        elapsed = torch.tensor([time.time() - self.start_time], device="cuda" if on_gpu else "cpu")
        torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
        if float(elapsed) > self.limit_sec:
            self.logger.info(f"Reached the time limit: {self.limit_sec} sec. Stop training")
            engine.terminate()


def check_discriminator_fits(discriminator: torch.nn.Module, patch_size: Sequence[int], in_channels: int = 1) -> None:
    """Run the discriminator once on a pair of zero patches (training mode, as the trainer does), so
    a patch too small for its depth fails now, naming the keys, rather than when the adversarial
    loss starts after ``adv_warmup_epochs``."""
    was_training = discriminator.training
    device = next(discriminator.parameters()).device
    try:
        with torch.no_grad():
            discriminator.train()(torch.zeros(2, in_channels, *patch_size, device=device))
    except (RuntimeError, ValueError) as e:
        layers = getattr(discriminator, "num_layers_d", "?")
        raise ValueError(
            f"patch_size {list(patch_size)} is too small for the discriminator's {layers} strided layers "
            f"(discriminator_num_layers): every axis of the patch must stay larger than the discriminator's kernels. "
            f"Use a larger patch_size or a smaller discriminator_num_layers. ({type(e).__name__}: {e})"
        ) from e
    finally:
        discriminator.train(was_training)


def log_network_summary(network: FactorAutoencoderKL, patch_size: Sequence[int]) -> str:
    """One line a run starts with: factors, total factor, latent shape of the patch, parameter count."""
    total = network.total_factor
    total_str = f"{total[0]}x" if len(set(total)) == 1 else "x".join(map(str, total))
    latent = network.latent_shape(patch_size)
    params = sum(p.numel() for p in network.parameters())
    line = (
        f"downsample factors {format_factors(network.downsample_factors)} ({network.layout}): total {total_str}, patch "
        f"{'x'.join(map(str, patch_size))} -> latent {'x'.join(map(str, (network.latent_channels, *latent)))}, "
        f"{params / 1e6:.2f}M parameters"
    )
    logger.info(line)
    return line


def _grad_norm(module: nn.Module) -> torch.Tensor:
    """The 2-norm of all gradients of ``module`` (0 when none has one), without a host sync."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


class AutoencoderKLTrainer(Trainer):
    """VAE-GAN training of a (factor-aware) ``AutoencoderKL`` on MONAI's ignite ``Trainer``.

    The generator loss is ``recon_weight * L1 + kl_weight * KL (+ perceptual_weight * perceptual)
    (+ weight * loss for each of auxiliary_losses) (+ adv_weight * adversarial once the epoch passes
    adv_warmup_epochs)``; the ``PatchDiscriminator``
    trains on the same batch with a least-squares loss. Gradient accumulation is exact: each
    micro-batch loss is divided by the number of micro-batches in its window (the last window of an
    epoch may be short), and the optimizers step at the window's end, so N accumulated batches of B
    give the gradient of one batch of N*B. A non-finite loss, or a non-finite gradient norm at a step
    (``grad_norm``, ``disc_grad_norm`` in the output; without an fp16 scaler), stops the run without
    an optimizer step on it, so the last checkpoint stays good.

    The step reads nothing back from the GPU. The output holds the losses as tensors on the device
    (the epoch means accumulate there), and with fused optimizers (``fused=True``, the configs'
    choice on a GPU) a non-finite value makes the optimizers skip their step on the device
    (``found_inf``, as ``GradScaler`` does): the check that raises reads the values one iteration
    later, once the next batch is prepared, so the host prepares it while the GPU runs the step.
    Other optimizers are checked before their step, with a host synchronisation.
    """

    EPOCH_AVERAGES = ("loss", "recon_loss", "kl_loss")

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        discriminator: nn.Module | None = None,
        d_optimizer: torch.optim.Optimizer | None = None,
        recon_weight: float = 1.0,
        kl_weight: float = 1e-6,
        adv_weight: float = 0.01,
        adv_warmup_epochs: int = 0,
        perceptual_loss: nn.Module | None = None,
        perceptual_weight: float = 0.0,
        auxiliary_losses: dict[str, tuple[nn.Module, float]] | None = None,
        accumulation_steps: int = 1,
        amp_dtype: torch.dtype | None = None,
        epoch_length: int | None = None,
        inferer: Inferer | None = None,
        train_handlers: Sequence | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
    ) -> None:
        if accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be a positive integer, got {accumulation_steps!r}.")
        if (discriminator is None) != (d_optimizer is None):
            raise ValueError("discriminator and d_optimizer go together: give both or neither.")
        if recon_weight < 0:
            raise ValueError(f"recon_weight must be >= 0 (0 turns L1 off), got {recon_weight!r}.")
        if recon_weight == 0 and not auxiliary_losses and not (perceptual_loss is not None and perceptual_weight > 0):
            raise ValueError(
                "no reconstruction loss: recon_weight (L1) is 0 and mse_weight, ssim_weight, spectral_weight and the "
                "perceptual loss are off. Set mse_weight (the squared error, 20 by default) or recon_weight (e.g. 1)."
            )
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            decollate=False,
        )
        # epoch means in state.metrics, attached before the handlers so StatsHandler and MLflow see them
        for name in self.EPOCH_AVERAGES:
            Average(output_transform=lambda out, name=name: out[name], device=torch.device(device)).attach(self, name)
        # the last step's deferred check, before any handler (a checkpoint) sees the epoch's end
        self._unchecked: tuple[dict[str, torch.Tensor], int, int] | None = None
        for event in (Events.EPOCH_COMPLETED, Events.TERMINATE):
            self.add_event_handler(event, lambda engine: self._check_deferred())
        if train_handlers:
            self._register_handlers(train_handlers)
        self.network = network
        self.optimizer = optimizer
        self.discriminator = discriminator
        self.d_optimizer = d_optimizer
        self.recon_weight = recon_weight
        self.kl_weight = kl_weight
        self.adv_weight = adv_weight
        self.adv_warmup_epochs = adv_warmup_epochs
        self.perceptual_loss = perceptual_loss
        self.perceptual_weight = perceptual_weight
        self.auxiliary_losses = dict(auxiliary_losses or {})
        for loss, _ in self.auxiliary_losses.values():
            loss.to(device)
        self.accumulation_steps = accumulation_steps
        self.inferer = SimpleInferer() if inferer is None else inferer
        self.amp_dtype = amp_dtype
        # loss scaling for fp16 only; checkpoints keep both scalers (engine_attributes of the saver)
        fp16 = amp_dtype == torch.float16 and torch.device(device).type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.d_scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.adv_loss = PatchAdversarialLoss(criterion="least_squares")

    def run(self) -> None:  # type: ignore[override]
        # MONAI's Trainer.run replaces self.scaler; ours come from __init__ and are restored on resume.
        super(Trainer, self).run()

    @staticmethod
    def _no_sync(module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return module.no_sync() if not last and hasattr(module, "no_sync") else contextlib.nullcontext()

    def _window(self, engine: AutoencoderKLTrainer) -> tuple[bool, bool, int]:
        """(first micro-batch of a window, last one, number of micro-batches in the window)."""
        acc = self.accumulation_steps
        length = engine.state.epoch_length
        local = (engine.state.iteration - 1) % length if length else engine.state.iteration - 1
        start = local - local % acc
        size = min(acc, length - start) if length else acc
        return local == start, local - start + 1 == size, size

    def adversarial_active(self, epoch: int) -> bool:
        return self.discriminator is not None and self.adv_weight > 0 and epoch > self.adv_warmup_epochs

    @staticmethod
    def _check_finite(values: dict[str, torch.Tensor], epoch: int, iteration: int) -> None:
        numbers = dict(zip(values, torch.stack(list(values.values())).tolist()))  # one host sync for all
        bad = {k: v for k, v in numbers.items() if not math.isfinite(v)}
        if bad:
            raise FloatingPointError(
                f"{', '.join(f'{k} = {v}' for k, v in bad.items())} at epoch {epoch}, iteration {iteration}: "
                f"stopping before the optimizer step, so the last saved checkpoint stays good. Lower learning_rate, "
                + (
                    "or train in float32 (mixed_precision null) or fp16 (its loss scaler skips such steps): the loss "
                    "is finite but its gradients are not."
                    if all("grad_norm" in k for k in bad)
                    else "use mixed_precision bf16 rather than fp16, or check the data for NaNs."
                )
            )

    def _check_deferred(self) -> None:
        if self._unchecked is not None:
            unchecked, self._unchecked = self._unchecked, None
            self._check_finite(*unchecked)

    def _defers_check(self) -> bool:
        """Whether a non-finite step can be skipped on the device: fused optimizers take ``found_inf``."""
        optimizers = [self.optimizer] + ([self.d_optimizer] if self.d_optimizer is not None else [])
        return not self.scaler.is_enabled() and all(o.defaults.get("fused") for o in optimizers)

    @staticmethod
    def _step_unless(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
        optimizer.found_inf = found_inf  # read by the fused kernel, which then leaves weights and state alone
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf

    def _iteration(self, engine: AutoencoderKLTrainer, batchdata: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._check_deferred()  # the previous iteration's values: its step has run while this batch was prepared
        images, _ = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        images = images.as_tensor() if hasattr(images, "as_tensor") else images
        first, last, window = self._window(engine)
        adversarial = self.adversarial_active(engine.state.epoch)
        self.network.train()
        if first:
            self.optimizer.zero_grad(set_to_none=True)
            if self.d_optimizer is not None:
                self.d_optimizer.zero_grad(set_to_none=True)

        # under DistributedDataParallel, gradients are all-reduced once per window, at its last micro-batch
        with self._no_sync(self.network, last):
            with autocast(self.state.device, self.amp_dtype):
                reconstruction, z_mu, z_sigma = self.inferer(images, self.network)
                recon = reconstruction.float()
                losses = {"recon_loss": torch.nn.functional.l1_loss(recon, images), "kl_loss": kl_loss(z_mu, z_sigma)}
                g_loss = self.recon_weight * losses["recon_loss"] + self.kl_weight * losses["kl_loss"]
                if self.perceptual_loss is not None and self.perceptual_weight > 0:
                    losses["perceptual_loss"] = self.perceptual_loss(recon, images)
                    g_loss = g_loss + self.perceptual_weight * losses["perceptual_loss"]
                for name, (loss_fn, weight) in self.auxiliary_losses.items():
                    losses[name] = loss_fn(recon, images)
                    g_loss = g_loss + weight * losses[name]
                if adversarial:
                    # the generator's loss must not train the critic: its parameters take no gradient here
                    # (and the bare module is called, so DistributedDataParallel syncs only the D step)
                    critic = getattr(self.discriminator, "module", self.discriminator).train().requires_grad_(False)
                    logits_fake = critic(recon.contiguous())[-1]
                    critic.requires_grad_(True)
                    losses["gen_adv_loss"] = self.adv_loss(logits_fake, target_is_real=True, for_discriminator=False)
                    g_loss = g_loss + self.adv_weight * losses["gen_adv_loss"]
            self.scaler.scale(g_loss / window).backward()

        if adversarial:
            with self._no_sync(self.discriminator, last):
                with autocast(self.state.device, self.amp_dtype):  # fakes and reals in one forward (per-sample InstanceNorm)
                    logits = self.discriminator(torch.cat([recon.detach(), images]).contiguous())[-1]
                    logits_fake, logits_real = logits.float().chunk(2)
                    d_loss = 0.5 * (
                        self.adv_loss(logits_fake, target_is_real=False, for_discriminator=True)
                        + self.adv_loss(logits_real, target_is_real=True, for_discriminator=True)
                    )
                    losses["disc_loss"] = d_loss
                self.d_scaler.scale(self.adv_weight * d_loss / window).backward()

        # All loss values (and, at a step, the gradient norms) are checked, and a non-finite one stops
        # the run with no optimizer step on it: on the device (fused optimizers, no host sync; raised at
        # the next iteration) or before the step (one host sync). With fp16 the scaler skips a step of
        # non-finite gradients by itself; bf16 and float32 have no scaler, so a NaN gradient of a finite
        # loss is refused here.
        losses["loss"] = g_loss
        if last and not self.scaler.is_enabled():
            losses["grad_norm"] = _grad_norm(self.network)
            if adversarial:
                losses["disc_grad_norm"] = _grad_norm(self.discriminator)
        stacked = torch.stack([v.detach().float() for v in losses.values()])
        values = dict(zip(losses, stacked.unbind()))
        deferred = self._defers_check()
        if deferred:
            self._unchecked = (values, engine.state.epoch, engine.state.iteration)
        else:
            self._check_finite(values, engine.state.epoch, engine.state.iteration)
        if last and deferred:
            found_inf = (~torch.isfinite(stacked).all()).float()
            self._step_unless(self.optimizer, found_inf)
            if adversarial:
                self._step_unless(self.d_optimizer, found_inf)
        elif last:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if adversarial:
                self.d_scaler.step(self.d_optimizer)
                self.d_scaler.update()
        return values


def shutdown_distributed() -> None:
    """Destroy the process group once the config's objects (and the DistributedDataParallel wrappers
    they hold) are gone: a wrapper still alive at interpreter exit, after the group is destroyed,
    aborts the process now and then ("terminate called without an active exception", seen with gloo)."""
    parser = active_parser()
    if parser is not None:
        parser.ref_resolver.reset()  # drop the resolved objects: trainer, networks, wrappers
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
