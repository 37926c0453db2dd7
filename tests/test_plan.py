"""The memory planner: what it counts, how it scales, what it suggests, and that training refuses
what it says will not fit (its agreement with a GPU is measured in docs/performance.md)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from scripts import plan

from conftest import CONFIGS, TINY_NET, make_workflow, train_overrides, write_dataset

TINY = {k: v for k, v in TINY_NET.items() if k in ("channels", "norm_num_groups", "latent_channels")}


def tiny_step(**overrides) -> plan.TrainingStep:
    return plan.training_step_from_config(str(CONFIGS / "train_autoencoder.yaml"), {**TINY, **overrides})


def test_saved_activations_count_what_backward_keeps_and_not_the_weights():
    conv = torch.nn.Conv3d(1, 4, 3, padding=1)
    x = torch.rand(2, 1, 8, 8, 8, requires_grad=True)
    with plan.saved_activations(conv) as phases:
        (conv(x) ** 2).sum().backward()
    saved, largest = phases[0]
    # the conv keeps its input (the weight is not counted), the square keeps the conv's output
    assert saved == x.numel() * 4 + 2 * 4 * 8**3 * 4
    assert largest == 2 * 4 * 8**3 * 4


def test_probe_scales_with_voxels_and_leaves_the_random_state():
    step = tiny_step()
    state = torch.random.get_rng_state()
    probe = plan.probe(step)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert probe.saved_per_voxel > 0 and probe.largest_per_voxel > 0 and probe.operators > 0
    one, two, four = (probe.peak_bytes([32, 32, 32], b) for b in (1, 2, 4))
    assert four - two == pytest.approx(2 * (two - one))  # linear in the batch's voxels
    assert probe.peak_bytes([64, 64, 64], 1) == pytest.approx(probe.peak_bytes([32, 32, 32], 8))
    assert probe.step_seconds([64, 64, 64], 1) > probe.step_seconds([32, 32, 32], 1) > 0
    # the network the config will train is untouched: the probe trains a copy
    assert all(p.grad is None for p in step.autoencoder.parameters())


def test_probe_on_the_cpu_says_nothing_about_mixed_precision(caplog):
    """The probe runs in float32 on the CPU by design: a GPU training that plans its step must not
    log that its bf16 is ignored."""
    step = tiny_step(mixed_precision="bf16")
    with caplog.at_level("INFO"):
        plan.probe(step)
    assert "ignored" not in caplog.text


def test_what_changes_a_step_changes_the_estimate():
    base = plan.probe(tiny_step())
    patch = [64, 64, 64]
    assert plan.probe(tiny_step(adv_weight=0.01)).peak_bytes(patch, 2) > base.peak_bytes(patch, 2)
    assert plan.probe(tiny_step(layout="strided")).peak_bytes(patch, 2) > base.peak_bytes(patch, 2)
    # gradient checkpointing is estimated as without it: an upper bound, never an underestimate
    assert plan.probe(tiny_step(use_gradient_checkpointing=True)).peak_bytes(patch, 2) == pytest.approx(base.peak_bytes(patch, 2))


def test_largest_batch_and_patch_fit_the_budget_and_one_more_does_not():
    probe = plan.probe(tiny_step())
    budget = probe.peak_bytes([64, 64, 64], 5) + 1
    assert plan.largest_batch(probe, [64, 64, 64], budget) == 5
    patch = plan.largest_patch(probe, [256, 256, 128], budget, batch_size=2)
    assert probe.peak_bytes(patch, 2) <= budget
    assert all(p % m == 0 for p, m in zip(patch, probe.spatial_multiple))
    longest = max(range(3), key=lambda i: patch[i])
    bigger = list(patch)
    bigger[longest] += probe.spatial_multiple[longest]
    assert probe.peak_bytes(bigger, 2) > budget
    assert plan.largest_patch(probe, [256, 256, 128], probe.peak_bytes([4, 4, 4], 1) - 1) is None


def test_check_fits_refuses_a_step_that_will_not_fit_and_names_what_does(monkeypatch):
    step = tiny_step(mixed_precision="bf16")
    assert plan.check_fits(step, [64, 64, 64], 2, "cpu") is None  # nothing to check on a CPU
    probe = plan.probe(step)
    total = (probe.peak_bytes([64, 64, 64], 3) + 1000) / 0.95  # room for batch 3, with no rounding at the edge
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=total))
    assert plan.check_fits(step, [64, 64, 64], 3, "cuda") == pytest.approx(probe.peak_bytes([64, 64, 64], 3))
    with pytest.raises(ValueError, match=r"patch_size \[64, 64, 64\] with batch_size 8 needs about .* batch_size 3 fits"):
        plan.check_fits(step, [64, 64, 64], 8, "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=probe.peak_bytes([32, 32, 32], 1) / 0.95))
    with pytest.raises(ValueError, match=r"patch_size \[\d+, \d+, \d+\] fits at batch_size 1"):
        plan.check_fits(step, [64, 64, 64], 1, "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=probe.static_bytes))
    with pytest.raises(ValueError, match="no patch fits this network: use a larger factor"):
        plan.check_fits(step, [64, 64, 64], 1, "cuda")
    # volumes cached on the GPU come off the budget, and the refusal names the cache
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=total))
    cached = probe.peak_bytes([64, 64, 64], 3) - probe.peak_bytes([64, 64, 64], 2)
    assert plan.check_fits(step, [64, 64, 64], 2, "cuda", cached_bytes=cached) == pytest.approx(probe.peak_bytes([64, 64, 64], 2))
    with pytest.raises(ValueError, match=r"batch_size 3 needs about .* beside .* GiB of cached volumes \(cache 'gpu'\).* cache 'memory' keeps"):
        plan.check_fits(step, [64, 64, 64], 3, "cuda", cached_bytes=cached)
    # a step that does not fit even without the cache: the batch that does is named, not the cache
    with pytest.raises(ValueError, match=r"batch_size 8 needs about .* cached volumes .* batch_size 2 fits"):
        plan.check_fits(step, [64, 64, 64], 8, "cuda", cached_bytes=cached)


def test_training_config_declares_the_step_and_checks_it(tmp_path, monkeypatch):
    """The training config's training_step is what the planner probes, and the check runs before
    the first batch (on a GPU: here the check is made to refuse)."""
    data = tmp_path / "data"
    write_dataset(data, num_volumes=2)
    calls = []

    def refuse(step, patch, batch_size, device, cached_bytes):
        calls.append((type(step).__name__, list(patch), batch_size, cached_bytes))
        raise ValueError("planner says no")

    monkeypatch.setattr(plan, "check_fits", refuse)
    workflow = make_workflow(CONFIGS / "train_autoencoder.yaml", **train_overrides(tmp_path, data))
    with pytest.raises(RuntimeError, match="Failed to evaluate") as info:  # MONAI's wrapping of the config's error
        workflow.initialize()
    assert isinstance(info.value.__cause__, ValueError) and "planner says no" in str(info.value.__cause__)
    assert calls == [("TrainingStep", [16, 16, 16], 1, 0)]  # cache 'memory': nothing of the GPU's taken by the data
    monkeypatch.undo()

    # the real check on the config's own objects, after initialize built and prepared them (here with
    # a GPU's memory faked, since the check runs on a GPU only): the network it will train is untouched
    workflow = make_workflow(CONFIGS / "train_autoencoder.yaml", **train_overrides(tmp_path, data, mixed_precision="bf16"))
    workflow.initialize()
    step = workflow.parser.get_parsed_content("training_step")
    before = {k: v.clone() for k, v in step.autoencoder.state_dict().items()}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * 2**30))
    assert plan.check_fits(step, [16, 16, 16], 1, "cuda") > 0
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=2**20))
    with pytest.raises(ValueError, match="no patch fits this network"):
        plan.check_fits(step, [16, 16, 16], 1, "cuda")
    assert all(torch.equal(before[k], v) for k, v in step.autoencoder.state_dict().items())


def test_command_line_plans_every_factor_and_layout(tmp_path, capsys):
    output = tmp_path / "plan.json"
    rows = plan.main(["--gpu_memory", "0.5", "--image_size", "64", "64", "32", "--overrides", json.dumps(TINY),
                      "--layouts", "space_to_depth", "--output", str(output)])
    assert [(r["factors"], r["layout"]) for r in rows] == [("4x", "space_to_depth"), ("8x", "space_to_depth"), ("16x", "space_to_depth")]
    assert json.loads(output.read_text()) == json.loads(json.dumps(rows))
    plan.main(["--gpu_memory", "0.5", "--image_size", "64", "64", "32", "--overrides", json.dumps(TINY),
               "--factors", "4x", "--layouts", "space_to_depth", "--output", str(output)])
    assert len(json.loads(output.read_text())) == 3  # an existing file is kept; the second run's rows go beside it
    assert len(json.loads((tmp_path / "plan_1.json").read_text())) == 1
    for r in rows:
        assert r["patch"] is not None and r["peak_gib"] <= 0.5
    table = capsys.readouterr().out
    assert "largest patch" in table and "16x" in table
    assert [r["total_factor"] for r in rows] == ["4x", "8x", "16x"]
    # a config of your own is planned as given, labelled by its own factors
    overlay = tmp_path / "mine.yaml"
    overlay.write_text("downsample_factors: [[2, 2, 1], [2, 2, 2]]\n")
    mine = plan.main(["--gpu_memory", "0.5", "--image_size", "64", "64", "32", "--overrides", json.dumps(TINY),
                      "--config_file", json.dumps([plan.TRAIN_CONFIG, str(overlay)]), "--layouts", "space_to_depth"])
    assert [(r["factors"], r["total_factor"]) for r in mine] == [("config", "4x4x2")]
    with pytest.raises(SystemExit):
        plan.main(["--gpu_memory", "0"])
    assert "--gpu_memory must be positive" in capsys.readouterr().err
