"""Pack the bundle into a model-zoo style zip, and keep ``large_files.yml`` in step with ``models/``.

    python -m scripts.pack --output_dir dist
        writes dist/ldm3d_downsample_factors_v<version>.zip (version from configs/metadata.json) and,
        beside it, its sha256 in ``sha256sum`` format (<zip>.sha256): publish both with the release,
        since ``python -m scripts.download`` unpacks only a zip with the published sha256
    python -m scripts.pack --output_dir dist --weights_url http://mirror/weights
        the same, with each url of the packed large_files.yml set to BASE/<filename>
    python -m scripts.pack --update_hashes
        recompute each hash_val of large_files.yml from the files in models/, then stop

The zip holds one top-level folder named after the bundle with what a user of the bundle needs:
configs/, scripts/, docs/, models/ (without the weights, which ``download_large_files`` fetches),
LICENSE, README.md, large_files.yml and requirements.txt. It never holds tests/ (the model zoo ships
none; they need pytest and files outside the bundle), runs/, eval/, data/, caches, hidden files or
compiled Python. In a git work tree only files git tracks, or would add (not ignored), are packed.
The same files give the same bytes: sorted entries, fixed timestamps and permissions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from scripts.io import atomic_path, write_atomic

logger = logging.getLogger(__name__)

BUNDLE_NAME = "ldm3d_downsample_factors"
RELEASE_URL = "https://github.com/ldm3d-downsample-factors/ldm3d_downsample_factors/releases/download"
LARGE_FILES = "large_files.yml"
METADATA = "configs/metadata.json"
TOP_FILES = ("LICENSE", "README.md", LARGE_FILES, "requirements.txt")
TOP_DIRS = ("configs", "scripts", "docs", "models")
WEIGHT_SUFFIXES = (".pt", ".pth", ".ts", ".onnx", ".ckpt", ".safetensors", ".bin", ".plan", ".engine")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip can hold
FILE_MODE = 0o100644
DIR_MODE = 0o040755


def default_bundle_root() -> Path:
    """The bundle this module belongs to (the folder holding ``scripts/``)."""
    return Path(__file__).resolve().parents[1]


def bundle_version(bundle_root: str | Path) -> str:
    """The ``version`` of the bundle's ``configs/metadata.json``."""
    path = Path(bundle_root) / METADATA
    version = json.loads(path.read_text()).get("version")
    if not isinstance(version, str) or not version:
        raise ValueError(f"'{path}' has no 'version' string.")
    return version


def canonical_url(version: str, filename: str) -> str:
    """Where the release of ``version`` publishes ``filename``."""
    return f"{RELEASE_URL}/v{version}/{filename}"


