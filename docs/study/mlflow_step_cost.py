"""What MLflow's per-step logging costs the training loop: the two ``log_batch`` calls that MONAI's
``MLFlowHandler`` makes at a logged iteration (the losses, then the learning rate), timed against a
local SQLite store as the training configs use by default.

    python docs/study/mlflow_step_cost.py [ITERATIONS]
"""

from __future__ import annotations

import sys
import tempfile
import time

import mlflow
from mlflow.entities import Metric


def main(iterations: int = 200) -> float:
    with tempfile.TemporaryDirectory() as folder:
        client = mlflow.MlflowClient(f"sqlite:///{folder}/mlruns.db")
        run = client.create_run(client.create_experiment("step_cost")).info.run_id
        stamp = int(time.time() * 1000)
        losses = ("loss_step", "recon_loss_step", "kl_loss_step", "grad_norm_step")
        for step in range(5):  # the store's first writes create its tables
            client.log_batch(run, metrics=[Metric("loss_step", 0.1, stamp, step)])
        start = time.perf_counter()
        for step in range(iterations):
            client.log_batch(run, metrics=[Metric(k, 0.1, stamp, step) for k in losses])
            client.log_batch(run, metrics=[Metric("lr_group_0", 2e-4, stamp, step)])
        seconds = (time.perf_counter() - start) / iterations
    print(f"{seconds * 1e3:.1f} ms per logged iteration (mlflow {mlflow.__version__})")
    return seconds


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
