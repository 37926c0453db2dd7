"""Tests for scripts/engines.py: the VAE-GAN trainer (exact gradient accumulation, the non-finite
guard), precision selection and the per-epoch reseeding. The losses themselves:
tests/test_losses.py; the diffusion model's pieces: tests/test_diffusion.py."""

from __future__ import annotations

import copy
import logging
import math
import random

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader, DistributedSampler
from monai.networks.nets import PatchDiscriminator
from monai.transforms import RandSpatialCropd

from conftest import TINY_AUTOENCODER
from scripts import engines
from scripts.losses import build_auxiliary_losses
from scripts.engines import (
    AutoencoderKLTrainer,
    CUDAGraphSteps,
    EpochSeed,
    MultiTensorEMAHandler,
    ReshuffleEachPass,
    Throughput,
    autocast_dtype,
    compiled,
    default_compile,
    uses_cuda_graphs,
)
from scripts.networks import FactorAutoencoderKL

PATCH = (16, 16, 16)
FACTORS = [2, 2]


def tiny_pair(seed: int = 0):
    torch.manual_seed(seed)
    ae = FactorAutoencoderKL(**TINY_AUTOENCODER, downsample_factors=FACTORS, layout="space_to_depth")
    disc = PatchDiscriminator(spatial_dims=3, num_layers_d=2, channels=8, in_channels=1, out_channels=1, norm="INSTANCE")
    return ae, disc


def samples(n: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(1, *PATCH, generator=g)} for _ in range(n)]


def make_trainer(ae, disc, items, batch_size, accumulation_steps, lr=0.5, fused=False, **kwargs):
    """With ``fused``, fused Adam (the configs' optimizer on a GPU, here on the CPU): a non-finite
    step is skipped on the device and reported one iteration later. Else SGD, checked before its step."""
    loader = DataLoader(items, batch_size=batch_size, shuffle=False, num_workers=0)
    defaults = dict(kl_weight=1e-3, adv_weight=0.5, adv_warmup_epochs=0)
    defaults.update(kwargs)

    def optimizer(module):
        return torch.optim.Adam(module.parameters(), lr=lr, fused=True) if fused else torch.optim.SGD(module.parameters(), lr=lr)

    return AutoencoderKLTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=loader,
        network=ae,
        optimizer=optimizer(ae),
        discriminator=disc,
        d_optimizer=optimizer(disc),
        accumulation_steps=accumulation_steps,
        **defaults,
    )


def test_randn_of_a_batch_equals_two_draws_for_the_latent_size():
    """The premise of the accumulation test: the VAE's sampling noise for a batch of 2 equals two
    draws for batches of 1 only if a sample's latent numel is a multiple of 16 (CPU randn fills
    16 values at a time)."""
    ae, _ = tiny_pair()
    numel = ae.latent_channels * math.prod(ae.latent_shape(PATCH))
    assert numel % 16 == 0, f"latent numel {numel} per sample: pick a patch/latent size that is a multiple of 16"
    torch.manual_seed(5)
    together = torch.randn(2, numel)
    torch.manual_seed(5)
    apart = torch.cat([torch.randn(1, numel), torch.randn(1, numel)])
    assert torch.equal(together, apart)