def read_large_files(bundle_root: str | Path) -> list[dict[str, Any]]:
    """The entries of ``large_files.yml``, each with ``path``, ``url``, ``hash_val`` and ``hash_type``."""
    path = Path(bundle_root) / LARGE_FILES
    entries = (yaml.safe_load(path.read_text()) or {}).get("large_files")
    if not isinstance(entries, list):
        raise ValueError(f"'{path}' has no 'large_files' list.")
    for i, entry in enumerate(entries):
        missing = [k for k in ("path", "url", "hash_val", "hash_type") if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ValueError(f"'{path}': large_files[{i}] lacks {missing}: {entry!r}.")
    return entries


def file_hash(path: str | Path, hash_type: str = "sha256") -> str:
    """The hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.new(hash_type or "sha256")
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _rewrite_large_files(text: str, changes: dict[str, dict[str, str]]) -> str:
    """``text`` (a large_files.yml) with ``changes[path][key]`` set in the entry of each path,
    line by line so comments and layout stay as they are."""
    out, current = [], None
    for line in text.splitlines(keepends=True):
        m = re.match(r"^(\s*-\s*path:\s*)(.+?)\s*$", line)
        if m:
            current = yaml.safe_load(m.group(2))
        m = re.match(r"^(\s*(?:-\s*)?)(url|hash_val|hash_type)(:\s*)(.*?)(\r?\n)?$", line)
        if m and current in changes and m.group(2) in changes[current]:
            value = json.dumps(changes[current][m.group(2)])
            line = f"{m.group(1)}{m.group(2)}{m.group(3)}{value}{m.group(5) or ''}"
        out.append(line)
    new = "".join(out)
    parsed = {e["path"]: e for e in (yaml.safe_load(new) or {}).get("large_files", [])}
    for path, values in changes.items():
        for key, value in values.items():
            if parsed.get(path, {}).get(key) != value:
                raise ValueError(f"could not set {key} of '{path}' in {LARGE_FILES}; keep one 'key: value' per line.")
    return new


def update_hashes(bundle_root: str | Path) -> dict[str, str | None]:
    """Set each ``hash_val`` of ``large_files.yml`` to the digest of the file at its path.

    Entries whose file is absent keep their value. Returns ``{path: new hash or None if absent}``.
    """
    root = Path(bundle_root)
    changes: dict[str, dict[str, str]] = {}
    result: dict[str, str | None] = {}
    for entry in read_large_files(root):
        target = root / entry["path"]
        if target.is_file():
            hash_type = entry["hash_type"] or "sha256"
            result[entry["path"]] = file_hash(target, hash_type)
            changes[entry["path"]] = {"hash_val": result[entry["path"]], "hash_type": hash_type}
        else:
            result[entry["path"]] = None
    path = root / LARGE_FILES
    text = path.read_text()
    new = _rewrite_large_files(text, changes)
    if new != text:
        write_atomic(path, new)
    return result


def _git_files(root: Path) -> tuple[list[str], set[str]] | None:
    """Files git tracks or would add (not ignored) under ``root``, and the tracked ones; None
    outside a work tree."""

    def git(*args: str) -> bytes:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, check=True).stdout

    try:
        if Path(git("rev-parse", "--show-toplevel").decode().strip()).resolve() != root.resolve():
            return None
        addable = git("ls-files", "-z", "--cached", "--others", "--exclude-standard").decode().split("\0")
        tracked = git("ls-files", "-z").decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        return None
    return sorted({n for n in addable if n}), {n for n in tracked if n}


def _walk_files(root: Path) -> list[str]:
    """Every file under the bundle's own folders, for a copy that is not a git work tree."""
    names = [name for name in TOP_FILES if (root / name).is_file()]
    for folder in TOP_DIRS:
        names += [p.relative_to(root).as_posix() for p in (root / folder).rglob("*") if p.is_file()]
    return sorted(names)


def _excluded(name: str, weights: set[str]) -> bool:
    parts = name.split("/")
    if len(parts) == 1:
        return name not in TOP_FILES
    if parts[0] not in TOP_DIRS:
        return True
    if any(p.startswith(".") or p == "__pycache__" for p in parts) or name.endswith((".pyc", ".pyo")):
        return True
    return name in weights or (parts[0] == "models" and name.endswith(WEIGHT_SUFFIXES))


def bundle_files(bundle_root: str | Path) -> list[str]:
    """The bundle-relative paths (POSIX, sorted) that a zip of ``bundle_root`` holds."""
    root = Path(bundle_root)
    weights = {Path(e["path"]).as_posix() for e in read_large_files(root)}
    git = _git_files(root)
    names = _walk_files(root) if git is None else git[0]
    files = [n for n in names if not _excluded(n, weights) and (root / n).is_file() and not (root / n).is_symlink()]
    untracked = [n for n in files if git is not None and n not in git[1]]
    if untracked:
        logger.warning(f"packing files that git does not track yet (commit them before a release): {untracked}")
    return files


def check_hashes(bundle_root: str | Path, allow_unhashed: bool = False) -> None:
    """Refuse to pack a ``large_files.yml`` that would not protect its downloads: an empty
    ``hash_val`` (unless ``allow_unhashed``), or one that differs from the file in ``models/``."""
    root = Path(bundle_root)
    for entry in read_large_files(root):
        target = root / entry["path"]
        if not entry["hash_val"]:
            if allow_unhashed:
                logger.warning(f"{entry['path']} has no hash_val: download_large_files will not verify it.")
                continue
            raise ValueError(
                f"{LARGE_FILES}: '{entry['path']}' has no hash_val, so a download of it would not be verified. Put the "
                f"weights in place and run `python -m scripts.pack --update_hashes`, or pass --allow_unhashed for a "
                f"development zip."
            )
        if target.is_file() and file_hash(target, entry["hash_type"]) != entry["hash_val"]:
            raise ValueError(
                f"{LARGE_FILES}: hash_val of '{entry['path']}' does not match the file in {root}; run "
                f"`python -m scripts.pack --update_hashes` after replacing weights."
            )


def _zip_info(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.create_system = 3  # unix, so the permission bits below are read
    info.external_attr = mode << 16
    if name.endswith("/"):
        info.external_attr |= 0x10  # MS-DOS directory flag
    else:
        info.compress_type = zipfile.ZIP_DEFLATED
    return info


def pack(
    bundle_root: str | Path,
    output_dir: str | Path,
    weights_url: str | None = None,
    allow_unhashed: bool = False,
    name: str = BUNDLE_NAME,
) -> Path:
    """Write ``<output_dir>/<name>_v<version>.zip`` and its ``.sha256`` beside it; return the zip's path.

    With ``weights_url``, each url of the packed ``large_files.yml`` becomes ``weights_url/<filename>``.
    """
    root = Path(bundle_root)
    version = bundle_version(root)
    check_hashes(root, allow_unhashed)
    files = bundle_files(root)
    for required in (METADATA, LARGE_FILES, "LICENSE"):
        if required not in files:
            raise FileNotFoundError(f"'{root / required}' is missing (or ignored by git); a bundle zip needs it.")
    contents = {n: (root / n).read_bytes() for n in files}
    if weights_url is not None:
        base = weights_url.rstrip("/")
        urls = {e["path"]: {"url": f"{base}/{Path(e['path']).name}"} for e in read_large_files(root)}
        contents[LARGE_FILES] = _rewrite_large_files(contents[LARGE_FILES].decode(), urls).encode()

    dirs = {f"{name}/"} | {f"{name}/{'/'.join(n.split('/')[:i])}/" for n in files for i in range(1, n.count("/") + 1)}
    entries = sorted([(d, None) for d in dirs] + [(f"{name}/{n}", contents[n]) for n in files])
    target = Path(output_dir) / f"{name}_v{version}.zip"
    sha_file = sha256_path(target)
    sha_file.unlink(missing_ok=True)  # never a stale hash beside a new zip
    with atomic_path(target) as tmp:
        with zipfile.ZipFile(tmp, "w") as zf:
            for arcname, data in entries:
                if data is None:
                    zf.writestr(_zip_info(arcname, DIR_MODE), b"")
                else:
                    zf.writestr(_zip_info(arcname, FILE_MODE), data, compresslevel=9)
        digest = file_hash(tmp)
    write_atomic(sha_file, f"{digest}  {target.name}\n")
    return target


def sha256_path(zip_path: str | Path) -> Path:
    """Where the sha256 of a packed zip is published: ``<zip>.sha256``, in ``sha256sum`` format."""
    return Path(f"{zip_path}.sha256")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: pack, or with ``--update_hashes`` refresh large_files.yml."""
    parser = argparse.ArgumentParser(prog="python -m scripts.pack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="dist", help="folder for the zip (default: dist)")
    parser.add_argument("--bundle_root", default=str(default_bundle_root()), help="the bundle to pack (default: this one)")
    parser.add_argument("--weights_url", default=None, help="set each packed large_files.yml url to BASE/<filename>")
    parser.add_argument("--allow_unhashed", action="store_true", help="pack even if a hash_val is empty (development zips)")
    parser.add_argument("--name", default=BUNDLE_NAME, help=f"bundle name: top folder and zip name (default: {BUNDLE_NAME})")
    parser.add_argument("--update_hashes", action="store_true", help="recompute hash_val from models/ and stop")
    parser.add_argument("--dry_run", action="store_true", help="list the files the zip would hold and stop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        if args.update_hashes:
            for path, digest in update_hashes(args.bundle_root).items():
                print(f"{path}: {digest}" if digest else f"{path}: absent, hash_val left as it was")
            return 0
        if args.dry_run:
            print("\n".join(f"{args.name}/{n}" for n in bundle_files(args.bundle_root)))
            return 0
        target = pack(args.bundle_root, args.output_dir, args.weights_url, args.allow_unhashed, args.name)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{target}  sha256 {file_hash(target)}  (also in {sha256_path(target)}; publish it with the zip)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
