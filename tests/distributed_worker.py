"""One rank of a data-parallel bundle training, launched by tests/test_distributed.py with torchrun:

    torchrun --standalone --nproc_per_node=2 tests/distributed_worker.py SPEC.json

SPEC.json holds one job, ``{"name": "autoencoder" | "diffusion", "config_file", "overrides",
"result"}``. The worker builds the workflow that ``python -m monai.bundle run`` builds
(``monai.bundle.ConfigWorkflow``, workflow_type "train"), initializes it (which initializes the
gloo process group), records what the CLI gives no hook for, runs it, gathers every rank's record
on rank 0 and finalizes it (which destroys the process group). Rank 0 writes the records to the
job's ``result`` JSON. (One job per launch: a second ``init_process_group`` in the same process,
after ``destroy_process_group``, can find the first group's stale addresses in torchrun's store
and fail to connect.)

- ``params``: per network, the flattened parameters (the bare module of a DistributedDataParallel
  wrapper) of every rank after training: a SHA-256 of their bytes, the max abs difference to
  rank 0's and the max abs change from this rank's initial values;
- ``batches``: per training iteration, the source files and a checksum of the batch the rank
  trained on; ``sampler``: the indices the rank's training sampler gave in the epoch;
- ``val_sampler`` / ``val_metrics``: the rank's validation indices and the evaluator's metrics;
- ``scale_factor``: the latent scale factor the rank computed (diffusion only);
- ``trainer_network``: the type of the module the trainer runs (compiled or not).

A job that raises leaves its traceback in ``result + ".error<rank>"`` and the worker exits non-zero.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from ignite.engine import Events  # noqa: E402

# the networks each job checks, by config id
NETWORKS = {"autoencoder": ["autoencoder", "discriminator"], "diffusion": ["diffusion"]}


def flat_parameters(module: torch.nn.Module) -> torch.Tensor:
    module = getattr(module, "module", module)  # the bare network inside DistributedDataParallel
    return torch.cat([p.detach().float().flatten().cpu() for p in module.parameters()])


def batch_record(batch: dict) -> dict:
    image = batch["image"] if "image" in batch else batch["z_mu"]  # the diffusion trains on encoded latents
    meta = getattr(image, "meta", {})
    files = meta.get("filename_or_obj", [])
    files = [files] if isinstance(files, str) else list(files)
    tensor = image.as_tensor() if hasattr(image, "as_tensor") else image
    return {
        "files": [Path(str(f)).name for f in files],
        "shape": list(tensor.shape),
        "sum": float(tensor.double().sum()),
        "sha256": hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest(),
    }


def run_job(job: dict) -> dict:
    from monai.bundle import ConfigWorkflow

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "config runs code" notice
        workflow = ConfigWorkflow(config_file=job["config_file"], workflow_type="train", **job["overrides"])
    workflow.initialize()  # seeds, builds the networks, init_process_group (gloo on CPU)
    assert dist.is_initialized(), "initialize() should have initialized the process group"
    rank, world = dist.get_rank(), dist.get_world_size()
    parsed = workflow.parser.get_parsed_content

    networks = {name: parsed(name) for name in NETWORKS[job["name"]]}
    initial = {name: flat_parameters(net).clone() for name, net in networks.items()}

    trainer = parsed("train#trainer")  # the instance `run` uses: the parser keeps resolved items
    record: dict = {"rank": rank, "world_size": world, "batches": [], "trainer_network": type(trainer.network).__name__}
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: record["batches"].append(batch_record(e.state.batch)))
    workflow.run()

    sampler = trainer.data_loader.sampler  # set to the (last) epoch by MONAI's Workflow
    record["sampler"] = [int(i) for i in sampler]
    record["iterations"] = trainer.state.iteration
    record["train_metrics"] = {k: float(v) for k, v in trainer.state.metrics.items()}
    if job["name"] == "autoencoder":
        evaluator = parsed("validate#evaluator")
        record["val_sampler"] = [int(i) for i in evaluator.data_loader.sampler]
        record["val_metrics"] = {k: float(v) for k, v in evaluator.state.metrics.items()}
    else:
        record["scale_factor"] = [float(s) for s in parsed("scale_factor")]

    # every rank's parameters on every rank: compare them with rank 0's
    record["params"] = {}
    for name, net in networks.items():
        final = flat_parameters(net)
        gathered = [torch.empty_like(final) for _ in range(world)]
        dist.all_gather(gathered, final)
        record["params"][name] = {
            "numel": final.numel(),
            "sha256": hashlib.sha256(final.numpy().tobytes()).hexdigest(),
            "max_abs_diff_to_rank0": float((final - gathered[0]).abs().max()),
            "max_abs_change": float((final - initial[name]).abs().max()),
        }
    records = [None] * world
    dist.all_gather_object(records, record)
    workflow.finalize()  # destroy_process_group
    record["process_group_destroyed"] = not dist.is_initialized()
    return {"ranks": records, "process_group_destroyed": record["process_group_destroyed"]}


def main(spec_path: str) -> int:
    job = json.loads(Path(spec_path).read_text())
    rank = int(os.environ["RANK"])
    try:
        result = run_job(job)
    except Exception:
        traceback.print_exc()
        Path(job["result"] + f".error{rank}").write_text(traceback.format_exc())
        return 1
    if rank == 0:
        Path(job["result"]).write_text(json.dumps(result, indent=1))
    print(f"rank {rank}: job {job['name']} done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
