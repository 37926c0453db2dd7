"""MLflow tracking of the autoencoder training: what a run records (params, losses every
``mlflow_step_interval`` iterations and per epoch, validation metrics, config, checkpoint and
previews), in the default local SQLite store and through a real ``mlflow server``; and that
``use_mlflow False`` records nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import AE_CONFIG, error_text, run_bundle, run_workflow, train_overrides

EXPERIMENT = "ldm3d_downsample_factors"
EPOCH_LENGTH = 3


def only_run(client: mlflow.MlflowClient):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"no experiment {EXPERIMENT!r}"
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def history(client, run, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def check_run(client, run, epochs, trainer, out: Path, step_interval: int = 1):
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["downsample_factors"] == "[2, 2]"
    assert params["total_factor"] == "(4, 4, 4)"
    assert params["latent_shape"] == "(4, 4, 4)"
    assert params["channels"] == "[8, 16, 16]"
    assert params["patch_size"] == "[16, 16, 16]" and params["layout"] == "space_to_depth"
    assert params["train_volumes"] == "3" and params["val_volumes"] == "1"

    # per-iteration losses, one value every mlflow_step_interval iterations
    iterations = list(range(step_interval, epochs * EPOCH_LENGTH + 1, step_interval))
    for key in ("loss_step", "recon_loss_step", "kl_loss_step"):
        assert [step for step, _ in history(client, run, key)] == iterations, key
    # per-epoch means under the trainer's metric names, one value per epoch, never mixed with iterations
    for key in ("loss", "recon_loss", "kl_loss", "val_psnr", "val_ssim"):
        assert [step for step, _ in history(client, run, key)] == list(range(1, epochs + 1)), key
    for key in ("loss", "recon_loss", "kl_loss"):
        assert history(client, run, key)[-1][1] == pytest.approx(trainer.state.metrics[key], rel=1e-5)
    # the epoch loss is the mean of that epoch's iteration losses
    if step_interval == 1:
        last_epoch = [v for s, v in history(client, run, "loss_step")][-EPOCH_LENGTH:]
        assert history(client, run, "loss")[-1][1] == pytest.approx(sum(last_epoch) / EPOCH_LENGTH, rel=1e-5)
    assert 0 < run.data.metrics["val_psnr"] < 100 and 0 <= run.data.metrics["val_ssim"] <= 1

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoint_last.pt", "previews"} <= artifacts
    previews = [a.path for a in client.list_artifacts(run.info.run_id, "previews")]
    assert previews == [f"previews/reconstruction_epoch{e:04d}.png" for e in range(1, epochs + 1)]
    # the logged config is the resolved one of this run
    local = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(out.parent / "downloaded")))
    assert yaml.safe_load(local.read_text()) == yaml.safe_load((out / "config.yaml").read_text())


def test_local_sqlite_store(tmp_path, tiny_dataset):
    overrides = train_overrides(tmp_path, tiny_dataset, use_mlflow=True, max_epochs=2, adv_warmup_epochs=1, mlflow_step_interval=2)
    workflow = run_workflow(AE_CONFIG, **overrides)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    client = mlflow.MlflowClient(tracking_uri=overrides["tracking_uri"])
    run = only_run(client)
    assert run.info.run_name.startswith("autoencoder_")
    check_run(client, run, 2, trainer, tmp_path / "out", step_interval=2)
    # adversarial terms from epoch 2 on (adv_warmup_epochs 1), at every second iteration
    assert [s for s, _ in history(client, run, "disc_loss_step")] == [4, 6]
    # artifacts live beside the store, in tmp_path, not in the repository
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(tmp_path)


def test_use_mlflow_false_creates_no_run(tmp_path, tiny_dataset):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(EXPERIMENT)
    run_workflow(AE_CONFIG, **train_overrides(tmp_path, tiny_dataset, use_mlflow=False))
    assert (tmp_path / "out" / "checkpoint_last.pt").is_file()  # it did train
    assert client.search_runs([experiment_id]) == []
    assert {e.name for e in client.search_experiments()} <= {"Default", EXPERIMENT}


# ---------------------------------------------------------------------------------------------
# a real tracking server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on a free local port with a SQLite backend and proxied artifacts in a
    temporary folder; stopped (its whole process group) when the module's tests are done."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", PYTHONWARNINGS="ignore")
    log = open(root / "server.log", "w")
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    server = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop():
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=10)
        log.close()

    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while not _answers(url + "/health"):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.25)
        yield {"uri": url, "artifacts": root / "artifacts"}
    finally:
        stop()


def test_tracking_server(tmp_path, tiny_dataset, mlflow_server, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    overrides = train_overrides(tmp_path, tiny_dataset, use_mlflow=True, tracking_uri=mlflow_server["uri"], mlflow_step_interval=1)
    workflow = run_workflow(AE_CONFIG, **overrides)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    client = mlflow.MlflowClient(tracking_uri=mlflow_server["uri"])
    run = only_run(client)
    check_run(client, run, 1, trainer, tmp_path / "out")
    # the artifacts went through the server into its artifact store, not to a local mlruns folder
    stored = {p.name for p in mlflow_server["artifacts"].rglob("*") if p.is_file()}
    assert {"config.yaml", "checkpoint_last.pt", "reconstruction_epoch0001.png"} <= stored
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlruns.db").exists()


def test_unreachable_tracking_server_fails_in_seconds_naming_the_fix(tmp_path, tiny_dataset):
    """Nothing listens on port 9: MLflow would retry for minutes and fail without naming the setting.
    The run stops during initialize, and its last lines name tracking_uri and --use_mlflow False."""
    with socket.socket() as s:  # a port that refuses connections
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    result = run_bundle(
        AE_CONFIG, "training", timeout=120, **train_overrides(tmp_path, tiny_dataset, use_mlflow=True, tracking_uri=uri)
    )
    assert result.returncode != 0
    assert time.monotonic() - start < 60
    last = "\n".join(result.stdout.strip().splitlines()[-2:])
    assert f"tracking_uri '{uri}' cannot be reached" in last and "--use_mlflow False" in last, result.stdout[-3000:]
    assert "Engine run" not in result.stdout and not (tmp_path / "out" / "config.yaml").exists()


def test_local_tracking_uris_are_not_probed():
    from scripts.tracking import check_tracking_uri

    for uri in ("sqlite:///x/mlruns.db", "file:///x/mlruns", "mlruns"):
        assert check_tracking_uri(uri, timeout=0.01) == uri


@pytest.mark.parametrize("interval", [0, -5, 2.5])
def test_a_bad_mlflow_step_interval_is_refused_before_training(tmp_path, tiny_dataset, interval):
    from conftest import make_workflow

    workflow = make_workflow(AE_CONFIG, **train_overrides(tmp_path, tiny_dataset, use_mlflow=True, mlflow_step_interval=interval))
    with pytest.raises(Exception) as info:
        workflow.initialize()
    text = error_text(info.value)
    assert "mlflow_step_interval must be a positive integer" in text and repr(interval) in text
    assert not (tmp_path / "out" / "config.yaml").exists() and not (tmp_path / "mlruns.db").exists()


def test_every_n_steps_logs_each_nth_iteration():
    from scripts.tracking import every_n_steps

    assert [i for i in range(1, 8) if every_n_steps(3)(None, i)] == [3, 6]
    assert all(every_n_steps(1)(None, i) for i in range(1, 4))
