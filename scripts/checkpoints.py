"""Checkpoints: written atomically, read with ``weights_only=True``, checked against the configured network.

A checkpoint is a plain dict of state dicts and primitives, so ``torch.load(..., weights_only=True)``
reads it and a shared bundle never runs code hidden in a pickle. Next to the weights it keeps what
inference needs to run them as trained: the network's constructor arguments
(``autoencoder_args``/``diffusion_args``, compared with the config's, both sides named on a mismatch),
the preprocessing (``preprocessing``) and, for the diffusion model, its noise schedule
(``noise_schedule``), which inference reads back (a config value given beside them overrides one,
with a warning).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from scripts.io import atomic_path, remove_stale_temporaries
from scripts.networks import encoder_fingerprint

logger = logging.getLogger(__name__)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):  # a shallow copy keeps the type and a state dict's _metadata
        out = copy.copy(obj)
        out.update((k, _to_cpu(v)) for k, v in obj.items())
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_path`, tensors moved to the CPU so the file loads on any
    machine; a killed run leaves the previous good file in place."""
    with atomic_path(path) as tmp:
        torch.save(_to_cpu(obj), tmp)


def _state(obj: Any) -> Any:
    return obj.state_dict() if hasattr(obj, "state_dict") else obj


def _plain(value: Any) -> Any:
    """Config values as JSON would hold them (tuples become lists), so saved and configured args compare."""
    return json.loads(json.dumps(value))


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> dict:
    """Read a checkpoint with ``weights_only=True``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{path}' does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{what} '{path}' could not be read as a weights-only PyTorch checkpoint: {e}") from e
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{what} '{path}' holds a {type(ckpt).__name__}, expected a dict of state dicts.")
    return dict(ckpt)


# constructor arguments that change how a network runs, not its weights: never a mismatch
RUNTIME_ONLY_ARGS = frozenset({"use_checkpoint", "use_flash_attention"})
# arguments added after checkpoints were shipped: absent on one side means the network's default
# (a checkpoint saved before ``norm`` was recorded holds GroupNorm weights)
LATER_ARG_DEFAULTS = {"norm": "group", "shortcut": False}
# older spellings of the same network: shortcut=True was the pool shortcut before the cosine one existed
OLDER_ARG_VALUES = {"shortcut": {True: "pool", False: None}}


def check_args(saved: Mapping | None, configured: Mapping, path: str | Path, what: str) -> None:
    """Refuse a checkpoint whose network arguments differ from the configured ones, naming both sides."""
    if saved is None:
        return
    saved, configured = _plain(dict(saved)), _plain(dict(configured))
    for key, default in LATER_ARG_DEFAULTS.items():
        if key in saved or key in configured:
            saved.setdefault(key, default)
            configured.setdefault(key, default)
    for key, values in OLDER_ARG_VALUES.items():
        for args in (saved, configured):
            if isinstance(args.get(key), bool):
                args[key] = values[args[key]]
    keys = (set(saved) | set(configured)) - RUNTIME_ONLY_ARGS
    diff = sorted(k for k in keys if saved.get(k) != configured.get(k))
    if diff:
        theirs = ", ".join(f"{k}={saved.get(k)!r}" for k in diff)
        ours = ", ".join(f"{k}={configured.get(k)!r}" for k in diff)
        raise ValueError(f"{what} '{path}' was trained with {theirs}, but the config has {ours}.")


def recorded_args(ckpt: Mapping, key: str, path: str | Path, what: str = "checkpoint") -> dict:
    """The constructor arguments a checkpoint records for its network (``<key>_args``), from which
    inference builds the network: the arguments live with the weights, not in a config."""
    args = ckpt.get(f"{key}_args")
    if args is None:
        raise ValueError(
            f"{what} '{path}' records no {key}_args (a bare state dict, e.g. MONAI's AutoencoderKL weights); give the "
            f"network's arguments on the command line, e.g. --{key}_args \"{{'spatial_dims': 3, 'in_channels': 1, "
            f"'out_channels': 1, 'channels': [32, 64, 64], 'latent_channels': 3, 'num_res_blocks': [2, 2, 2], "
            f"'attention_levels': [False, False, True], 'layout': 'strided', 'norm': 'group'}}\" (MONAI's defaults)."
        )
    return dict(args)


def load_network(
    network: torch.nn.Module, path: str | Path, key: str, args: Mapping | None = None, what: str = "checkpoint"
) -> dict:
    """Load ``ckpt[key]`` into ``network`` after checking the saved constructor arguments.

    A bare state dict (e.g. a MONAI ``AutoencoderKL`` checkpoint) is accepted too; the network's own
    load hooks then check its factors. Returns the whole checkpoint for its other entries.
    """
    ckpt = load_checkpoint(path, what)
    if key in ckpt:
        if args is not None:
            check_args(ckpt.get(f"{key}_args"), args, path, what)
        state = ckpt[key]
    elif all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = ckpt
    else:
        raise ValueError(f"{what} '{path}' has no '{key}' entry; it holds {sorted(ckpt)}.")
    try:
        network.load_state_dict(state)
    except (RuntimeError, ValueError) as e:  # ValueError: the factor check of FactorAutoencoderKL
        raise ValueError(f"{what} '{path}' does not fit the configured network: {e}") from e
    return ckpt


# ---------------------------------------------------------------------------------------------
# the settings that travel with the weights

# the preprocessing of checkpoints that predate recording it (train_autoencoder.yaml's preprocessing_args)
PREPROCESSING_DEFAULTS = {"spacing": None, "modality": "mri", "intensity_percentiles": [0.5, 99.5], "ct_window": [-1000, 1000]}
# the noise schedule of diffusion checkpoints that predate recording it (train_diffusion.yaml's noise_schedule)
NOISE_SCHEDULE_DEFAULTS = {
    "num_train_timesteps": 1000,
    "schedule": "scaled_linear_beta",
    "beta_start": 0.0015,
    "beta_end": 0.0195,
    "prediction_type": "epsilon",
}


def _given(value: Any) -> Any:
    """A command-line value: the strings ``none``/``null`` stand for None, which the CLI cannot pass."""
    return None if isinstance(value, str) and value.lower() in ("none", "null") else value


def resolve_settings(
    recorded: Mapping | None, overrides: Mapping, defaults: Mapping, path: str | Path, what: str = "checkpoint"
) -> dict:
    """The settings a model runs with: those its checkpoint records (``defaults`` for what an older
    checkpoint lacks), each replaced by an override that is not ``None`` (``None`` in a config means "as
    the checkpoint records"; the string ``"none"`` gives None itself). An override that differs from a
    recorded value is logged as a warning naming both."""
    recorded = _plain(dict(recorded or {}))
    settings = _plain({**defaults, **recorded})
    for key, value in overrides.items():
        if value is None:
            continue
        value = _plain(_given(value))
        if key in recorded and recorded[key] != value:
            logger.warning(
                f"{key}: {what} '{path}' was trained with {key}={recorded[key]!r}; running with {key}={value!r} as "
                f"the config gives it (leave {key} null to use the checkpoint's)."
            )
        settings[key] = value
    logger.info(f"{what} '{path}': " + ", ".join(f"{k}={v!r}" for k, v in settings.items()))
    return settings


def preprocessing_settings(ckpt: Mapping, overrides: Mapping, path: str | Path, what: str = "autoencoder_ckpt") -> dict:
    """The preprocessing an autoencoder was trained with (its ``preprocessing`` entry), with the config's overrides."""
    return resolve_settings(ckpt.get("preprocessing"), overrides, PREPROCESSING_DEFAULTS, path, what)


def noise_schedule(ckpt: Mapping, overrides: Mapping, path: str | Path, what: str = "diffusion_ckpt") -> dict:
    """The noise schedule a diffusion model was trained with (its ``noise_schedule`` entry), with the config's
    overrides: a model trained with 500 steps is sampled with 500."""
    return resolve_settings(ckpt.get("noise_schedule"), overrides, NOISE_SCHEDULE_DEFAULTS, path, what)


class AtomicCheckpointSaver:
    """Ignite handler that writes a checkpoint atomically (MONAI's ``CheckpointSaver`` deletes and
    then rewrites a fixed filename, which a killed run can leave empty or missing).

    Attached to a trainer, it writes ``filename`` every ``save_interval`` epochs and at completion,
    adding the trainer's own state (epoch, iteration) under ``"trainer"`` and the trainer attributes
    named in ``engine_attributes`` (its gradient scalers): the resume point. With
    ``key_metric_name``, attached to an evaluator, it writes when that metric improves (the best
    model). ``save_dict`` values are objects with ``state_dict`` (networks, optimizers, scalers,
    another saver) or primitives (network arguments, the latent scale factor).
    """

    def __init__(
        self,
        save_dir: str | Path,
        save_dict: Mapping[str, Any],
        filename: str,
        save_interval: int = 1,
        key_metric_name: str | None = None,
        engine_attributes: Sequence[str] = ("scaler",),
        enabled: bool = True,
    ) -> None:
        self.path = Path(save_dir) / filename
        self.engine_attributes = tuple(engine_attributes)
        self.save_dict = save_dict
        self.save_interval = save_interval
        self.key_metric_name = key_metric_name
        self.enabled = enabled
        self.best: float | None = None
        self.best_epoch: int | None = None

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.STARTED, self._on_started)
        if self.key_metric_name is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._on_metric)
        else:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self._on_epoch)
            engine.add_event_handler(Events.COMPLETED, self._on_completed)

    def _on_started(self, engine: Engine) -> None:
        # a run killed while saving left its temporary beside the file; this saver alone writes it
        remove_stale_temporaries(self.path)

    def _on_epoch(self, engine: Engine) -> None:
        self.save(trainer=engine)

    def _on_completed(self, engine: Engine) -> None:
        if engine.state.epoch % self.save_interval or engine.should_terminate:
            self.save(trainer=engine)

    def _on_metric(self, engine: Engine) -> None:
        value = float(engine.state.metrics[self.key_metric_name])
        if self.best is None or value > self.best:
            self.best, self.best_epoch = value, engine.state.epoch
            self.save()

    def save(self, trainer: Engine | None = None) -> None:
        objects = dict(self.save_dict)
        if trainer is not None:
            objects["trainer"] = trainer
            objects.update({name: getattr(trainer, name) for name in self.engine_attributes if hasattr(trainer, name)})
        save_atomic({k: _state(v) for k, v in objects.items() if v is not None}, self.path)
        logger.info(f"saved {self.path}")

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping) -> None:
        self.best, self.best_epoch = state.get("best"), state.get("best_epoch")


