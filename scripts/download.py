"""Download a packed bundle zip, check its sha256, and unpack it: nothing is unpacked unless the
bytes are the published ones.

    python download.py --url URL_OR_PATH_OF_ZIP --sha256 HEX --bundle_dir DIR
    python -m scripts.download ...   (the same, from inside a bundle)

``monai.bundle download --url`` verifies nothing, yet the zip carries ``large_files.yml`` (the
weights' urls and hashes that ``download_large_files`` trusts) and configs whose ``$`` expressions
run. This module uses the standard library only, so that it can be fetched and run on its own
before the bundle (or MONAI) is installed. It

- streams the zip into a hidden temporary file in ``DIR`` while hashing it, and refuses a sha256
  other than ``--sha256`` (the value published with the release: ``<zip>.sha256``, which
  ``scripts.pack`` writes beside the zip);
- refuses a zip that is not one top-level folder of plain files and folders, any member that would
  land outside it (absolute paths, ``..``, links), or an unpacked size above 1 GiB (a bundle zip
  holds no weights);
- refuses a target ``DIR/<top folder>`` that exists, unpacks into a hidden temporary folder in
  ``DIR`` and renames it into place, so the target is either complete or absent.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import stat
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

CHUNK = 1 << 20
MAX_UNPACKED_BYTES = 1 << 30
TIMEOUT_S = 60


class DownloadError(Exception):
    """A bundle zip that was not unpacked: wrong hash, unsafe member, existing target, bad source."""


def _source(url: str):
    """A readable binary stream of ``url``: http(s)/file URLs through urllib, anything else a local path."""
    scheme = urllib.parse.urlparse(url).scheme
    if scheme in ("http", "https", "file"):
        try:
            return urllib.request.urlopen(url, timeout=TIMEOUT_S)
        except (OSError, ValueError) as e:
            raise DownloadError(f"could not download '{url}': {e}") from e
    if scheme and len(scheme) > 1:  # one letter is a Windows drive
        raise DownloadError(f"'{url}': expected an http(s):// or file:// URL or a local path, not '{scheme}:'.")
    try:
        return open(url, "rb")
    except OSError as e:
        raise DownloadError(f"could not read '{url}': {e}") from e


def fetch(url: str, target: Path, sha256: str) -> None:
    """Copy ``url`` to ``target`` and refuse (deleting ``target``) if its sha256 is not ``sha256``."""
    digest = hashlib.sha256()
    with _source(url) as source, open(target, "wb") as out:
        for chunk in iter(lambda: source.read(CHUNK), b""):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != sha256:
        raise DownloadError(
            f"sha256 of '{url}' is {digest.hexdigest()}, expected {sha256}: the zip is not the published one "
            f"(tampered, truncated or another version). Nothing was unpacked."
        )


def top_folder(zf: zipfile.ZipFile) -> str:
    """The zip's one top-level folder, after checking that every member is a plain file or folder
    inside it and that the whole unpacks to at most ``MAX_UNPACKED_BYTES``."""
    tops, total = set(), 0
    for info in zf.infolist():
        name = info.filename
        parts = name.removesuffix("/").split("/")
        mode = info.external_attr >> 16
        if "\\" in name or re.match(r"^[A-Za-z]:", name) or any(p in ("", ".", "..") for p in parts):
            raise DownloadError(f"zip member '{name}' would be unpacked outside the bundle folder.")
        if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise DownloadError(f"zip member '{name}' is not a plain file or folder (mode {oct(mode)}).")
        tops.add(parts[0])
        total += info.file_size
    if len(tops) != 1 or not any(i.filename.startswith(f"{next(iter(tops))}/") for i in zf.infolist()):
        raise DownloadError(f"a bundle zip holds one top-level folder; this one holds {sorted(tops)}.")
    if total > MAX_UNPACKED_BYTES:
        raise DownloadError(f"the zip unpacks to {total} bytes, more than {MAX_UNPACKED_BYTES}; a bundle zip holds no weights.")
    return tops.pop()


def download(url: str, sha256: str, bundle_dir: str | Path = ".") -> Path:
    """Fetch ``url`` (an http(s)/file URL or a local path), check its ``sha256`` and unpack its one
    top-level folder into ``bundle_dir``. Returns the bundle's path; raises ``DownloadError`` and
    leaves ``bundle_dir`` as it was on any failure."""
    sha256 = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise DownloadError(f"--sha256 '{sha256}': expected the 64 hex digits published with the release (<zip>.sha256).")
    parent = Path(bundle_dir)
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=parent, prefix=".download."))
    try:
        archive = work / "bundle.zip"
        fetch(url, archive, sha256)
        try:
            with zipfile.ZipFile(archive) as zf:
                name = top_folder(zf)
                target = parent / name
                if target.exists():
                    raise DownloadError(f"'{target}' exists; remove it or give another --bundle_dir.")
                zf.extractall(work / "unpacked")
        except zipfile.BadZipFile as e:
            raise DownloadError(f"'{url}' is not a readable zip: {e}") from e
        if target.exists():  # appeared while unpacking
            raise DownloadError(f"'{target}' exists; remove it or give another --bundle_dir.")
        try:
            os.rename(work / "unpacked" / name, target)  # replaces at most an empty folder made meanwhile
        except OSError as e:
            raise DownloadError(f"could not move the unpacked bundle to '{target}': {e}") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; exit status 1 with one line naming the problem when nothing was unpacked."""
    parser = argparse.ArgumentParser(prog="python -m scripts.download", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the zip: an http(s):// or file:// URL, or a local path")
    parser.add_argument("--sha256", required=True, help="its sha256 as published with the release (<zip>.sha256)")
    parser.add_argument("--bundle_dir", default=".", help="the folder to unpack into (default: the current folder)")
    args = parser.parse_args(argv)
    try:
        target = download(args.url, args.sha256, args.bundle_dir)
    except (DownloadError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{target}: sha256 verified, unpacked. Next: python -m monai.bundle download_large_files --bundle_path {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