def test_gradient_accumulation_is_exact():
    items = samples(2)
    runs = {}
    for name, batch_size, steps in (("one batch of 2", 2, 1), ("two accumulated batches of 1", 1, 2)):
        ae, disc = tiny_pair(seed=0)
        trainer = make_trainer(ae, disc, items, batch_size, steps)
        outputs = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
        torch.manual_seed(123)  # the same VAE sampling noise in both runs
        trainer.run()
        assert trainer.state.iteration == 2 // batch_size
        assert "gen_adv_loss" in outputs[-1] and "disc_loss" in outputs[-1], "the adversarial terms must be active"
        runs[name] = (ae, disc, outputs)

    (ae1, d1, out1), (ae2, d2, out2) = runs.values()
    # the accumulated run's mean loss is the big batch's loss
    assert np.mean([float(o["loss"]) for o in out2]) == pytest.approx(float(out1[0]["loss"]), rel=1e-5)
    start_ae, start_d = tiny_pair(seed=0)
    for reference, first, second in ((start_ae, ae1, ae2), (start_d, d1, d2)):
        moved = 0.0
        for (name, p0), p1, p2 in zip(reference.named_parameters(), first.parameters(), second.parameters()):
            assert p1.grad is not None and p2.grad is not None, name
            torch.testing.assert_close(p2.grad, p1.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"grad of {name}: {m}")
            torch.testing.assert_close(p2, p1, atol=1e-5, rtol=1e-5, msg=lambda m: f"weight {name}: {m}")
            moved = max(moved, (p1 - p0).abs().max().item())
        assert moved > 1e-4, "the optimizer step should have changed the weights"


def test_accumulation_steps_only_at_the_window_end_and_a_short_last_window():
    """Three batches with accumulation 2: steps after batches 2 and 3 (a short window of one)."""
    ae, disc = tiny_pair()
    trainer = make_trainer(ae, disc, samples(3), batch_size=1, accumulation_steps=2, adv_weight=0.0)
    weights = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: weights.append(next(ae.parameters()).detach().clone())
    )
    start = next(ae.parameters()).detach().clone()
    trainer.run()
    assert torch.equal(weights[0], start), "no optimizer step inside a window"
    assert not torch.equal(weights[1], weights[0]) and not torch.equal(weights[2], weights[1])


def test_refuses_bad_arguments():
    ae, disc = tiny_pair()
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be a positive integer, got 0"):
        make_trainer(ae, disc, samples(1), 1, 0)
    with pytest.raises(ValueError, match="discriminator and d_optimizer go together"):
        AutoencoderKLTrainer("cpu", 1, DataLoader(samples(1)), ae, torch.optim.SGD(ae.parameters(), lr=1), discriminator=disc)
    with pytest.raises(ValueError, match=r"no reconstruction loss: recon_weight \(L1\) is 0 .* Set mse_weight"):
        make_trainer(ae, disc, samples(1), 1, 1, recon_weight=0.0)
    with pytest.raises(ValueError, match="recon_weight must be >= 0"):
        make_trainer(ae, disc, samples(1), 1, 1, recon_weight=-1.0)
    make_trainer(ae, disc, samples(1), 1, 1, recon_weight=0.0, auxiliary_losses=build_auxiliary_losses(3, mse_weight=20.0))


def test_adversarial_loss_waits_for_warmup():
    ae, disc = tiny_pair()
    trainer = make_trainer(ae, disc, samples(1), 1, 1, adv_warmup_epochs=1)
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    trainer.run()
    assert "disc_loss" not in outputs[0]
    assert trainer.adversarial_active(2) and not trainer.adversarial_active(1)


