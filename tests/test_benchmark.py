"""The benchmark runs and reports (tiny smoke mode on the CPU): that it works, not how fast."""

from __future__ import annotations

import json

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
