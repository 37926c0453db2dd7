"""scripts/reporting.py: the cause of a failed run as its last lines."""

from __future__ import annotations

import pytest
from monai.bundle import ConfigParser

from scripts.reporting import error_summary


def test_error_summary_names_the_config_item_and_the_first_real_cause():
    parser = ConfigParser(
        {
            "factors": [2, 2, 2],
            "check": "$(_ for _ in ()).throw(ValueError('factors has 3 entries; give 2'))",
            "uses": "$[@check, @factors]",
        }
    )
    with pytest.raises(RuntimeError, match="Failed to evaluate") as info:
        parser.get_parsed_content("uses")
    assert error_summary(info.value) == "Error (while resolving config item 'check'):\n  ValueError: factors has 3 entries; give 2"


def test_error_summary_of_a_plain_error():
    try:
        raise KeyError("no such key")
    except KeyError as e:
        assert error_summary(e) == "Error:\n  KeyError: 'no such key'"


def test_training_ends_with_a_summary(tmp_path, tiny_dataset, caplog):
    """Best validation PSNR and its epoch, the checkpoints, the previews, the MLflow run and a
    reconstruction command whose network keys match the new weights (it runs: the inference config
    loads them)."""
    import shlex

    import torch

    from conftest import AE_CONFIG, RECON_CONFIG, make_workflow, run_workflow, train_overrides

    caplog.set_level("INFO")
    overrides = train_overrides(tmp_path, tiny_dataset, use_mlflow=True, downsample_factors=[4, 2], adv_weight=0.0)
    run_workflow(AE_CONFIG, **overrides)
    out = tmp_path / "out"
    best = torch.load(out / "checkpoint_last.pt", weights_only=True)["best"]
    text = caplog.text
    assert "training finished at epoch 1 of 1" in text
    assert f"best val_psnr: {best['best']:.4f} at epoch 1" in text and best["best_epoch"] == 1
    assert f"checkpoints: {out / 'model_autoencoder.pt'}, {out / 'checkpoint_last.pt'}" in text
    assert f"previews: {out / 'previews'}" in text
    assert "MLflow: run '" in text and overrides["tracking_uri"] in text
    command = next(line for line in text.splitlines() if "next: python -m monai.bundle run" in line).split("next: ", 1)[1]
    args = shlex.split(command)
    keys = {args[i][2:]: args[i + 1] for i in range(4, len(args), 2)}
    import yaml

    values = {k: yaml.safe_load(v) for k, v in keys.items() if k not in ("config_file", "dataset_dir", "output_dir")}
    assert set(values) == {"autoencoder_ckpt"}  # the network and preprocessing come from the checkpoint
    workflow = make_workflow(RECON_CONFIG, **values, device="cpu")
    workflow.parser.get_parsed_content("load_autoencoder")
    assert workflow.parser.get_parsed_content("autoencoder_args")["downsample_factors"] == [4, 2]


def test_no_progress_bar_when_the_output_is_not_a_terminal():
    from scripts.reporting import progress_bar

    assert progress_bar() is None  # pytest captures stderr: logs and CI keep one line per epoch