# optimizer settings that choose an implementation, not the update: a run on another machine may differ
OPTIMIZER_IMPLEMENTATION_KEYS = frozenset({"params", "fused", "foreach", "capturable", "differentiable"})


def _optimizer_settings(param_groups: Sequence[Mapping]) -> list[dict]:
    """Each parameter group's hyperparameters, the learning rate as the schedule's base (``initial_lr``,
    which a scheduler sets, else ``lr``), so that a warm-up or a decay in progress is no difference."""
    settings = []
    for group in param_groups:
        values = {k: v for k, v in group.items() if k not in OPTIMIZER_IMPLEMENTATION_KEYS and k != "initial_lr"}
        values["lr"] = group.get("initial_lr", group.get("lr"))
        settings.append(_plain(values))
    return settings


def check_optimizer_settings(saved: Mapping, optimizer: torch.optim.Optimizer, name: str, path: str | Path) -> None:
    """Refuse to resume an optimizer whose configured settings (learning rate, betas, weight decay, ...)
    differ from the checkpoint's: loading its state would silently keep the checkpoint's values while
    the run's config and MLflow params record the new ones."""
    theirs, ours = _optimizer_settings(saved.get("param_groups", [])), _optimizer_settings(optimizer.param_groups)
    diff = sorted(
        {k for t, o in zip(theirs, ours) for k in set(t) | set(o) if t.get(k) != o.get(k)}
    )
    if diff:
        first = next(i for i, (t, o) in enumerate(zip(theirs, ours)) if any(t.get(k) != o.get(k) for k in diff))
        saved_values = ", ".join(f"{k}={theirs[first].get(k)!r}" for k in diff)
        configured = ", ".join(f"{k}={ours[first].get(k)!r}" for k in diff)
        hint = " (learning_rate)" if diff == ["lr"] else ""
        raise ValueError(
            f"resume_from checkpoint '{path}' was trained with {name} {saved_values}, but the config has "
            f"{configured}{hint}. A resumed run continues the checkpoint's optimizer and schedule: give its values "
            f"to resume, or start a new run to change them (train_autoencoder.yaml's init_from starts one from its weights)."
        )


