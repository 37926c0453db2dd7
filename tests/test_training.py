"""The autoencoder training bundle end to end, through MONAI's bundle runner: real (tiny) trainings
with isotropic and anisotropic factors, exact resume, the early refusal of bad inputs and the
fast_dev_run switch.

Most runs use ``ConfigWorkflow`` in this process (what ``python -m monai.bundle run`` builds, minus
the interpreter start); one training and one refusal go through the real CLI for its argument
parsing, log output and exit status.
"""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest
import torch
import yaml

from conftest import (
    AE_CONFIG,
    DIFFUSION_CONFIGS,
    TINY_DIFFUSION,
    error_text,
    make_workflow,
    phantom,
    run_workflow,
    train_overrides,
    write_volume,
)
from scripts.networks import FactorAutoencoderKL, encoder_fingerprint

EPOCH_LENGTH = 3  # four tiny volumes, one for validation, batch size 1


def check_training_outputs(out, factors, epochs, epoch_length=EPOCH_LENGTH):
    """What a finished training leaves in output_dir."""
    last = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    best = torch.load(out / "model_autoencoder.pt", map_location="cpu", weights_only=True)
    assert {"autoencoder", "discriminator", "optimizer_g", "optimizer_d", "trainer", "autoencoder_args", "best"} <= set(last)
    assert last["trainer"]["epoch_length"] == epoch_length
    assert last["trainer"]["iteration"] == epochs * epoch_length  # the trainer's epoch: iteration / epoch_length
    assert last["trainer"]["max_epochs"] == epochs
    assert last["optimizer_g"]["state"], "the generator optimizer's state (Adam moments) must be saved"
    assert last["optimizer_d"]["param_groups"]
    assert last["autoencoder_args"]["downsample_factors"] == factors
    assert best["autoencoder_args"] == last["autoencoder_args"]
    assert last["autoencoder_args"]["norm"] == "channel"  # the config's default
    # what the weights were trained on travels with them (read back by scripts.evaluate)
    assert best["preprocessing"] == last["preprocessing"]
    assert last["preprocessing"]["spacing"] == [4.0, 4.0, 4.0] and last["preprocessing"]["modality"] == "mri"
    assert {"intensity_percentiles", "ct_window", "patch_size"} <= set(last["preprocessing"])
    assert "lr_scheduler" in last and "ema_autoencoder" not in last  # ema_decay 0: no EMA copy saved
    # the recorded validation PSNR: the best saver's state in the resumable checkpoint
    psnr = last["best"]["best"]
    assert isinstance(psnr, float) and np.isfinite(psnr) and psnr > 0
    # both hold a network that a fresh FactorAutoencoderKL of the saved arguments loads strictly
    for ckpt in (last, best):
        network = FactorAutoencoderKL(**ckpt["autoencoder_args"])
        network.load_state_dict(ckpt["autoencoder"])
        assert network.downsample_factors == FactorAutoencoderKL(**last["autoencoder_args"]).downsample_factors
    # one preview per validation, a real PNG
    previews = sorted((out / "previews").glob("*.png"))
    assert [p.name for p in previews] == [f"reconstruction_epoch{e:04d}.png" for e in range(1, epochs + 1)]
    header = previews[0].read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24])[0] > 100
    # the resolved config: every file merged and the overrides applied
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["downsample_factors"] == factors
    assert config["channels"] == [8, 16, 16] and config["output_dir"] == str(out)
    assert not list(out.glob(".*")), "temporary files left behind"
    return last


def test_training_factors_2_2(trained_autoencoder):
    """The session's autoencoder: two epochs of 30 iterations with factors [2, 2] (shared with the
    other tests)."""
    check_training_outputs(trained_autoencoder["dir"], [2, 2], epochs=2, epoch_length=30)
    assert trained_autoencoder["epoch"] == 2


