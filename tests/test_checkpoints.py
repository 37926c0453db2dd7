"""Tests for scripts/checkpoints.py: atomic writes, weights-only reads, argument checks, loading
networks (also MONAI's own AutoencoderKL weights) and resuming."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from ignite.engine import Events
from monai.networks.nets import AutoencoderKL

from scripts.checkpoints import (
    AtomicCheckpointSaver,
    ResumeFromCheckpoint,
    atomic_path,
    check_args,
    load_checkpoint,
    load_network,
    save_atomic,
)
from scripts.networks import FactorAutoencoderKL

from conftest import TINY_AUTOENCODER

TINY = {k: v for k, v in TINY_AUTOENCODER.items() if k != "shortcut"}  # MONAI's AutoencoderKL arguments


def tiny_ae(seed=0, **kwargs):
    torch.manual_seed(seed)
    return FactorAutoencoderKL(**TINY, **kwargs)


def args_of(factors, layout="space_to_depth"):
    return dict(TINY, channels=list(TINY["channels"]), downsample_factors=factors, layout=layout)


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this on purpose")


class Arbitrary:
    """A plain Python object: weights-only loading must refuse it."""

    def __init__(self):
        self.value = 42


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def test_save_atomic_keeps_previous_file_when_writing_fails(tmp_path):
    path = tmp_path / "checkpoint_last.pt"
    good = {"weights": torch.arange(5.0), "epoch": 3}
    save_atomic(good, path)
    before = path.read_bytes()
    # a large tensor first, so the failure happens after bytes went to the temporary file
    with pytest.raises(Exception, match="cannot pickle this on purpose"):
        save_atomic({"big": torch.zeros(100_000), "bad": Unpicklable()}, path)
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_last.pt"], "a temporary file was left behind"


def test_atomic_path_failure_before_first_write_leaves_nothing(tmp_path):
    target = tmp_path / "sub" / "vol.nii.gz"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            assert tmp.endswith(".nii.gz") and os.path.dirname(tmp) == str(target.parent)
            raise KeyboardInterrupt
    assert list(target.parent.iterdir()) == []


def test_save_atomic_uses_the_default_umask_mode(tmp_path, umask_027):
    path = tmp_path / "model.pt"
    save_atomic({"x": torch.ones(1)}, path)
    assert stat.S_IMODE(path.stat().st_mode) == umask_027  # like open(), not mkstemp's 0600
    # overwriting keeps that mode too
    save_atomic({"x": torch.zeros(1)}, path)
    assert stat.S_IMODE(path.stat().st_mode) == umask_027
    assert float(torch.load(path, weights_only=True)["x"]) == 0.0


def test_load_checkpoint_is_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"autoencoder": {}, "payload": Arbitrary()}, path)
    # the file is a valid pickle that a full unpickler would happily run
    assert torch.load(path, weights_only=False)["payload"].value == 42
    with pytest.raises(ValueError) as info:
        load_checkpoint(path, "autoencoder_ckpt")
    assert "autoencoder_ckpt" in str(info.value) and str(path) in str(info.value)
    assert "weights-only" in str(info.value)


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"diffusion_ckpt '{tmp_path / 'nope.pt'}' does not exist"):
        load_checkpoint(tmp_path / "nope.pt", "diffusion_ckpt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x04 not really a checkpoint")
    with pytest.raises(ValueError, match=str(garbage)):
        load_checkpoint(garbage)
    bare_tensor = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), bare_tensor)
    with pytest.raises(ValueError, match=f"'{bare_tensor}' holds a Tensor, expected a dict"):
        load_checkpoint(bare_tensor)
    fine = tmp_path / "fine.pt"
    torch.save({"a": 1, "w": torch.ones(2)}, fine)
    assert load_checkpoint(fine)["a"] == 1


def test_check_args_names_both_sides():
    saved, configured = args_of([4, 2]), args_of([2, 2])
    check_args(saved, dict(saved), "x.pt", "autoencoder_ckpt")  # equal: fine
    check_args(None, configured, "x.pt", "autoencoder_ckpt")  # nothing saved: nothing to compare
    # tuples and lists are the same value (the config gives lists, code may give tuples)
    check_args(dict(saved, channels=(8, 16, 16)), saved, "x.pt", "autoencoder_ckpt")
    with pytest.raises(ValueError) as info:
        check_args(saved, dict(configured, latent_channels=4), "/m/x.pt", "autoencoder_ckpt")
    message = str(info.value)
    assert "autoencoder_ckpt '/m/x.pt'" in message
    assert "trained with downsample_factors=[4, 2], latent_channels=16" in message
    assert "config has downsample_factors=[2, 2], latent_channels=4" in message
    with pytest.raises(ValueError, match=r"trained with extra=None.*config has extra=1"):
        check_args(saved, dict(saved, extra=1), "x.pt", "ckpt")


def test_check_args_ignores_runtime_only_switches():
    # gradient checkpointing and flash attention change how a network runs, not its weights: a
    # model trained with them must load where they are off (inference, another GPU)
    saved = dict(args_of([2, 2]), use_checkpoint=True, use_flash_attention=True)
    check_args(saved, dict(saved, use_checkpoint=False, use_flash_attention=False), "x.pt", "autoencoder_ckpt")


def test_check_args_norm_absent_means_group():
    """Checkpoints saved before ``norm`` existed (the shipped weights) hold GroupNorm networks: their
    args lack the key, which compares as norm='group', never as a mismatch with None."""
    old = args_of([2, 2])
    assert "norm" not in old
    check_args(old, dict(old, norm="group"), "x.pt", "autoencoder_ckpt")
    check_args(dict(old, norm="group"), old, "x.pt", "autoencoder_ckpt")
    with pytest.raises(ValueError, match=r"trained with norm='group'.*config has norm='channel'"):
        check_args(old, dict(old, norm="channel"), "x.pt", "autoencoder_ckpt")
    with pytest.raises(ValueError, match=r"trained with norm='channel'.*config has norm='group'"):
        check_args(dict(old, norm="channel"), old, "x.pt", "autoencoder_ckpt")


def test_check_args_shortcut_true_means_pool():
    """Checkpoints saved before the cosine shortcut existed record shortcut=True for the pool one
    (the 4x weights of model.pt) and False or nothing for none."""
    old = dict(args_of([2, 2]), shortcut=True)
    check_args(old, dict(old, shortcut="pool"), "x.pt", "autoencoder_ckpt")
    check_args(dict(old, shortcut=False), dict(old, shortcut=None), "x.pt", "autoencoder_ckpt")
    with pytest.raises(ValueError, match=r"trained with shortcut='pool'.*config has shortcut='cosine'"):
        check_args(old, dict(old, shortcut="cosine"), "x.pt", "autoencoder_ckpt")
    with pytest.raises(ValueError, match=r"trained with shortcut=None.*config has shortcut='pool'"):
        check_args({k: v for k, v in old.items() if k != "shortcut"}, old, "x.pt", "autoencoder_ckpt")


def test_load_network_old_group_norm_checkpoint(tmp_path):
    """A checkpoint whose args and state dict do not record norm loads into norm='group' only."""
    trained = tiny_ae(downsample_factors=[2, 2], layout="space_to_depth", norm="group")
    state = trained.state_dict()
    del state["norm"]  # as saved before the norm was recorded
    path = tmp_path / "model_autoencoder.pt"
    save_atomic({"autoencoder": state, "autoencoder_args": args_of([2, 2])}, path)
    same = tiny_ae(seed=1, downsample_factors=[2, 2], layout="space_to_depth", norm="group")
    load_network(same, path, "autoencoder", dict(args_of([2, 2]), norm="group"), "autoencoder_ckpt")
    assert all(torch.equal(a, b) for a, b in zip(same.parameters(), trained.parameters()))
    channel = tiny_ae(seed=1, downsample_factors=[2, 2], layout="space_to_depth", norm="channel")
    with pytest.raises(ValueError, match=r"norm='group'.*config has norm='channel'"):
        load_network(channel, path, "autoencoder", dict(args_of([2, 2]), norm="channel"), "autoencoder_ckpt")
    # without args to compare, the network's own record check refuses it, naming both norms
    with pytest.raises(ValueError, match=r"norm 'group'.*norm 'channel'"):
        load_network(channel, path, "autoencoder", None, "autoencoder_ckpt")


def test_load_network_refuses_other_factors(tmp_path):
    trained = tiny_ae(downsample_factors=[4, 2], layout="space_to_depth")
    path = tmp_path / "model_autoencoder.pt"
    save_atomic({"autoencoder": trained.state_dict(), "autoencoder_args": args_of([4, 2])}, path)
    target = tiny_ae(seed=1, downsample_factors=[2, 2], layout="space_to_depth")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_network(target, path, "autoencoder", args_of([2, 2]), "autoencoder_ckpt")
    message = str(info.value)
    assert str(path) in message and "downsample_factors=[4, 2]" in message and "downsample_factors=[2, 2]" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items()), "weights changed on refusal"
    # the matching network loads it, and gets the checkpoint's other entries back
    same = tiny_ae(seed=1, downsample_factors=[4, 2], layout="space_to_depth")
    ckpt = load_network(same, path, "autoencoder", args_of([4, 2]), "autoencoder_ckpt")
    assert ckpt["autoencoder_args"]["downsample_factors"] == [4, 2]
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(same.reconstruct(x), trained.reconstruct(x))


def test_load_network_bare_state_dict_of_other_factors_names_file(tmp_path):
    path = tmp_path / "bare.pt"
    save_atomic(tiny_ae(downsample_factors=[4, 2], layout="space_to_depth").state_dict(), path)
    with pytest.raises(ValueError) as info:
        load_network(tiny_ae(), path, "autoencoder", args_of([2, 2], "strided"), "autoencoder_ckpt")
    message = str(info.value)
    assert str(path) in message and "(4, 2)" in message and "(2, 2)" in message


def test_load_network_accepts_monai_autoencoderkl_weights(tmp_path):
    torch.manual_seed(3)
    monai_ae = AutoencoderKL(**TINY)
    path = tmp_path / "monai_autoencoder.pt"
    torch.save(monai_ae.state_dict(), path)  # a bare state dict, as MONAI's model zoo ships them
    ours = tiny_ae(seed=7)  # default factors, strided layout: MONAI's architecture
    load_network(ours, path, "autoencoder", args_of(None, "strided"), "autoencoder_ckpt")
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.reconstruct(x), monai_ae.reconstruct(x))


def test_load_network_without_the_key(tmp_path):
    path = tmp_path / "other.pt"
    save_atomic({"diffusion": {"w": torch.ones(1)}, "scale_factor": 1.0}, path)
    with pytest.raises(ValueError, match=r"has no 'autoencoder' entry; it holds \['diffusion', 'scale_factor'\]"):
        load_network(tiny_ae(), path, "autoencoder")


def test_load_network_shape_mismatch_names_file(tmp_path):
    path = tmp_path / "wide.pt"
    wide = FactorAutoencoderKL(**dict(TINY, channels=(16, 16, 16)))
    save_atomic({"autoencoder": wide.state_dict()}, path)  # no args saved: the state dict itself must not fit
    with pytest.raises(ValueError, match=f"'{path}' does not fit the configured network"):
        load_network(tiny_ae(), path, "autoencoder")


# ---------------------------------------------------------------------------------------------
# the saver and resume handlers on a bare ignite engine


def _engine(max_epochs=2, epoch_length=3):
    from ignite.engine import Engine

    engine = Engine(lambda e, b: None)
    engine.state.max_epochs = max_epochs
    return engine, list(range(epoch_length))


def test_saver_and_resume_round_trip(tmp_path):
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    saver = AtomicCheckpointSaver(tmp_path, {"net": net, "opt": opt, "args": {"a": 1}}, "checkpoint_last.pt")
    engine, data = _engine()
    saver.attach(engine)
    engine.run(data, max_epochs=2)
    ckpt = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 6 and ckpt["trainer"]["epoch_length"] == 3 and ckpt["args"] == {"a": 1}

    other = torch.nn.Linear(2, 2)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    resume = ResumeFromCheckpoint(tmp_path / "checkpoint_last.pt", {"net": other, "opt": other_opt}, {"args": {"a": 1}})
    resume.check()
    engine2, _ = _engine()
    resume.attach(engine2)
    seen = []
    engine2.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.iteration))
    engine2.run(data, max_epochs=3)
    assert seen == [7, 8, 9]  # only the third epoch ran
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))

    # a resume point past max_epochs, other args or missing entries are refused with the file named
    engine3, _ = _engine()
    resume.attach(engine3)
    with pytest.raises(ValueError, match="at epoch 2, past max_epochs=1"):
        engine3.run(data, max_epochs=1)
    with pytest.raises(ValueError, match=r"trained with a=1.*config has a=2"):
        ResumeFromCheckpoint(tmp_path / "checkpoint_last.pt", {}, {"args": {"a": 2}}).check()
    with pytest.raises(ValueError, match=r"lacks \['d_opt'\]"):
        ResumeFromCheckpoint(tmp_path / "checkpoint_last.pt", {"d_opt": other_opt}).check()
    ResumeFromCheckpoint(None, {"net": other}).check()  # no resume: nothing to check


def test_none_entries_are_skipped_on_save_and_on_resume(tmp_path):
    """Optional objects (the EMA copy when ema_decay is 0) are None: not saved, not required, not loaded."""
    net = torch.nn.Linear(2, 2)
    saver = AtomicCheckpointSaver(tmp_path, {"net": net, "ema_autoencoder": None}, "checkpoint_last.pt")
    engine, data = _engine()
    saver.attach(engine)
    engine.run(data, max_epochs=1)
    ckpt = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    assert "ema_autoencoder" not in ckpt and "net" in ckpt

    other = torch.nn.Linear(2, 2)
    resume = ResumeFromCheckpoint(tmp_path / "checkpoint_last.pt", {"net": other, "ema_autoencoder": None})
    resume.check()  # the absent entry is not required
    engine2, _ = _engine()
    resume.attach(engine2)
    engine2.run(data, max_epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    # a wanted entry that is missing is still refused
    with pytest.raises(ValueError, match=r"lacks \['ema_autoencoder'\]"):
        ResumeFromCheckpoint(tmp_path / "checkpoint_last.pt", {"ema_autoencoder": torch.nn.Linear(2, 2)}).check()


def test_best_saver_writes_only_on_improvement(tmp_path):
    net = torch.nn.Linear(1, 1)
    saver = AtomicCheckpointSaver(tmp_path, {"net": net}, "best.pt", key_metric_name="val_psnr")
    engine, data = _engine(epoch_length=1)
    values = iter([10.0, 8.0, 12.0])
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_psnr=next(values)))
    saved = []
    original = saver.save
    saver.save = lambda trainer=None: (saved.append(engine.state.epoch), original(trainer))
    saver.attach(engine)
    engine.run(data, max_epochs=3)
    assert saved == [1, 3] and saver.state_dict() == {"best": 12.0, "best_epoch": 3}
    assert "trainer" not in torch.load(tmp_path / "best.pt", weights_only=True)


def test_disabled_saver_writes_nothing(tmp_path):
    saver = AtomicCheckpointSaver(tmp_path, {"net": torch.nn.Linear(1, 1)}, "x.pt", enabled=False)
    engine, data = _engine()
    saver.attach(engine)
    engine.run(data, max_epochs=1)
    assert list(tmp_path.iterdir()) == []


def test_resume_refuses_other_optimizer_settings(tmp_path):
    """The learning rate is compared at the schedule's base (a warm-up in progress is no difference);
    other hyperparameters are compared as they are; implementation switches (fused, foreach) are not."""
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))  # lr now 1e-4
    path = tmp_path / "checkpoint_last.pt"
    save_atomic({"net": net.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict(), "trainer": {}}, path)

    def resume(**kwargs):
        other = torch.optim.Adam(torch.nn.Linear(2, 2).parameters(), **kwargs)
        torch.optim.lr_scheduler.LambdaLR(other, lambda step: min(1.0, (step + 1) / 10))
        ResumeFromCheckpoint(path, {"opt": other}).check()

    resume(lr=1e-3, foreach=True)  # the same settings, another implementation
    with pytest.raises(ValueError, match=r"trained with opt lr=0\.001, but the config has lr=0\.002 \(learning_rate\)"):
        resume(lr=2e-3)
    with pytest.raises(ValueError, match=r"trained with opt weight_decay=0, but the config has weight_decay=0\.1\."):
        resume(lr=1e-3, weight_decay=0.1)