@pytest.mark.parametrize("fused", [False, True])
def test_non_finite_loss_stops_before_the_optimizer_step(fused):
    ae, disc = tiny_pair()
    items = samples(2)
    items[1]["image"][0, 3, 4, 5] = float("nan")
    before_ae = {k: v.clone() for k, v in ae.state_dict().items()}
    before_d = {k: v.clone() for k, v in disc.state_dict().items()}
    trainer = make_trainer(ae, disc, items, batch_size=2, accumulation_steps=1, fused=fused)
    with pytest.raises(FloatingPointError) as info:
        trainer.run()
    message = str(info.value)
    assert "recon_loss = nan" in message and "before the optimizer step" in message
    assert "epoch 1, iteration 1" in message and "NaNs" in message
    assert all(torch.equal(before_ae[k], v) for k, v in ae.state_dict().items())
    assert all(torch.equal(before_d[k], v) for k, v in disc.state_dict().items())


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("network", ["autoencoder", "discriminator"])
def test_non_finite_gradient_of_a_finite_loss_stops_before_the_optimizer_step(network, fused):
    """bf16 and float32 have no loss scaler: a NaN gradient (injected by a hook) behind a finite loss
    must not reach the optimizer step, else the epoch's checkpoint_last.pt would hold NaN weights.
    Fused optimizers skip that step on the device, and the run stops at the epoch's end, before any
    checkpoint is written."""
    ae, disc = tiny_pair()
    target = ae if network == "autoencoder" else disc
    next(target.parameters()).register_hook(lambda grad: torch.full_like(grad, float("nan")))
    before_ae = {k: v.clone() for k, v in ae.state_dict().items()}
    before_d = {k: v.clone() for k, v in disc.state_dict().items()}
    trainer = make_trainer(ae, disc, samples(2), batch_size=1, accumulation_steps=2, fused=fused)
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"]))
    with pytest.raises(FloatingPointError) as info:
        trainer.run()
    name = "grad_norm" if network == "autoencoder" else "disc_grad_norm"
    message = str(info.value)
    assert f"{name} = nan" in message and "before the optimizer step" in message
    assert "epoch 1, iteration 2" in message, "checked at the step, the window's last micro-batch"
    assert "the loss is finite but its gradients are not" in message
    assert len(losses) == (2 if fused else 1) and math.isfinite(losses[0])
    assert all(torch.equal(before_ae[k], v) for k, v in ae.state_dict().items())
    assert all(torch.equal(before_d[k], v) for k, v in disc.state_dict().items())


def test_gradient_norms_are_in_the_output_at_each_step():
    ae, disc = tiny_pair()
    trainer = make_trainer(ae, disc, samples(2), batch_size=1, accumulation_steps=2)
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    trainer.run()
    assert "grad_norm" not in outputs[0], "no step inside a window, no norm"
    assert outputs[1]["grad_norm"] > 0 and outputs[1]["disc_grad_norm"] > 0


# ---------------------------------------------------------------------------------------------


def test_autocast_dtype():
    for bad in ("bfloat16", "16-mixed", True):
        with pytest.raises(ValueError, match="mixed_precision must be one of 'bf16', 'fp16' or null"):
            autocast_dtype(bad, "cpu")
    # float32 spelled as text, because the command line cannot pass None
    for fp32 in ("none", "None", "fp32", "null"):
        assert autocast_dtype(fp32, "cuda") is None
    for precision in (None, "bf16", "fp16"):
        assert autocast_dtype(precision, "cpu") is None
        assert autocast_dtype(precision, torch.device("cpu")) is None
    # on a GPU it is the named dtype (torch.device("cuda") needs no GPU to exist)
    assert autocast_dtype("bf16", "cuda") is torch.bfloat16
    assert autocast_dtype("fp16", "cuda:0") is torch.float16
    assert autocast_dtype(None, "cuda") is None


def test_log_network_summary_line(caplog):
    ae, _ = tiny_pair()
    caplog.set_level("INFO", logger="scripts.engines")
    line = engines.log_network_summary(ae, (32, 16, 16))
    assert line.startswith("downsample factors (2, 2) (space_to_depth): total 4x, patch 32x16x16 -> latent 16x8x4x4")
    assert line in caplog.text


# ---------------------------------------------------------------------------------------------


def _draws_per_epoch(max_epochs, start_epoch=0, seed=7):
    crop = RandSpatialCropd("image", roi_size=(2, 2, 2), random_size=False)
    engine = Engine(lambda e, b: None)
    EpochSeed(seed, transform=crop).attach(engine)
    draws = {}

    def draw(e):
        out = crop({"image": torch.arange(64.0).reshape(1, 4, 4, 4)})["image"]
        draws[e.state.epoch] = (torch.rand(3).tolist(), np.random.rand(2).tolist(), random.random(), out.flatten().tolist())

    engine.add_event_handler(Events.EPOCH_STARTED, draw)
    if start_epoch:
        engine.state.epoch = start_epoch
        engine.state.iteration = start_epoch * 2
        engine.state.epoch_length = 2
        engine.state.max_epochs = max_epochs
    torch.manual_seed(start_epoch + 99)  # whatever the state before, the epoch's draws are the same
    np.random.seed(start_epoch + 99)
    engine.run([0, 1], max_epochs=max_epochs)
    return draws