def test_training_factors_4_2_through_monai_bundle_run(tmp_path, tiny_dataset, capsys):
    """``monai.bundle.run``, what ``python -m monai.bundle run training`` calls once python-fire has
    read the arguments (tests/test_distributed.py runs the command line itself, under torchrun)."""
    from monai.bundle import run

    run("training", config_file=AE_CONFIG, **train_overrides(tmp_path, tiny_dataset, downsample_factors=[4, 2]))
    log = "".join(capsys.readouterr())  # the bundle's logging.conf logs to the console
    # the startup line names the factors, the total factor and the latent shape of the patch
    assert "downsample factors (4, 2) (space_to_depth): total 8x, patch 16x16x16 -> latent 16x2x2x2" in log
    assert "val_psnr:" in log  # the validation PSNR is logged
    check_training_outputs(tmp_path / "out", [4, 2], epochs=1)
    assert not (tmp_path / "mlruns.db").exists(), "use_mlflow False must not create a tracking store"


def test_training_anisotropic_factors(tmp_path, tiny_dataset, caplog):
    factors = [[2, 2, 1], [2, 2, 2]]
    caplog.set_level("INFO")
    workflow = run_workflow(AE_CONFIG, **train_overrides(tmp_path, tiny_dataset, downsample_factors=factors, patch_size=[16, 16, 12]))
    assert "downsample factors [[2, 2, 1], [2, 2, 2]] (space_to_depth): total 4x4x2, patch 16x16x12 -> latent 16x4x4x6" in caplog.text
    last = check_training_outputs(tmp_path / "out", factors, epochs=1)
    assert last["autoencoder"]["downsample_factors"].tolist() == factors  # recorded in the state dict too
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    assert evaluator.state.metrics["val_psnr"] == pytest.approx(last["best"]["best"])
    assert 0 < evaluator.state.metrics["val_ssim"] <= 1


def test_training_recipe_options(tmp_path, tiny_dataset):
    """EMA, a cosine schedule with warm-up, the SSIM and spectral losses and a time limit in one tiny
    run: the EMA weights are the ones validated and saved as the best model, the schedule ends at 0."""
    workflow = run_workflow(
        AE_CONFIG,
        **train_overrides(
            tmp_path,
            tiny_dataset,
            ema_decay=0.5,
            lr_schedule="cosine",
            lr_warmup_steps=1,
            ssim_weight=0.1,
            spectral_weight=0.01,
            time_limit=3600,
        ),
    )
    out = tmp_path / "out"
    last = check_training_outputs_with_ema(out)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert {"ssim_loss", "spectral_loss"} <= set(trainer.state.output)
    # cosine to 0 over max_epochs * epoch_length iterations
    assert last["lr_scheduler"]["last_epoch"] == EPOCH_LENGTH
    assert workflow.parser.get_parsed_content("optimizer_g").param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert any(type(h).__name__ == "TimeLimit" and h.limit_sec == 3600 for h in workflow.parser.get_parsed_content("train#handlers"))


