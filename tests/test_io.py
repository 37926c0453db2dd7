"""Tests for scripts/io.py: atomic writes, output names claimed with O_EXCL, stale temporaries."""

from __future__ import annotations

import os
import stat
import threading

import pytest
import torch
from ignite.engine import Engine

from scripts.checkpoints import AtomicCheckpointSaver
from scripts.io import atomic_path, claim_path, claimed, remove_stale_temporaries, stale_temporaries, write_atomic


def test_atomic_path_keeps_the_suffix_and_replaces_in_one_step(tmp_path):
    target = tmp_path / "out" / "brain_recon.nii.gz"
    with atomic_path(target) as tmp:
        name = os.path.basename(tmp)
        assert name.startswith(".brain_recon.") and name.endswith(".nii.gz") and os.path.dirname(tmp) == str(target.parent)
        assert not target.exists()  # nothing at the target until the block ends
        with open(tmp, "wb") as f:
            f.write(b"data")
    assert target.read_bytes() == b"data"
    assert [p.name for p in target.parent.iterdir()] == ["brain_recon.nii.gz"]


def test_atomic_path_failure_keeps_the_previous_file(tmp_path):
    target = write_atomic(tmp_path / "results.csv", "old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half of the new")
            raise KeyboardInterrupt
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"], "a temporary file was left behind"


def test_write_atomic_uses_the_default_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        path = write_atomic(tmp_path / "config.yaml", "a: 1\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # like open(), not mkstemp's 0600


def test_claim_path_never_takes_an_existing_name(tmp_path):
    (tmp_path / "brain_recon.nii.gz").write_bytes(b"a user's file")
    first = claim_path(tmp_path / "brain_recon.nii.gz")
    second = claim_path(tmp_path / "brain_recon.nii.gz")
    assert (first.name, second.name) == ("brain_recon_1.nii.gz", "brain_recon_2.nii.gz")
    assert (tmp_path / "brain_recon.nii.gz").read_bytes() == b"a user's file"
    assert claim_path(tmp_path / "metrics.csv").name == "metrics.csv"
    assert claim_path(tmp_path / "metrics.csv").name == "metrics_1.csv"


def test_claim_path_under_contention_gives_every_caller_its_own_name(tmp_path):
    """Eight threads claiming the same name 25 times each, released together: 200 distinct files."""
    barrier = threading.Barrier(8)
    taken: list = []

    def claim_many():
        barrier.wait()
        for _ in range(25):
            taken.append(claim_path(tmp_path / "vol_recon.nii.gz"))

    threads = [threading.Thread(target=claim_many) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(taken) == 200 and len(set(taken)) == 200
    assert len(list(tmp_path.iterdir())) == 200


def test_claimed_removes_its_claim_when_the_write_fails(tmp_path):
    with pytest.raises(RuntimeError, match="inversion failed"):
        with claimed(tmp_path / "vol_recon.nii.gz") as target:
            assert target.exists()
            raise RuntimeError("inversion failed")
    assert list(tmp_path.iterdir()) == []
    with claimed(tmp_path / "vol_recon.nii.gz") as target:
        write_atomic(target, b"volume")
    assert target.read_bytes() == b"volume"


def test_stale_temporaries_are_only_atomic_paths_own(tmp_path):
    target = tmp_path / "checkpoint_last.pt"
    stale = tmp_path / ".checkpoint_last.k3j9_x2a.pt"  # mkstemp's 8 random characters
    stale.write_bytes(b"\0" * 1000)
    others = [
        tmp_path / ".checkpoint_last.pt",  # not a temporary of ours
        tmp_path / ".checkpoint_best.k3j9_x2a.pt",  # another file's temporary
        tmp_path / ".checkpoint_last.notrandom.pt",
        tmp_path / "checkpoint_last.k3j9_x2a.pt",
        tmp_path / "notes.txt",
    ]
    for p in others:
        p.write_text("keep")
    assert stale_temporaries(target) == [stale]
    assert remove_stale_temporaries(target) == [stale]
    assert not stale.exists() and all(p.exists() for p in others)
    # the names atomic_path really gives are recognised
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        assert stale_temporaries(target) == [tmp_path / os.path.basename(tmp)]
        raise KeyboardInterrupt


def test_checkpoint_saver_removes_a_killed_writes_temporary_at_start(tmp_path):
    """A checkpoint write killed mid-way leaves ``.checkpoint_last.<random>.pt``; the next run's saver
    removes it when the run starts, and writes its checkpoint."""
    stale = tmp_path / ".checkpoint_last.ab12cd34.pt"
    stale.write_bytes(b"\0" * 4096)  # half a checkpoint
    unrelated = tmp_path / ".model_autoencoder.ab12cd34.pt"
    unrelated.write_bytes(b"\0")
    trainer = Engine(lambda engine, batch: None)
    AtomicCheckpointSaver(tmp_path, {"weights": torch.nn.Linear(2, 2)}, "checkpoint_last.pt").attach(trainer)
    trainer.run([0, 1], max_epochs=1)
    assert not stale.exists() and unrelated.exists()
    assert (tmp_path / "checkpoint_last.pt").is_file()