def test_epoch_seed_makes_epochs_reproducible():
    first = _draws_per_epoch(3)
    assert first == _draws_per_epoch(3)
    assert first[1] != first[2] != first[3]
    # a run resumed after epoch 1 sees epochs 2 and 3 exactly as the uninterrupted run did
    resumed = _draws_per_epoch(3, start_epoch=1)
    assert sorted(resumed) == [2, 3] and resumed[2] == first[2] and resumed[3] == first[3]
    assert _draws_per_epoch(2, seed=8)[1] != first[1]


def _batches_per_epoch(max_epochs, start_epoch=0, epoch_length=2):
    """The batches of each epoch from a shuffled loader of 3 items (epoch_length 2 does not divide it)."""
    loader = DataLoader(list(range(3)), batch_size=1, shuffle=True)
    engine = Engine(lambda e, b: None)
    EpochSeed(7).attach(engine)
    seen = {}
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.setdefault(e.state.epoch, []).append(int(e.state.batch)))
    if start_epoch:  # what ResumeFromCheckpoint restores
        engine.load_state_dict({"epoch": start_epoch, "epoch_length": epoch_length, "max_epochs": max_epochs})
    engine.run(loader, max_epochs=max_epochs, epoch_length=epoch_length)
    return seen


def test_resume_is_exact_when_epoch_length_does_not_divide_the_loader():
    """Each epoch starts a fresh pass of the loader, shuffled from (seed, epoch): the batches of a
    resumed run's epochs are the uninterrupted run's (ignite alone would carry the third item of a
    pass into the next epoch, which a resumed run cannot repeat)."""
    whole = _batches_per_epoch(4)
    assert all(len(b) == 2 for b in whole.values())
    resumed = _batches_per_epoch(4, start_epoch=2)
    assert sorted(resumed) == [3, 4] and resumed[3] == whole[3] and resumed[4] == whole[4]
    assert len({tuple(b) for b in whole.values()}) > 1, "epochs are shuffled differently"


def test_a_graph_that_fails_to_compile_runs_eagerly():
    """A backend that cannot compile (as Inductor without a C++ compiler): the step runs eagerly, with
    the eager result, instead of stopping the training."""

    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("no compiler here")

    torch._dynamo.reset()
    torch._dynamo.register_backend(failing_backend, name="failing_for_tests")
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.ReLU())
    x = torch.rand(1, 1, 6, 6, 6)
    torch.testing.assert_close(compiled(network, "failing_for_tests")(x), network(x))


def _passes_of_rank0(reshuffle: bool, start_epoch: int = 0) -> dict[int, list[list[int]]]:
    """Rank 0's batches of a DistributedSampler over 8 items and 2 ranks (4 items, 2 batches of 2 per
    pass), in epochs of 6 steps: three passes per epoch, grouped per epoch and pass."""
    loader = DataLoader(list(range(8)), batch_size=2, sampler=DistributedSampler(list(range(8)), num_replicas=2, rank=0))
    engine = Engine(lambda e, b: None)
    EpochSeed(7).attach(engine)
    if reshuffle:
        ReshuffleEachPass().attach(engine)
    seen: dict[int, list[list[int]]] = {}
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: loader.sampler.set_epoch(e.state.epoch))  # as MONAI's Workflow does
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.setdefault(e.state.epoch, []).extend(e.state.batch.tolist()))
    if start_epoch:
        engine.load_state_dict({"epoch": start_epoch, "epoch_length": 6, "max_epochs": 2})
    engine.run(loader, max_epochs=2, epoch_length=6)
    return {epoch: [items[i : i + 4] for i in range(0, 12, 4)] for epoch, items in seen.items()}


