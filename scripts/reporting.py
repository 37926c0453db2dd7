"""What a user sees of a run beyond the log lines: the cause of a failure as the last lines printed,
a progress bar on a terminal, and a summary when training ends."""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ignite.engine import Engine, Events
from monai.bundle.config_item import ConfigItem
from monai.bundle.utils import ID_SEP_KEY

logger = logging.getLogger(__name__)

# messages of the wrappers MONAI puts around an error: the cause is the first error that is not one
WRAPPER_MESSAGES = ("Failed to evaluate", "Failed to instantiate", "applying transform")


def _chain(error: BaseException) -> list[BaseException]:
    errors = []
    while error is not None and error not in errors:
        errors.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return errors


def error_summary(error: BaseException) -> str:
    """Two lines that say what went wrong: the config item being resolved (the innermost one in the
    traceback) and the first error of the chain that is not a wrapper of MONAI's config resolver or
    transforms, whose message names the key and the fix."""
    chain = _chain(error)
    item = None
    for e in chain:
        for frame, _ in traceback.walk_tb(e.__traceback__):
            owner = frame.f_locals.get("self")
            if isinstance(owner, ConfigItem):
                item = owner.get_id().replace(ID_SEP_KEY, "#")
    cause = next(
        (e for e in chain if not (isinstance(e, RuntimeError) and str(e).startswith(WRAPPER_MESSAGES))), chain[-1]
    )
    where = f" (while resolving config item '{item}')" if item else ""
    return f"Error{where}:\n  {type(cause).__name__}: {cause}"


def _excepthook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    _previous_hook(kind, error, tb)
    if not isinstance(error, (KeyboardInterrupt, SystemExit)):
        print(f"\n{error_summary(error)}", file=sys.stderr, flush=True)


_previous_hook = sys.excepthook


def report_errors() -> None:
    """Print :func:`error_summary` after the traceback of an error that ends the run, so that the last
    lines a user sees name the cause rather than MONAI's final "Failed to evaluate ConfigExpression".
    Called first in a config's ``initialize``."""
    global _previous_hook
    if sys.excepthook is not _excepthook:
        _previous_hook = sys.excepthook
        sys.excepthook = _excepthook


def reconstruct_command(checkpoint: str | Path) -> str:
    """The command that reconstructs scans with ``checkpoint`` (the network and preprocessing come from it)."""
    return (
        f"python -m monai.bundle run --config_file configs/inference_autoencoder.yaml --autoencoder_ckpt {checkpoint} "
        f"--dataset_dir IN --output_dir OUT"
    )


class TrainingSummary:
    """Trainer handler: when training ends, a few lines on where its results are: the best validation
    metric and its epoch, the checkpoints, the previews, the MLflow run, and the command that uses
    the new weights."""

    def __init__(
        self,
        output_dir: str | Path,
        checkpoints: Sequence[str],
        command: str,
        best_saver: Any = None,
        metric_name: str = "val_psnr",
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        enabled: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.checkpoints = list(checkpoints)
        self.command = command
        self.best_saver = best_saver
        self.metric_name = metric_name
        self.tracking_uri, self.experiment_name, self.run_name = tracking_uri, experiment_name, run_name
        self.enabled = enabled

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.COMPLETED, self)

    def lines(self, engine: Engine) -> list[str]:
        state = engine.state
        lines = [f"training finished at epoch {state.epoch} of {state.max_epochs} ({state.iteration} iterations)"]
        best = getattr(self.best_saver, "best", None)
        if best is not None:
            lines.append(f"  best {self.metric_name}: {best:.4f} at epoch {self.best_saver.best_epoch}")
        written = [str(self.output_dir / c) for c in self.checkpoints if (self.output_dir / c).is_file()]
        lines.append(f"  checkpoints: {', '.join(written) if written else 'none written'}")
        previews = self.output_dir / "previews"
        if previews.is_dir():
            lines.append(f"  previews: {previews}")
        if self.tracking_uri is not None:
            lines.append(f"  MLflow: run '{self.run_name}' of experiment '{self.experiment_name}' at {self.tracking_uri}")
        if (self.output_dir / self.checkpoints[0]).is_file():
            lines.append(f"  next: {self.command}")
        else:
            lines.append(f"  no {self.checkpoints[0]}: no validation ran (val_interval) or fast_dev_run wrote none")
        return lines

    def __call__(self, engine: Engine) -> None:
        for line in self.lines(engine):
            logger.info(line)


def progress_bar() -> Any:
    """Ignite's ``ProgressBar`` of iterations within an epoch, or ``None`` (nothing attached) when the
    output is not a terminal, so logs and CI output keep one line per epoch."""
    if not sys.stderr.isatty():
        return None
    from ignite.handlers import ProgressBar

    return ProgressBar(persist=False)
