"""Writing files safely: every file the bundle writes (checkpoints, NIfTI, CSV, PNG, YAML, zips)
goes through here.

- :func:`atomic_path` writes beside the target and renames in one step, so a reader (or a killed run)
  never sees half a file, and a failed write leaves the previous file in place.
- :func:`claim_path` takes an output name with ``O_EXCL`` (``name``, else ``name_1``, ``name_2``, ...),
  so runs writing into one folder at once never overwrite each other's outputs, nor a user's file.
- :func:`remove_stale_temporaries` removes what a write killed mid-way left behind, recognised by the
  temporary names :func:`atomic_path` gives.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

# the random part of tempfile.mkstemp's names: 8 characters of this alphabet (tempfile._RandomNameSequence)
_RANDOM_PART = "[a-z0-9_]{8}"


def _split_suffix(name: str) -> tuple[str, str]:
    """``("brain", ".nii.gz")`` for ``brain.nii.gz``: the compound suffix writers pick the format from."""
    suffix = "".join(Path(name).suffixes[-2:]) if name.endswith(".nii.gz") else Path(name).suffix
    return name[: len(name) - len(suffix)], suffix


def _default_mode() -> int:
    """The mode a plain ``open()`` would give a new file (mkstemp's is 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """Yield a temporary path beside ``path`` (``.<stem>.<random><suffix>``, hidden, same suffix so
    writers pick the right format); when the block ends it is synced and renamed onto ``path`` in one
    step; if the block raises it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem, suffix = _split_suffix(path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{stem}.", suffix=suffix)
    os.close(fd)
    try:
        os.chmod(tmp, _default_mode())
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the bytes reach the disk before the rename makes them the file
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def claim_path(path: str | Path) -> Path:
    """Create ``path`` empty, or ``<stem>_1<suffix>``, ``<stem>_2<suffix>``, ... if it exists, with
    ``O_EXCL`` so that of two runs asking at once each gets its own name; returns the name taken.

    Write the content through :func:`atomic_path` (it replaces the empty claim in one step); a run that
    gives the name up removes it (see :func:`claimed`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem, suffix = _split_suffix(path.name)
    for i in itertools.count():
        candidate = path if i == 0 else path.with_name(f"{stem}_{i}{suffix}")
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise AssertionError("unreachable")


@contextlib.contextmanager
def claimed(path: str | Path) -> Iterator[Path]:
    """:func:`claim_path` for one write: yields the name taken, and removes the empty claim again if
    the block raises, so a failed output leaves nothing behind."""
    target = claim_path(path)
    try:
        yield target
    except BaseException:
        if target.exists() and target.stat().st_size == 0:
            target.unlink()
        raise


def stale_temporaries(path: str | Path) -> list[Path]:
    """The temporary files :func:`atomic_path` made for ``path`` that are still beside it: what a write
    killed mid-way leaves (``.checkpoint_last.k3j9_x2a.pt`` for ``checkpoint_last.pt``)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stem, suffix = _split_suffix(path.name)
    pattern = re.compile(rf"\.{re.escape(stem)}\.{_RANDOM_PART}{re.escape(suffix)}")
    return sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name) and p.is_file())


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove :func:`stale_temporaries` of ``path``. Call it where a run that alone writes ``path``
    starts (a training run's checkpoint), never where another live run may be writing it."""
    removed = stale_temporaries(path)
    for tmp in removed:
        size = tmp.stat().st_size
        tmp.unlink(missing_ok=True)
        logger.info(f"removed {tmp} ({size / 2**20:.1f} MiB), left by an interrupted write of {Path(path).name}")
    return removed