def test_reshuffle_each_pass_of_a_distributed_sampler():
    """MONAI sets the sampler's epoch once per epoch: without the handler every pass of an epoch
    repeats the first; with it each pass is a new shuffle of the same shard size, and a run resumed
    at an epoch draws what the uninterrupted run drew."""
    repeated = _passes_of_rank0(reshuffle=False)
    assert all(p == passes[0] for passes in repeated.values() for p in passes)
    reshuffled = _passes_of_rank0(reshuffle=True)
    for passes in reshuffled.values():
        assert all(len(p) == 4 and len(set(p)) == 4 for p in passes)
        assert len({tuple(p) for p in passes}) > 1, passes
    assert _passes_of_rank0(reshuffle=True, start_epoch=1)[2] == reshuffled[2]


def test_a_run_resumed_in_the_middle_of_an_epoch_finishes_that_epoch_only():
    """A time-limited run stops mid-epoch and its checkpoint holds that iteration: resumed, the epoch
    runs its remaining steps, so every later epoch (and an iteration-based schedule) keeps its place."""
    loader = DataLoader(list(range(10)), batch_size=1, shuffle=True)
    engine = Engine(lambda e, b: None)
    EpochSeed(7).attach(engine)
    steps = []
    engine.add_event_handler(Events.STARTED, lambda e: e.load_state_dict({"iteration": 5, "epoch_length": 4, "max_epochs": 3}))
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: steps.append((e.state.epoch, e.state.iteration)))
    engine.run(loader, max_epochs=3, epoch_length=4)
    assert steps == [(2, 6), (2, 7), (2, 8), (3, 9), (3, 10), (3, 11), (3, 12)]


def test_default_compile_is_cuda_graphs_on_a_gpu_that_inductor_compiles_for(monkeypatch, caplog):
    import importlib.util

    assert default_compile("cpu") is False
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert default_compile(torch.device("cuda")) == "reduce-overhead"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))  # a Pascal card
    with caplog.at_level(logging.INFO, logger=engines.logger.name):
        assert default_compile("cuda:0") is False
    assert "compile: eager on cuda:0 (compute capability 6.1; Triton needs 7.0 or above)" in caplog.text
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with caplog.at_level(logging.INFO, logger=engines.logger.name):
        assert default_compile("cuda") is False
    assert "Triton, which Inductor compiles GPU kernels with, is not installed" in caplog.text


def test_check_flags_takes_booleans_and_refuses_text():
    engines.check_flags(fast_dev_run=False, attention_levels=[False, True], use_mlflow=True)
    with pytest.raises(ValueError, match=r"use_mlflow must be true or false, got 'false'.*--use_mlflow False"):
        engines.check_flags(use_mlflow="false")
    with pytest.raises(ValueError, match=r"at each level, got \[False, 'true'\].*'\[False,True\]'"):
        engines.check_flags(attention_levels=[False, "true"])
    with pytest.raises(ValueError, match="got 1"):
        engines.check_flags(latent_flips=1)


def test_compiled_shares_the_networks_parameters():
    network = FactorAutoencoderKL(**TINY_AUTOENCODER, downsample_factors=[2, 2])
    assert compiled(network, False) is network and compiled(network, None) is network
    assert compiled(network, "false") is network and compiled(network, "True")._orig_mod is network  # as `--compile false` arrives
    module = compiled(network, "eager")  # compiled at its first call: tests/test_training.py trains one
    assert isinstance(module, torch._dynamo.eval_frame.OptimizedModule) and module._orig_mod is network
    assert [p.data_ptr() for p in module.parameters()] == [p.data_ptr() for p in network.parameters()]
    assert compiled(network, "max-autotune-no-cudagraphs")._orig_mod is network  # an Inductor mode (compiled at the first call)
    with pytest.raises(ValueError, match=r"compile must be true, false, an Inductor mode \(.*max-autotune-no-cudagraphs.*reduce-overhead.*\) or a torch.compile backend \(.*inductor.*\); got 'fast'"):
        compiled(network, "fast")
    for mode in ("reduce-overhead", "max-autotune", "cudagraphs"):  # CUDA graphs: compiled, and the trainers mark their steps
        assert compiled(network, mode)._orig_mod is network and uses_cuda_graphs(mode)
    assert not any(uses_cuda_graphs(c) for c in (False, None, True, "default", "eager", "max-autotune-no-cudagraphs"))


