"""MLflow tracking beyond what MONAI's ``MLFlowHandler`` logs by itself: the resolved config and a
preview PNG of original vs reconstruction at each validation."""

from __future__ import annotations

import inspect
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser

from scripts.io import atomic_path

logger = logging.getLogger(__name__)


def is_rank0() -> bool:
    """True on the process that writes checkpoints, logs and MLflow records: rank 0 of the process
    group, or of torchrun's ``RANK`` before the group is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def prefixed(**groups: Mapping) -> dict:
    """One flat dict of parameters from named groups: ``prefixed(diffusion={"channels": ...})`` gives
    ``{"diffusion_channels": ...}`` (MLflow parameters are flat)."""
    return {f"{name}_{key}": value for name, group in groups.items() for key, value in group.items()}


def check_tracking_uri(tracking_uri: str, timeout: float = 5.0) -> str:
    """Refuse an MLflow server that cannot be reached, in seconds, before training starts (MLflow itself
    retries for minutes and then fails without naming the setting). Any HTTP answer counts as reached;
    local stores (``sqlite:``, ``file:``, a path) are created by MLflow and need no check."""
    parsed = urllib.parse.urlparse(str(tracking_uri))
    if parsed.scheme not in ("http", "https"):
        return tracking_uri
    try:
        urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # the server answered (an older server without /health, or one that wants credentials)
    except (OSError, ValueError) as e:  # URLError, refused, timeout, a bad host name
        reason = getattr(e, "reason", e)
        raise ConnectionError(
            f"tracking_uri '{tracking_uri}' cannot be reached ({reason}). Start the MLflow server, give a reachable "
            f"--tracking_uri (the default is a local sqlite file under eval/), or train without tracking: --use_mlflow False."
        ) from None
    return tracking_uri


def every_n_steps(interval: int) -> Callable[[Engine, int], bool]:
    """MLflow's per-step filter (``iteration_log``): log at every ``interval``-th step. Each logged step
    reads the losses from the GPU and writes the store, so the training configs log every 50."""
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(
            f"mlflow_step_interval must be a positive integer (the steps between MLflow's per-step loss points; "
            f"1: every step), got {interval!r}."
        )
    return lambda engine, iteration: iteration % interval == 0


def active_parser() -> ConfigParser | None:
    """The ``ConfigParser`` evaluating the current config expression. MONAI hands an expression no
    reference to its parser, so it is found on the call stack."""
    return next(
        (f.frame.f_locals["self"] for f in inspect.stack() if isinstance(f.frame.f_locals.get("self"), ConfigParser)),
        None,
    )


def export_config(path: str | Path) -> str:
    """Write the config being run (all files merged, command-line overrides applied) to ``path``:
    what ``--tracking mlflow`` saves as its ``save_execute_config`` artifact, without that flag.

    Why not MONAI's own: ``--tracking`` replaces the config's MLflow handlers with its defaults (which
    log no metrics of this trainer's names) and must be given on every command line; this writes
    the same file from inside the config, for every run, with or without MLflow."""
    parser = active_parser()
    if parser is None:
        raise RuntimeError("export_config must be called from a bundle config expression.")
    if is_rank0():
        with atomic_path(path) as tmp:
            ConfigParser.export_config_file(parser.get(), tmp, fmt="yaml" if str(path).endswith((".yaml", ".yml")) else "json")
    return str(path)


def _mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    """The three orthogonal mid-slices of a (C, X, Y, Z) volume's first channel."""
    v = volume[0]
    return [np.rot90(v[v.shape[0] // 2]), np.rot90(v[:, v.shape[1] // 2]), np.rot90(v[:, :, v.shape[2] // 2])]


def save_preview(image: np.ndarray, reconstruction: np.ndarray, path: str | Path, title: str = "") -> None:
    """PNG with the original's mid-slices above the reconstruction's, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(9, 6))
    for row, (name, vol) in enumerate((("original", image), ("reconstruction", reconstruction))):
        for col, sl in enumerate(_mid_slices(vol)):
            axes[row, col].imshow(sl, cmap="gray", vmin=0, vmax=1)
            axes[row, col].set_axis_off()
        axes[row, 0].set_title(name, loc="left")
    fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


class ReconstructionPreview:
    """Evaluator handler: at each validation, a PNG of the first validation volume and its
    reconstruction, kept in ``output_dir`` and logged as an MLflow artifact of the run."""

    def __init__(
        self,
        output_dir: str | Path,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        enabled: bool = True,
    ):
        self.output_dir = Path(output_dir)
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.enabled = enabled
        self._pair: tuple[np.ndarray, np.ndarray] | None = None

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._grab)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._pair = None

    def _grab(self, engine: Engine) -> None:
        if self._pair is None:
            item = engine.state.output[0]
            self._pair = tuple(np.asarray(torch.as_tensor(item[k]).float().cpu()) for k in ("image", "pred"))

    def _write(self, engine: Engine) -> None:
        if self._pair is None or not is_rank0():
            return
        epoch = engine.state.epoch  # ValidationHandler runs the evaluator at the trainer's epoch
        path = self.output_dir / "previews" / f"reconstruction_epoch{epoch:04d}.png"
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in engine.state.metrics.items())
        save_preview(*self._pair, path, title=f"epoch {epoch}: {metrics}")
        if self.tracking_uri is not None:
            log_artifact(self.tracking_uri, self.experiment_name, self.run_name, path, "previews")


def log_artifact(tracking_uri: str, experiment_name: str, run_name: str, path: str | Path, artifact_path: str) -> None:
    """Log a file to the MLflow run named ``run_name`` (the one MONAI's ``MLFlowHandler`` opened).

    Why not ``MLFlowHandler(artifacts=...)``: it logs its artifacts once, when the run completes, and
    flattens folders; the previews are logged at each validation, under ``previews/``, so that a run
    that stops early still shows them. The handler's run is not reachable from another handler in a
    config, so the run is found by its (unique, time- and pid-stamped) name."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    runs = [] if experiment is None else client.search_runs(
        [experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'"
    )
    if not runs:
        logger.warning(f"no MLflow run named {run_name!r} in experiment {experiment_name!r}; {path} not logged.")
        return
    client.log_artifact(runs[0].info.run_id, str(path), artifact_path=artifact_path)
