"""Checkpoints: written atomically, read with ``weights_only=True``, checked against the configured network.

A checkpoint is a plain dict of state dicts and primitives, so ``torch.load(..., weights_only=True)``
reads it and a shared bundle never runs code hidden in a pickle. Next to the weights it keeps the
network's constructor arguments (``autoencoder_args``/``diffusion_args``), so a mismatch with the
config is reported with both sides before any long work starts.
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


def check_args(saved: Mapping | None, configured: Mapping, path: str | Path, what: str) -> None:
    """Refuse a checkpoint whose network arguments differ from the configured ones, naming both sides."""
    if saved is None:
        return
    saved, configured = _plain(dict(saved)), _plain(dict(configured))
    for key, default in LATER_ARG_DEFAULTS.items():
        if key in saved or key in configured:
            saved.setdefault(key, default)
            configured.setdefault(key, default)
    keys = (set(saved) | set(configured)) - RUNTIME_ONLY_ARGS
    diff = sorted(k for k in keys if saved.get(k) != configured.get(k))
    if diff:
        theirs = ", ".join(f"{k}={saved.get(k)!r}" for k in diff)
        ours = ", ".join(f"{k}={configured.get(k)!r}" for k in diff)
        raise ValueError(f"{what} '{path}' was trained with {theirs}, but the config has {ours}.")


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
            self.best = value
            self.save()

    def save(self, trainer: Engine | None = None) -> None:
        objects = dict(self.save_dict)
        if trainer is not None:
            objects["trainer"] = trainer
            objects.update({name: getattr(trainer, name) for name in self.engine_attributes if hasattr(trainer, name)})
        save_atomic({k: _state(v) for k, v in objects.items() if v is not None}, self.path)
        logger.info(f"saved {self.path}")

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: Mapping) -> None:
        self.best = state.get("best")


class ResumeFromCheckpoint:
    """Trainer handler that continues a run from a checkpoint of :class:`AtomicCheckpointSaver`:
    networks, optimizers, best metric, the trainer's epoch and iteration and its ``engine_attributes``
    (gradient scalers), after checking the saved network arguments against the configured ones.
    ``path=None`` does nothing."""

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