@pytest.mark.parametrize("accumulation, marked", [(1, [1, 2, 3, 4, 5, 6]), (2, [1, 3, 4, 6])])
def test_cuda_graph_steps_are_marked_where_each_optimizer_step_begins(monkeypatch, accumulation, marked):
    """Every iteration is a step of its own; with gradient accumulation a window of micro-batches is
    one, counted per epoch as the trainers count their windows (epochs of 3: windows 2 + 1)."""
    engine = Engine(lambda e, b: None)
    engine.accumulation_steps = accumulation
    CUDAGraphSteps().attach(engine)
    seen = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: seen.append(engine.state.iteration))
    engine.run(range(3), max_epochs=2, epoch_length=3)
    assert seen == marked


# ---------------------------------------------------------------------------------------------
# auxiliary losses, the learning-rate schedule and the time limit


def test_auxiliary_losses_are_in_the_trainer_output_and_the_loss():
    ae, disc = tiny_pair()
    auxiliary = build_auxiliary_losses(3, ssim_weight=0.5, spectral_weight=0.25)
    trainer = make_trainer(ae, disc, samples(2), 1, 1, adv_weight=0.0, auxiliary_losses=auxiliary)
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append({k: float(v) for k, v in e.state.output.items()}))
    trainer.run()
    for out in outputs:
        assert {"recon_loss", "kl_loss", "ssim_loss", "spectral_loss", "loss"} <= set(out)
        assert out["ssim_loss"] > 0 and out["spectral_loss"] > 0
        expected = out["recon_loss"] + 1e-3 * out["kl_loss"] + 0.5 * out["ssim_loss"] + 0.25 * out["spectral_loss"]
        assert out["loss"] == pytest.approx(expected, rel=1e-5)
    # without them: neither key, and the same trainer otherwise
    ae, disc = tiny_pair()
    plain = make_trainer(ae, disc, samples(1), 1, 1, adv_weight=0.0)
    plain.run()
    assert "ssim_loss" not in plain.state.output and "spectral_loss" not in plain.state.output


def _lrs(schedule, warmup, total, steps, base=0.5):
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=base)
    scheduler = engines.lr_schedule(optimizer, schedule, warmup, total)
    lrs = []
    for _ in range(steps):  # the lr of each iteration, then the per-iteration step (LrScheduleHandler's order)
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_lr_schedule_constant_warms_up_linearly():
    assert _lrs("constant", 4, 100, 6) == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5, 0.5, 0.5])
    assert _lrs("constant", 0, 100, 3) == pytest.approx([0.5] * 4)  # no warm-up: the full rate from the start


def test_lr_schedule_cosine_reaches_zero_at_the_total():
    total, warmup = 20, 4
    lrs = _lrs("cosine", warmup, total, total)
    assert lrs[0] == 0.0 and lrs[1:warmup + 1] == pytest.approx([0.125, 0.25, 0.375, 0.5])  # linear warm-up
    decay = lrs[warmup:]
    assert all(a > b for a, b in zip(decay, decay[1:])), "strictly decreasing after the warm-up"
    assert lrs[warmup + (total - warmup) // 2] == pytest.approx(0.25)  # half way: half the rate
    assert lrs[total] == pytest.approx(0.0, abs=1e-12)
    # without warm-up it starts at the full rate
    assert _lrs("cosine", 0, 10, 10)[0] == 0.5 and _lrs("cosine", 0, 10, 10)[-1] == pytest.approx(0.0, abs=1e-12)


def test_lr_schedule_refuses_unknown_name():
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="lr_schedule must be 'constant' or 'cosine', got 'linear'"):
        engines.lr_schedule(optimizer, "linear", 0, 10)