def test_compiled_training_matches_the_eager_run(tmp_path, tiny_dataset):
    """compile through TorchDynamo (its eager backend: no code generation) with the adversarial loss and
    gradient accumulation: the trainer runs the compiled networks, the checkpoints hold the bare
    networks' keys, and the weights are the eager run's."""
    runs = {}
    for compile in (False, "eager"):
        out = tmp_path / str(compile)
        workflow = run_workflow(
            AE_CONFIG,
            **train_overrides(out, tiny_dataset, compile=compile, gradient_accumulation_steps=2, adv_warmup_epochs=0),
        )
        trainer = workflow.parser.get_parsed_content("train#trainer")
        compiled_type = torch._dynamo.eval_frame.OptimizedModule
        assert isinstance(trainer.network, compiled_type) == isinstance(trainer.discriminator, compiled_type) == bool(compile)
        runs[compile] = torch.load(out / "out" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    for name in ("autoencoder", "discriminator"):
        assert list(runs["eager"][name]) == list(runs[False][name]), "the bare network's keys"
        torch.testing.assert_close(runs["eager"][name], runs[False][name])
    assert runs["eager"]["optimizer_d"]["state"], "the discriminator trained"


def check_training_outputs_with_ema(out):
    last = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    best = torch.load(out / "model_autoencoder.pt", map_location="cpu", weights_only=True)
    assert "ema_autoencoder" in last and "lr_scheduler" in last
    ema, raw = last["ema_autoencoder"], last["autoencoder"]
    assert list(ema) == list(raw)
    assert any(not torch.equal(ema[k], raw[k]) for k in raw if raw[k].is_floating_point()), "EMA equals the raw weights"
    # validated at the end of the only epoch, saved as the best model: the EMA weights
    assert all(torch.equal(best["autoencoder"][k], ema[k]) for k in ema)
    return last


def test_resume_with_ema_and_cosine_schedule_matches_the_uninterrupted_run(tmp_path, tiny_dataset, monkeypatch):
    """The EMA copy and the LR scheduler are part of the resume point: a 2-epoch run interrupted after
    epoch 1 (its epoch-1 checkpoint_last, kept aside) and resumed ends with the uninterrupted run's
    EMA weights and learning-rate schedule."""
    keep_each_epoch(monkeypatch)
    overrides = dict(ema_decay=0.5, lr_schedule="cosine", lr_warmup_steps=2, max_epochs=2)
    run_workflow(AE_CONFIG, **train_overrides(tmp_path / "whole", tiny_dataset, **overrides))
    whole = tmp_path / "whole" / "out"
    interrupted = whole / "epoch1_checkpoint_last.pt"
    resumed = run_workflow(
        AE_CONFIG, **train_overrides(tmp_path / "resumed", tiny_dataset, **overrides, resume_from=str(interrupted))
    )
    assert resumed.parser.get_parsed_content("train#trainer").state.iteration == 2 * EPOCH_LENGTH
    ref = torch.load(whole / "checkpoint_last.pt", weights_only=True)
    res = torch.load(tmp_path / "resumed" / "out" / "checkpoint_last.pt", weights_only=True)
    assert res["lr_scheduler"]["last_epoch"] == ref["lr_scheduler"]["last_epoch"] == 2 * EPOCH_LENGTH
    assert res["optimizer_g"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    for name in ("autoencoder", "ema_autoencoder"):
        for key, value in ref[name].items():
            torch.testing.assert_close(res[name][key], value, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}.{key}: {m}")
    first_ema = torch.load(interrupted, weights_only=True)["ema_autoencoder"]
    assert any(not torch.equal(first_ema[k], v) for k, v in ref["ema_autoencoder"].items()), "the EMA moved in epoch 2"


def keep_each_epoch(monkeypatch) -> None:
    """Every checkpoint also kept as epoch<N>_<name>: a run's checkpoint_last of each epoch."""
    from scripts import checkpoints

    original = checkpoints.AtomicCheckpointSaver.save

    def save(self, trainer=None):
        original(self, trainer)
        if trainer is not None:
            shutil.copy(self.path, self.path.with_name(f"epoch{trainer.state.epoch}_{self.path.name}"))

    monkeypatch.setattr(checkpoints.AtomicCheckpointSaver, "save", save)


def diffusion_overrides(tmp, tiny_dataset, trained_autoencoder, **overrides) -> dict:
    return train_overrides(
        tmp, tiny_dataset, downsample_factors=[2, 2], autoencoder_ckpt=str(trained_autoencoder["ckpt"]), **TINY_DIFFUSION, **overrides
    )


def test_diffusion_resume_with_ema_and_cosine_schedule_matches_the_uninterrupted_run(tmp_path, tiny_dataset, trained_autoencoder, monkeypatch):
    """The diffusion run's resume point holds the UNet, its moving average, the optimizer and the
    learning-rate schedule: resumed after epoch 1 of 2, it ends where the uninterrupted run ends, the
    cosine schedule at 0 on the last of its 16 steps (4 volumes and their mirror images, batch 1)."""
    keep_each_epoch(monkeypatch)
    overrides = dict(ema_decay=0.5, ema_warmup_steps=1, lr_schedule="cosine", lr_warmup_steps=2, max_epochs=2)
    run_workflow(DIFFUSION_CONFIGS, **diffusion_overrides(tmp_path / "whole", tiny_dataset, trained_autoencoder, **overrides))
    whole = tmp_path / "whole" / "out"
    interrupted = whole / "epoch1_checkpoint_last.pt"
    resumed = run_workflow(
        DIFFUSION_CONFIGS,
        **diffusion_overrides(tmp_path / "resumed", tiny_dataset, trained_autoencoder, **overrides, resume_from=str(interrupted)),
    )
    assert resumed.parser.get_parsed_content("train#trainer").state.iteration == 16
    ref = torch.load(whole / "checkpoint_last.pt", weights_only=True)
    res = torch.load(tmp_path / "resumed" / "out" / "checkpoint_last.pt", weights_only=True)
    assert res["lr_scheduler"]["last_epoch"] == ref["lr_scheduler"]["last_epoch"] == 16
    assert res["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert res["scale_factor"] == ref["scale_factor"]
    for name in ("diffusion", "ema_diffusion"):
        for key, value in ref[name].items():
            torch.testing.assert_close(res[name][key], value, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}.{key}: {m}")
    model = torch.load(whole / "model.pt", weights_only=True)
    assert all(torch.equal(model["diffusion"][k], v) for k, v in ref["ema_diffusion"].items()), "model.pt holds the moving average"


def test_diffusion_init_from_starts_from_model_pt(tmp_path, tiny_dataset, trained_autoencoder, trained_diffusion):
    """init_from: a new run (fresh optimizer) starts from a model.pt's UNet and keeps its latent scale factor."""
    model = torch.load(trained_diffusion["ckpt"], weights_only=True)
    overrides = diffusion_overrides(tmp_path, trained_diffusion["data"], trained_autoencoder, condition_key="class", init_from=str(trained_diffusion["ckpt"]))
    workflow = make_workflow(DIFFUSION_CONFIGS, **overrides)
    workflow.initialize()
    unet = workflow.parser.get_parsed_content("diffusion")
    assert all(torch.equal(v, model["diffusion"][k]) for k, v in unet.state_dict().items())
    assert workflow.parser.get_parsed_content("scale_factor") == model["scale_factor"]
    workflow.finalize()


def test_sample_posterior_reaches_the_trainer(tmp_path, trained_autoencoder, trained_diffusion):
    overrides = diffusion_overrides(tmp_path, trained_diffusion["data"], trained_autoencoder, condition_key="class")
    for value in (True, False):
        workflow = make_workflow(DIFFUSION_CONFIGS, **overrides, sample_posterior=value)
        workflow.initialize()
        assert workflow.parser.get_parsed_content("train#prepare_batch").sample_posterior is value
        assert workflow.parser.get_parsed_content("training_params")["sample_posterior"] is value
        workflow.finalize()


def test_init_from_starts_from_the_given_weights(tmp_path, tiny_dataset, trained_autoencoder):
    """init_from loads a model_autoencoder.pt into the new run's network before training (a fine-tune);
    one of other factors is refused with both sides named."""
    overrides = train_overrides(tmp_path, tiny_dataset, downsample_factors=[2, 2], init_from=str(trained_autoencoder["ckpt"]))
    workflow = make_workflow(AE_CONFIG, **overrides)
    workflow.initialize()
    saved = torch.load(trained_autoencoder["ckpt"], map_location="cpu", weights_only=True)["autoencoder"]
    loaded = workflow.parser.get_parsed_content("autoencoder").state_dict()
    assert all(torch.equal(loaded[k].cpu(), saved[k]) for k in saved)
    workflow = make_workflow(AE_CONFIG, **dict(overrides, downsample_factors=[4, 2]))
    with pytest.raises(Exception) as info:
        workflow.initialize()
    text = error_text(info.value)
    assert f"init_from '{trained_autoencoder['ckpt']}' was trained with downsample_factors=[2, 2]" in text


def test_freeze_encoder_trains_the_decoder_and_keeps_the_latents(tmp_path, tiny_dataset, trained_autoencoder):
    """freeze_encoder: a fine-tune of init_from changes the decoder and leaves every weight that makes
    the latents, so the encoder fingerprint a diffusion model records stays valid; without
    init_from it is refused before training."""
    overrides = train_overrides(
        tmp_path, tiny_dataset, downsample_factors=[2, 2], init_from=str(trained_autoencoder["ckpt"]), freeze_encoder=True,
        max_epochs=1, epoch_length=4, val_interval=1, learning_rate=1e-3,
    )  # fmt: skip
    run_workflow(AE_CONFIG, **overrides)
    before, after = (torch.load(p, map_location="cpu", weights_only=True) for p in (trained_autoencoder["ckpt"], tmp_path / "out" / "model_autoencoder.pt"))
    nets = []
    for ckpt in (before, after):
        nets.append(FactorAutoencoderKL(**ckpt["autoencoder_args"]))
        nets[-1].load_state_dict(ckpt["autoencoder"])
    assert encoder_fingerprint(nets[0]) == encoder_fingerprint(nets[1])
    assert any(not torch.equal(v, after["autoencoder"][k]) for k, v in before["autoencoder"].items() if k.startswith("decoder."))
    workflow = make_workflow(AE_CONFIG, **dict(overrides, init_from=None))
    with pytest.raises(Exception) as info:
        workflow.initialize()
    assert "freeze_encoder: true keeps the encoder of a trained autoencoder, but init_from is null" in error_text(info.value)


def test_diffusion_resume_refuses_another_encoder(tmp_path, trained_autoencoder, trained_diffusion):
    """Resuming a diffusion training on an autoencoder whose encoder differs from the one it began
    with is refused before training: the latents it learned are gone."""
    other = torch.load(trained_autoencoder["ckpt"], weights_only=True)
    other["autoencoder"]["quant_conv_mu.conv.bias"] += 0.01
    torch.save(other, tmp_path / "other.pt")
    resume = dict(trained_diffusion["overrides"], output_dir=str(tmp_path / "out"), autoencoder_ckpt=str(tmp_path / "other.pt"))
    resume["resume_from"] = str(trained_diffusion["dir"] / "checkpoint_last.pt")
    workflow = make_workflow(DIFFUSION_CONFIGS, **resume)
    with pytest.raises(Exception) as info:
        workflow.initialize()
    assert f"autoencoder_ckpt '{tmp_path / 'other.pt'}' has" in error_text(info.value)


# ---------------------------------------------------------------------------------------------
# resume


def test_resume_matches_the_uninterrupted_run(tmp_path, tiny_dataset, trained_autoencoder):
    """Two epochs in one go (the session's autoencoder) against one epoch plus a resumed second:
    the second epoch's losses and the final weights agree (deterministic CPU)."""
    reference = trained_autoencoder["overrides"]
    overrides = {k: v for k, v in reference.items() if k not in ("output_dir", "tracking_uri", "max_epochs")}
    first = run_workflow(AE_CONFIG, **overrides, max_epochs=1, output_dir=str(tmp_path / "first"))
    assert first.parser.get_parsed_content("train#trainer").state.epoch == 1
    resumed = run_workflow(
        AE_CONFIG,
        **overrides,
        max_epochs=2,
        output_dir=str(tmp_path / "resumed"),
        resume_from=str(tmp_path / "first" / "checkpoint_last.pt"),
    )
    trainer = resumed.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 2 and trainer.state.iteration == 2 * 30
    expected = trained_autoencoder["metrics"]
    # the epoch's loss averages, and its throughput (scripts.engines.Throughput), which no run repeats
    assert set(expected) == {"loss", "recon_loss", "kl_loss", "steps_per_second", "data_wait"}
    assert expected["steps_per_second"] > 0 and 0 <= expected["data_wait"] < 1
    for name in ("loss", "recon_loss", "kl_loss"):
        value = expected[name]
        assert trainer.state.metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name

    last_ref = torch.load(trained_autoencoder["dir"] / "checkpoint_last.pt", weights_only=True)
    last_res = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", weights_only=True)
    for network in ("autoencoder", "discriminator"):
        moved = False
        first_state = torch.load(tmp_path / "first" / "checkpoint_last.pt", weights_only=True)[network]
        for key, value in last_ref[network].items():
            torch.testing.assert_close(last_res[network][key], value, atol=1e-5, rtol=1e-5, msg=lambda m: f"{network}.{key}: {m}")
            moved |= not torch.equal(first_state[key], value)
        assert moved, f"the {network} must have trained in epoch 2 (else the comparison proves nothing)"
    assert last_res["best"]["best"] == pytest.approx(last_ref["best"]["best"], rel=1e-5)
    assert last_res["trainer"]["iteration"] == 2 * 30
    # the resumed run validated (and previewed) epoch 2 only
    assert [p.name for p in (tmp_path / "resumed" / "previews").glob("*.png")] == ["reconstruction_epoch0002.png"]


def test_resume_past_max_epochs_is_refused(tmp_path, tiny_dataset, trained_autoencoder):
    lr = trained_autoencoder["overrides"]["learning_rate"]
    workflow = make_workflow(
        AE_CONFIG,
        **train_overrides(
            tmp_path,
            tiny_dataset,
            max_epochs=1,
            learning_rate=lr,
            resume_from=str(trained_autoencoder["dir"] / "checkpoint_last.pt"),
        ),
    )
    workflow.initialize()
    with pytest.raises(Exception) as info:
        workflow.run()
    assert "checkpoint_last.pt' is at epoch 2, past max_epochs=1" in error_text(info.value)
    assert not (tmp_path / "out" / "checkpoint_last.pt").exists()


def test_resume_with_another_learning_rate_is_refused(tmp_path, tiny_dataset, trained_autoencoder):
    """A resumed run continues the checkpoint's optimizer: a new --learning_rate would be dropped while
    config.yaml and MLflow record it, so it is refused before training, naming both values."""
    ckpt = trained_autoencoder["dir"] / "checkpoint_last.pt"
    overrides = {k: v for k, v in trained_autoencoder["overrides"].items() if k not in ("output_dir", "tracking_uri")}
    text = _refused(tmp_path, **dict(overrides, learning_rate=1e-5, max_epochs=3, resume_from=str(ckpt)))
    assert f"resume_from checkpoint '{ckpt}' was trained with optimizer_g lr=0.002" in text
    assert "config has lr=1e-05 (learning_rate)" in text and "init_from" in text
    assert not (tmp_path / "out" / "config.yaml").exists(), "nothing recorded for a run that did not run"


# ---------------------------------------------------------------------------------------------
# bad inputs: refused during initialize, before any training, with the key or file named


def _refused(tmp_path, **overrides) -> str:
    workflow = make_workflow(AE_CONFIG, **train_overrides(tmp_path, **overrides))
    with pytest.raises(Exception) as info:
        workflow.initialize()
    assert not (tmp_path / "out" / "checkpoint_last.pt").exists()
    assert not (tmp_path / "out" / "previews").exists()
    return error_text(info.value)


@pytest.fixture
def dataset_copy(tmp_path, tiny_dataset):
    folder = tmp_path / "data"
    shutil.copytree(tiny_dataset, folder)
    return folder


def test_missing_dataset_dir(tmp_path):
    text = _refused(tmp_path, dataset_dir=tmp_path / "no_such_folder")
    assert f"dataset_dir '{tmp_path / 'no_such_folder'}' does not exist" in text


def test_empty_dataset_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    text = _refused(tmp_path, dataset_dir=tmp_path / "empty")
    assert f"dataset_dir '{tmp_path / 'empty'}' holds no .nii/.nii.gz volumes" in text


def test_unreadable_file_among_good_ones(tmp_path, dataset_copy):
    junk = dataset_copy / "vol_99.nii.gz"
    junk.write_bytes(b"this is not gzip" * 64)
    text = _refused(tmp_path, dataset_dir=dataset_copy)
    assert f"volume '{junk}' is not a readable NIfTI file" in text


def test_two_channel_volume_with_one_input_channel(tmp_path, dataset_copy):
    two = write_volume(dataset_copy / "vol_98.nii.gz", np.stack([phantom(), phantom(seed=3)], axis=-1))
    text = _refused(tmp_path, dataset_dir=dataset_copy)
    assert f"volume '{two}' has 2 channels" in text and "in_channels is 1" in text


def test_patch_size_not_divisible_by_the_total_factor(tmp_path, tiny_dataset):
    text = _refused(tmp_path, dataset_dir=tiny_dataset, downsample_factors=[4, 2], patch_size=[16, 16, 12])
    assert "patch_size [16, 16, 12] is not divisible by [8, 8, 8]" in text and "downsample_factors" in text


def test_patch_too_small_for_the_discriminator(tmp_path, tiny_dataset):
    # three strided discriminator layers leave a 16^3 patch 1x1x1 wide: this used to crash only when
    # the adversarial loss started, after adv_warmup_epochs
    text = _refused(tmp_path, dataset_dir=tiny_dataset, discriminator_num_layers=3, adv_warmup_epochs=4)
    assert "patch_size [16, 16, 16] is too small for the discriminator's 3 strided layers" in text
    assert "discriminator_num_layers" in text
    # without the adversarial loss the discriminator never runs, and nothing is refused
    make_workflow(AE_CONFIG, **train_overrides(tmp_path, tiny_dataset, discriminator_num_layers=3, adv_weight=0)).initialize()


def test_wrong_length_downsample_factors_are_refused_before_training(tmp_path, tiny_dataset):
    """The error names the key, its entries and the rule, and the summary a user reads last names the
    config item, not MONAI's "Failed to evaluate" (the command line prints that summary last:
    tests/test_tracking.py runs one through it)."""
    from scripts.reporting import error_summary

    with pytest.raises(Exception) as info:
        run_workflow(AE_CONFIG, **train_overrides(tmp_path, tiny_dataset, downsample_factors=[2, 2, 2]))
    first, cause = error_summary(info.value).splitlines()
    assert first == "Error (while resolving config item 'autoencoder_def'):"
    assert "ValueError: downsample_factors has 3 entries [2, 2, 2], but channels (8, 16, 16) needs 2" in cause
    assert "len(downsample_factors) == len(channels) - 1" in cause
    assert not (tmp_path / "out" / "checkpoint_last.pt").exists(), "training must not have started"


def test_a_switch_given_as_text_is_refused_before_training(tmp_path, tiny_dataset):
    """`--fast_dev_run false` arrives from the command line as the text 'false', which reads as true."""
    text = _refused(tmp_path, dataset_dir=tiny_dataset, fast_dev_run="false")
    assert "fast_dev_run must be true or false, got 'false'" in text and "--fast_dev_run False" in text
    text = _refused(tmp_path, dataset_dir=tiny_dataset, attention_levels=["false", "false", "true"])
    assert "attention_levels must be true or false at each level, got ['false', 'false', 'true']" in text


def test_resume_from_a_checkpoint_of_other_factors(tmp_path, tiny_dataset, trained_autoencoder):
    ckpt = trained_autoencoder["dir"] / "checkpoint_last.pt"
    text = _refused(tmp_path, dataset_dir=tiny_dataset, downsample_factors=[4, 2], resume_from=str(ckpt))
    assert f"resume_from checkpoint '{ckpt}' was trained with downsample_factors=[2, 2]" in text
    assert "config has downsample_factors=[4, 2]" in text


# ---------------------------------------------------------------------------------------------


def test_fast_dev_run_writes_no_checkpoint(tmp_path, tiny_dataset):
    workflow = run_workflow(
        AE_CONFIG, **train_overrides(tmp_path, tiny_dataset, fast_dev_run=True, max_epochs=5, use_mlflow=True)
    )
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 1 and trainer.state.iteration == 2  # fast_dev_run_batches of one epoch
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    assert evaluator.state.iteration >= 1, "validation must run once"
    out = tmp_path / "out"
    assert not (out / "checkpoint_last.pt").exists() and not (out / "model_autoencoder.pt").exists()
    assert not (out / "previews").exists()
    assert not (tmp_path / "mlruns.db").exists(), "fast_dev_run must not open an MLflow run"