class ResumeFromCheckpoint:
    """Trainer handler that continues a run from a checkpoint of :class:`AtomicCheckpointSaver`:
    networks, optimizers, best metric, the trainer's epoch and iteration and its ``engine_attributes``
    (gradient scalers), after checking the saved network arguments and optimizer settings against the
    configured ones (a changed learning rate is refused, not silently dropped). ``path=None`` does nothing."""

    def __init__(
        self,
        path: str | Path | None,
        load_dict: Mapping[str, Any],
        args: Mapping[str, Mapping] | None = None,
        engine_attributes: Sequence[str] = ("scaler",),
    ):
        self.path = path
        self.load_dict = load_dict
        self.args = args or {}
        self.engine_attributes = tuple(engine_attributes)

    def check(self) -> None:
        """Validate the checkpoint before training starts (called from the config's ``initialize``)."""
        if self.path is None:
            return
        ckpt = load_checkpoint(self.path, "resume_from checkpoint")
        for key, configured in self.args.items():
            check_args(ckpt.get(key), configured, self.path, "resume_from checkpoint")
        wanted = [k for k, obj in self.load_dict.items() if obj is not None]
        missing = sorted(k for k in [*wanted, "trainer"] if k not in ckpt)
        if missing:
            raise ValueError(f"resume_from checkpoint '{self.path}' lacks {missing}; it holds {sorted(ckpt)}.")
        for key, obj in self.load_dict.items():
            if isinstance(obj, torch.optim.Optimizer):
                check_optimizer_settings(ckpt[key], obj, key, self.path)

    def attach(self, engine: Engine) -> None:
        if self.path is not None:
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.check()
        ckpt = load_checkpoint(self.path, "resume_from checkpoint")
        for key, obj in self.load_dict.items():
            if obj is not None:
                obj.load_state_dict(ckpt[key])
        for name in self.engine_attributes:
            if name in ckpt and getattr(engine, name, None) is not None:
                getattr(engine, name).load_state_dict(ckpt[name])
        max_epochs = engine.state.max_epochs
        engine.load_state_dict(ckpt["trainer"])
        if engine.state.epoch > max_epochs:
            raise ValueError(
                f"resume_from checkpoint '{self.path}' is at epoch {engine.state.epoch}, past max_epochs={max_epochs}."
            )
        engine.state.max_epochs = max_epochs
        logger.info(f"resumed from {self.path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}")


def check_autoencoder_fingerprint(diffusion_ckpt: Mapping, autoencoder: torch.nn.Module, diffusion_path: str | Path, autoencoder_path: str | Path) -> None:
    """Refuse an autoencoder whose encoder is not the one the diffusion model was trained on: with
    the same architecture (``autoencoder_args``, checked on loading) but other weights, its latents
    differ and the samples decode to noise without any error. A checkpoint that records no
    fingerprint (saved before version 0.9.2) is not checked."""
    recorded = diffusion_ckpt.get("autoencoder_fingerprint")
    if recorded is not None and recorded != (ours := encoder_fingerprint(autoencoder)):
        raise ValueError(
            f"diffusion_ckpt '{diffusion_path}' was trained on the latents of an autoencoder whose encoder has "
            f"fingerprint {recorded}, but autoencoder_ckpt '{autoencoder_path}' has {ours}: its latents differ. Pass the "
            "autoencoder the diffusion model was trained with (a decoder fine-tune with freeze_encoder keeps the "
            "fingerprint), or train the diffusion model on this autoencoder's latents."
        )