def test_time_limit_counts_from_the_engine_start_and_ends_cleanly(tmp_path, monkeypatch):
    """On a fake clock: time before the engine starts (data caching) does not count; after the limit
    the engine ends after the current iteration, and the last checkpoint is still written."""
    import time

    from scripts.checkpoints import AtomicCheckpointSaver

    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    limit = engines.TimeLimit(limit_sec=1)

    def iteration(engine, batch):
        clock[0] += 0.4

    engine = Engine(iteration)
    limit.attach(engine)
    saver = AtomicCheckpointSaver(tmp_path, {"args": {"a": 1}}, "checkpoint_last.pt")
    saver.attach(engine)
    clock[0] += 100.0  # caching the dataset, before training starts
    engine.run(range(10), max_epochs=5)
    assert engine.state.iteration == 3  # 1.2 s > 1 s after the third iteration
    ckpt = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 3


def _time_limit_rank(rank: int, port: int, out: str) -> None:
    """One process of a two-process gloo job whose clocks run at different speeds; each iteration
    all-reduces a tensor, as the gradients of a data-parallel step are."""
    import datetime
    import json
    import time

    import torch.distributed as dist

    clock = [0.0]
    time.time = lambda: clock[0]  # this process's own clock (a forked child: the parent's is untouched)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))

    def iteration(engine, batch):
        clock[0] += 0.3 if rank == 0 else 0.5
        dist.all_reduce(torch.ones(1))

    engine = Engine(iteration)
    engines.TimeLimit(limit_sec=1, sync_every=2).attach(engine)
    engine.run(range(100), max_epochs=1)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"iteration": engine.state.iteration}, f)
    dist.destroy_process_group()


def test_time_limit_stops_every_data_parallel_process_after_the_same_iteration(tmp_path):
    """Alone, the slow clock (rank 0) would stop after iteration 4 and the fast one after 3, and the
    process still running would wait in its all-reduce; agreeing every 2 iterations, both stop after 4."""
    import json
    import socket

    from torch.multiprocessing import start_processes

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_processes(_time_limit_rank, args=(port, str(tmp_path)), nprocs=2, start_method="fork")
    assert [json.loads((tmp_path / f"rank{r}.json").read_text())["iteration"] for r in (0, 1)] == [4, 4]


def test_throughput_reports_steps_per_second_and_the_share_spent_waiting_for_data():
    """A loader that takes as long per batch as the step: about half the epoch waits for data."""
    import time

    def slow_batches():
        for i in range(10):
            time.sleep(0.02)
            yield i

    engine = Engine(lambda engine, batch: time.sleep(0.02))
    Throughput().attach(engine)
    engine.run(slow_batches(), max_epochs=1, epoch_length=10)
    metrics = engine.state.metrics
    assert 10 < metrics["steps_per_second"] < 26  # 25 at most: 40 ms per step
    assert 0.3 < metrics["data_wait"] < 0.7


def test_multi_tensor_ema_averages_as_ignites_handler():
    """The same averaged weights as ignite's EMAHandler, step for step through the momentum warm-up,
    with the buffers (the cosine shortcut's basis) copied as ignite copies them."""
    from ignite.handlers import EMAHandler

    network = FactorAutoencoderKL(**dict(TINY_AUTOENCODER, shortcut="cosine", latent_channels=8), downsample_factors=[2, 2])
    averaged = {}
    for handler_type in (EMAHandler, MultiTensorEMAHandler):
        torch.manual_seed(0)
        model = copy.deepcopy(network)
        engine = Engine(lambda e, b: [p.data.add_(torch.randn_like(p)) for p in model.parameters()])
        handler = handler_type(model, momentum=0.01, momentum_warmup=0.1, warmup_iters=4)
        handler.attach(engine)
        engine.run(range(6), max_epochs=1)
        averaged[handler_type] = handler.ema_model.state_dict()
        assert list(handler.ema_model.buffers()) and all(
            e.data_ptr() == m.data_ptr() for e, m in zip(handler.ema_model.buffers(), model.buffers())
        )
    ours, ignites = averaged[MultiTensorEMAHandler], averaged[EMAHandler]
    assert ours.keys() == ignites.keys() and all(torch.equal(ours[k], ignites[k]) for k in ours)
