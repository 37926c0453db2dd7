"""The benchmark runs and reports (tiny smoke mode on the CPU): that it works, not how fast."""

from __future__ import annotations

import json

import pytest

from scripts import benchmark


def test_smoke_run_reports_every_measurement(tmp_path, capsys):
    output = tmp_path / "bench.json"
    results = benchmark.main(["--smoke", "--device", "cpu", "--output", str(output)])
    assert json.loads(output.read_text()) == json.loads(json.dumps(results))
    names = [row["name"] for row in results["autoencoder"]]
    assert names[0] == "stock 4x eager"
    assert {"strided [2, 2]", "strided [4, 2]", "space_to_depth [2, 2]", "space_to_depth [4, 2]"} <= set(names)
    for row in results["autoencoder"]:
        assert row["seconds"] > 0 and row["peak_bytes"] is None  # no CUDA memory on a CPU
        assert row["time_vs_stock_eager"] > 0
    by_name = {row["name"]: row for row in results["autoencoder"]}
    assert by_name["space_to_depth [4, 2]"]["latent_shape"] == [3, 4, 4, 4]  # 32^3 over 8
    assert by_name["space_to_depth [2, 2]"]["time_vs_own_4x"] == 1.0
    assert [row["total_factor"] for row in results["diffusion"]] == [4, 8]
    assert results["reconstruction"] and results["reconstruction"][0]["seconds"] > 0
    table = capsys.readouterr().out
    assert "autoencoder step" in table and "reconstruction" in table


def test_compiled_rows_are_measured_against_the_same_network_eager():
    """--compile adds each network under the training config's compile (here TorchDynamo's eager
    backend: the code path, without code generation), with its ratio to the same network eager."""
    results = benchmark.main(
        ["--smoke", "--device", "cpu", "--layouts", "space_to_depth", "--factors", "[[2, 2]]", "--no_stock",
         "--diffusion_factors", "4", "--reconstruction", "[]", "--compile", "eager"]
    )
    rows = results["autoencoder"]
    assert [(row["name"], row["compile"]) for row in rows] == [("space_to_depth [2, 2]", None), ("space_to_depth [2, 2] compiled (eager)", "eager")]
    assert rows[0]["time_vs_eager"] == 1.0 and rows[1]["time_vs_eager"] > 0
    assert rows[1]["time_vs_own_4x"] == 1.0  # the 4x of the same mode
    unets = results["diffusion"]
    assert [(row["name"], row["compile"]) for row in unets] == [("UNet on 4x latents", None), ("UNet on 4x latents compiled (eager)", "eager")]
    assert unets[0]["time_vs_eager"] == 1.0 and unets[1]["time_vs_eager"] > 0
    assert results["reconstruction"] == []


def test_training_steps_of_the_bundle_configs_are_measured_beside_the_planner():
    """--training_configs measures the step the training config declares, over patches and batches,
    eager and in each --compile mode, and records the memory planner's estimate beside each eager
    step (as it does for every eager autoencoder row)."""
    tiny = {"channels": [8, 16, 16], "norm_num_groups": 8}
    results = benchmark.main(
        ["--smoke", "--device", "cpu", "--layouts", "space_to_depth", "--factors", "[[2, 2]]", "--no_stock",
         "--diffusion_factors", "--reconstruction", "[]", "--compile", "eager",
         "--training_configs", json.dumps([[[str(benchmark.BUNDLE_ROOT / "configs" / "train_autoencoder.yaml")], tiny]]),
         "--training_patches", "[[16, 16, 16], [32, 32, 16]]", "--training_batches", "1", "2"]
    )
    eager, compiled = results["autoencoder"]
    assert eager["planned_bytes"] > 0 and "planned_bytes" not in compiled  # the planner models eager steps
    rows = [r for r in results["training"] if r["compile"] is None]
    assert [(r["patch"], r["batch_size"]) for r in rows] == [([16, 16, 16], 1), ([16, 16, 16], 2), ([32, 32, 16], 1), ([32, 32, 16], 2)]
    assert all(r["seconds"] > 0 and r["planned_seconds"] > 0 for r in rows)
    compiled_steps = [r for r in results["training"] if r["compile"] == "eager"]
    assert [(r["patch"], r["batch_size"]) for r in compiled_steps] == [(r["patch"], r["batch_size"]) for r in rows]
    assert all(r["seconds"] > 0 and "planned_bytes" not in r and r["name"].endswith("compiled (eager)") for r in compiled_steps)
    assert rows[1]["planned_bytes"] - rows[0]["planned_bytes"] == pytest.approx(
        (rows[3]["planned_bytes"] - rows[2]["planned_bytes"]) / 4)  # in proportion to the voxels
