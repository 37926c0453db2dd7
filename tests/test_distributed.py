"""Data-parallel training with torchrun: two real CPU processes on the gloo backend.

- The autoencoder overlay (``multi_gpu_train_autoencoder.yaml``) through the real CLI,
  ``torchrun --standalone --nproc_per_node=2 -m monai.bundle run training``: it exits 0 and rank 0
  alone writes the checkpoints and the one MLflow run.
- The same overlay and the diffusion overlay (the latter with the UNet compiled) through ``tests/distributed_worker.py`` (the
  ``ConfigWorkflow`` that the CLI builds, launched with torchrun), which reports what the CLI gives
  no hook for: every rank's weights after training, the data each rank trained on, the validation
  shards and metrics and the latent scale factor. One launch per training (see the worker on why).

Tiny settings from conftest; a dataset of six volumes, so that the validation split (two volumes)
gives each rank one and the training split (four) gives each rank two iterations, on different
volumes. Each launch costs ~10 s of interpreter and import start on two cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import AE_CONFIG, CONFIGS, DIFFUSION_CONFIGS, REPO, TINY_DIFFUSION, TINY_TRAIN, cli_value, train_overrides, write_dataset
from distributed_worker import flat_parameters
from monai.networks.nets import DiffusionModelUNet, PatchDiscriminator
from scripts.networks import FactorAutoencoderKL

NPROC = 2
AE_DDP_CONFIGS = [AE_CONFIG, str(CONFIGS / "multi_gpu_train_autoencoder.yaml")]
DIFFUSION_DDP_CONFIGS = [*DIFFUSION_CONFIGS, str(CONFIGS / "multi_gpu_train_diffusion.yaml")]
WORKER = REPO / "tests" / "distributed_worker.py"
TIMEOUT = 300  # seconds for one torchrun launch; ~15-25 s is usual
EXPERIMENT = "ldm3d_downsample_factors"
# train_autoencoder.yaml's discriminator_def at the tiny settings
DISCRIMINATOR_ARGS = dict(
    spatial_dims=3,
    num_layers_d=TINY_TRAIN["discriminator_num_layers"],
    channels=TINY_TRAIN["discriminator_channels"],
    in_channels=1,
    out_channels=1,
    norm="INSTANCE",
)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")


def torchrun(args: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` from the repository root (``--standalone``
    picks a free port); stdout and stderr merged into ``.stdout``. On timeout torchrun is sent
    SIGTERM, which stops its workers (they run in sessions of their own, so killing torchrun alone
    would orphan them), and the test fails with the output so far."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout} s; output:\n{out[-10000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def sha256_of_parameters(network: torch.nn.Module) -> str:
    return hashlib.sha256(flat_parameters(network).numpy().tobytes()).hexdigest()


def failure(result: subprocess.CompletedProcess, what: str = "") -> str:
    return f"{what}\nexit status {result.returncode} of {' '.join(result.args)}\noutput:\n{result.stdout[-10000:]}"


@pytest.fixture(scope="module")
def dataset6(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddp_dataset")
    write_dataset(folder, 6)  # val_fraction 0.25: 2 validation and 4 training volumes
    return folder


# ---------------------------------------------------------------------------------------------
# 1. the real CLI


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, dataset6):
    tmp = tmp_path_factory.mktemp("ddp_cli")
    # val_fraction 0.1: one validation volume for two ranks, so both validate it (no shard is empty)
    overrides = train_overrides(tmp, dataset6, use_mlflow=True, adv_warmup_epochs=0, val_fraction=0.1, mlflow_step_interval=1)
    overrides.pop("mixed_precision")  # None does not survive the CLI (dropped); bf16 is ignored on CPU anyway
    config_arg = "[" + ",".join(f"'{c}'" for c in AE_DDP_CONFIGS) + "]"
    args = ["-m", "monai.bundle", "run", "training", "--config_file", config_arg]
    for key, value in overrides.items():
        args += [f"--{key}", cli_value(value)]
    return {"result": torchrun(args), "tmp": tmp, "out": tmp / "out", "overrides": overrides}


def test_cli_autoencoder_training_on_two_processes(cli_run):
    import mlflow

    result, tmp, out = cli_run["result"], cli_run["tmp"], cli_run["out"]
    assert result.returncode == 0, failure(result)
    log = result.stdout
    assert log.count("Setting logging properties") == NPROC, failure(result, "expected one log setup per rank")
    # one process prints the epoch's metrics (reduced over the ranks)
    assert sum("Metrics --" in line and "steps_per_second" in line for line in log.splitlines()) == 1, failure(result, "metrics printed by more than one rank")

    # rank 0 alone writes the checkpoints: one of each in tmp, one "saved" line each, no temporaries
    for name in ("checkpoint_last.pt", "model_autoencoder.pt"):
        written = sorted(p for p in tmp.rglob(name) if "artifacts" not in p.parts)  # not MLflow's copy
        assert written == [out / name], name
        assert log.count(f"saved {out / name}") == 1, failure(result, f"{name} saved more than once")
    assert not list(out.glob(".*")), "temporary files left behind"
    last = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert last["trainer"]["iteration"] == last["trainer"]["epoch_length"] == 3  # 1 epoch, 5 volumes over 2 ranks, padded to 6
    assert not any(k.startswith("module.") for k in last["autoencoder"]), "the bare network's keys, not DDP's"
    assert not any(k.startswith("module.") for k in last["discriminator"])
    assert last["optimizer_d"]["state"], "the discriminator trained (adv_warmup_epochs 0)"
    best = torch.load(out / "model_autoencoder.pt", map_location="cpu", weights_only=True)
    torch.testing.assert_close(best["autoencoder"], last["autoencoder"])

    # exactly one MLflow run, finished, with rank 0's two iterations and the checkpoint artifact
    client = mlflow.MlflowClient(tracking_uri=cli_run["overrides"]["tracking_uri"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_name.startswith("autoencoder_")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss_step")] == [1, 2, 3]
    assert "disc_loss_step" in run.data.metrics  # the adversarial branch ran
    assert "val_psnr" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"checkpoint_last.pt", "config.yaml"}
    assert len(list(tmp.rglob("artifacts/checkpoint_last.pt"))) == 1
    all_runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in all_runs] == [run.info.run_id], "no run in any other experiment either"


# ---------------------------------------------------------------------------------------------
# 2. and 3. the worker: weights, data shards, validation and the latent scale factor per rank


def launch_worker(tmp: Path, name: str, config_file: list[str], overrides: dict) -> dict:
    """Run one job of tests/distributed_worker.py on two processes; its report is read by job_result."""
    job = {"name": name, "config_file": config_file, "overrides": overrides, "result": str(tmp / f"{name}.json")}
    spec = tmp / f"{name}_spec.json"
    spec.write_text(json.dumps(job, indent=1))
    return {"result": torchrun([str(WORKER), str(spec)]), "tmp": tmp, "job": job}


@pytest.fixture(scope="module")
def autoencoder_worker(tmp_path_factory, dataset6):
    tmp = tmp_path_factory.mktemp("ddp_autoencoder")
    return launch_worker(tmp, "autoencoder", AE_DDP_CONFIGS, train_overrides(tmp, dataset6, adv_warmup_epochs=0))


@pytest.fixture(scope="module")
def diffusion_worker(tmp_path_factory, dataset6, trained_autoencoder):
    tmp = tmp_path_factory.mktemp("ddp_diffusion")
    trained = trained_autoencoder["overrides"]
    overrides = train_overrides(
        tmp,
        dataset6,
        downsample_factors=trained["downsample_factors"],  # the session autoencoder's arguments
        autoencoder_ckpt=str(trained_autoencoder["ckpt"]),
        compile="eager",  # torch.compile over DistributedDataParallel (TorchDynamo without code generation)
        **TINY_DIFFUSION,
    )
    # the session autoencoder's network arguments are the diffusion run's: its checkpoint loads
    for key in ("channels", "norm_num_groups", "spacing", "downsample_factors"):
        assert overrides[key] == trained[key], key
    return launch_worker(tmp, "diffusion", DIFFUSION_DDP_CONFIGS, overrides)


def job_result(worker: dict) -> dict:
    job, result = worker["job"], worker["result"]
    path = Path(job["result"])
    assert result.returncode == 0 and path.is_file(), failure(result, f"the worker failed or wrote no {path.name}")
    report = json.loads(path.read_text())
    assert [r["rank"] for r in report["ranks"]] == list(range(NPROC))
    assert all(r["world_size"] == NPROC for r in report["ranks"])
    assert report["process_group_destroyed"], "finalize() should destroy the process group"
    return report


def check_identical_weights_and_different_data(report: dict, networks: list[str], iterations: int, files: bool = True) -> None:
    ranks = report["ranks"]
    for name in networks:
        per_rank = [r["params"][name] for r in ranks]
        assert per_rank[0]["numel"] > 0
        assert len({p["sha256"] for p in per_rank}) == 1, (name, per_rank)  # bitwise identical
        assert all(p["max_abs_diff_to_rank0"] == 0.0 for p in per_rank), (name, per_rank)
        assert all(p["max_abs_change"] > 0 for p in per_rank), (name, "did not train: the check would be vacuous")
    # the ranks trained on different volumes: disjoint sampler shards, different batches
    assert all(r["iterations"] == iterations == len(r["batches"]) for r in ranks), [r["iterations"] for r in ranks]
    shards = [set(r["sampler"]) for r in ranks]
    assert all(len(s) == iterations for s in shards) and not shards[0] & shards[1], shards
    if files:  # (encoded latents carry no file names; their bytes differ below)
        names = [{f for b in r["batches"] for f in b["files"]} for r in ranks]
        assert all(len(f) == iterations for f in names) and not names[0] & names[1], names
    assert not {b["sha256"] for b in ranks[0]["batches"]} & {b["sha256"] for b in ranks[1]["batches"]}
    # the epoch means of the losses are reduced over the ranks (ignite's Average): the same on both
    # the epoch's losses are averaged over the ranks; each rank times its own steps (Throughput)
    losses = [{k: v for k, v in r["train_metrics"].items() if k not in ("steps_per_second", "data_wait")} for r in ranks]
    assert losses[0] == losses[1] and losses[0]
    assert all(r["train_metrics"]["steps_per_second"] > 0 for r in ranks)


def test_autoencoder_weights_identical_across_ranks(autoencoder_worker):
    report = job_result(autoencoder_worker)
    # 4 training volumes, 2 per rank: two steps of all-reduced gradients, adversarial from the first
    check_identical_weights_and_different_data(report, ["autoencoder", "discriminator"], iterations=2)
    ranks = report["ranks"]
    # one validation volume per rank, and the metrics reduced over both
    val_shards = [r["val_sampler"] for r in ranks]
    assert sorted(val_shards) == [[0], [1]], val_shards
    assert ranks[0]["val_metrics"] == ranks[1]["val_metrics"] and "val_psnr" in ranks[0]["val_metrics"]
    # what rank 0 saved is the trained network, and the recorded best PSNR is the reduced metric
    out = Path(autoencoder_worker["job"]["overrides"]["output_dir"])
    last = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert last["best"]["best"] == pytest.approx(ranks[0]["val_metrics"]["val_psnr"])
    for name, args in (("autoencoder", last["autoencoder_args"]), ("discriminator", None)):
        network = FactorAutoencoderKL(**args) if args else PatchDiscriminator(**DISCRIMINATOR_ARGS)
        network.load_state_dict(last[name])
        assert sha256_of_parameters(network) == ranks[0]["params"][name]["sha256"], name


def test_diffusion_on_two_processes(diffusion_worker):
    report = job_result(diffusion_worker)
    ranks = report["ranks"]
    # six volumes and their mirror images: six latents per rank, batch 1
    check_identical_weights_and_different_data(report, ["diffusion"], iterations=6, files=False)
    # the trainer ran the compiled DistributedDataParallel UNet; the checkpoints below hold the bare UNet
    assert [r["trainer_network"] for r in ranks] == ["OptimizedModule"] * NPROC
    # every rank encodes all training volumes: the same latent scale factor on every rank
    scales = [r["scale_factor"] for r in ranks]
    assert scales[0] == scales[1] and min(scales[0]) > 0, scales
    # rank 0 alone wrote one model.pt (the moving average) and one checkpoint_last.pt (the trained UNet)
    tmp = diffusion_worker["tmp"]
    out = Path(diffusion_worker["job"]["overrides"]["output_dir"])
    assert sorted(tmp.rglob("model.pt")) == [out / "model.pt"]
    model = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    last = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert model["scale_factor"] == last["scale_factor"] == scales[0]
    unet = DiffusionModelUNet(**{k: v for k, v in last["diffusion_args"].items() if k != "num_class_embeds"})
    unet.load_state_dict(last["diffusion"])  # the bare UNet's keys, not DDP's "module." ones
    assert sha256_of_parameters(unet) == ranks[0]["params"]["diffusion"]["sha256"]
    unet.load_state_dict(model["diffusion"])
    assert sha256_of_parameters(unet) != ranks[0]["params"]["diffusion"]["sha256"]
    assert model["autoencoder_args"]["channels"] == diffusion_worker["job"]["overrides"]["channels"]
    logged = [line for line in diffusion_worker["result"].stdout.splitlines() if "latent scale factor g / std ** 0.5" in line]
    assert len(logged) == NPROC and len({line.split(" - ")[-1] for line in logged}) == 1, logged
