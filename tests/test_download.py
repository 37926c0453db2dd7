"""scripts/download.py: a bundle zip is unpacked only with its published sha256, only inside its
folder, and only completely. The zips are served from a loopback http.server thread."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import stat
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from scripts import download, pack

REPO = Path(__file__).resolve().parents[1]
NAME = pack.BUNDLE_NAME


def listing(folder: Path) -> list[str]:
    """Every path under ``folder``, hidden ones included."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def write_zip(path: Path, members: dict[str, bytes], mode: int = pack.FILE_MODE) -> str:
    """A zip of ``members`` (name: bytes), every file with ``mode``; returns its sha256."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            zf.writestr(info, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict:
    """The repository packed as a release (zip and .sha256), a tampered copy of the zip, both
    served from a loopback http.server thread."""
    serve = tmp_path_factory.mktemp("release")
    zip_path = pack.pack(REPO, serve, allow_unhashed=True)
    tampered = bytearray(zip_path.read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF
    (serve / "tampered.zip").write_bytes(bytes(tampered))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(serve))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"zip": zip_path, "base": f"http://127.0.0.1:{server.server_address[1]}", "serve": serve}
    server.shutdown()
    server.server_close()
    thread.join()


def published_sha256(zip_path: Path) -> str:
    digest, name = pack.sha256_path(zip_path).read_text().split()
    assert name == zip_path.name
    return digest


def test_pack_publishes_the_sha256(release, capsys):
    zip_path = release["zip"]
    assert published_sha256(zip_path) == hashlib.sha256(zip_path.read_bytes()).hexdigest()
    assert pack.sha256_path(zip_path).read_text() == f"{published_sha256(zip_path)}  {zip_path.name}\n"  # sha256sum -c reads it
    assert pack.main(["--output_dir", str(zip_path.parent), "--bundle_root", str(REPO), "--allow_unhashed"]) == 0
    assert published_sha256(zip_path) in capsys.readouterr().out


def test_download_verifies_and_unpacks(release, tmp_path):
    """The published zip over http: unpacked complete, the bytes of the zip, nothing else left."""
    zip_path = release["zip"]
    target = download.download(f"{release['base']}/{zip_path.name}", published_sha256(zip_path), tmp_path / "bundles")
    assert target == tmp_path / "bundles" / NAME
    assert listing(tmp_path / "bundles") == [NAME] + [f"{NAME}/{n}" for n in listing(target)]  # no temporaries
    with zipfile.ZipFile(zip_path) as zf:
        files = [i.filename for i in zf.infolist() if not i.is_dir()]
        assert files and all((tmp_path / "bundles" / f).read_bytes() == zf.read(f) for f in files)
    assert (target / "configs" / "metadata.json").is_file() and (target / "large_files.yml").is_file()


def test_download_refuses_a_tampered_zip(release, tmp_path):
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    (bundles / "other.txt").write_text("a user's file")
    with pytest.raises(download.DownloadError, match="not the published one"):
        download.download(f"{release['base']}/tampered.zip", published_sha256(release["zip"]), bundles)
    assert listing(bundles) == ["other.txt"]


def test_cli_standalone_refuses_then_unpacks(release, tmp_path):
    """download.py copied alone and run without site-packages (-I -S: the standard library only),
    as the docs tell a user who has no bundle yet: exit 1 and one line on a mismatch, then the
    published zip."""
    script = tmp_path / "download.py"
    shutil.copy(REPO / "scripts" / "download.py", script)
    url, digest = f"{release['base']}/{release['zip'].name}", published_sha256(release["zip"])

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-I", "-S", str(script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )

    bad = run("--url", url, "--sha256", "0" * 64, "--bundle_dir", "bundles")
    assert bad.returncode == 1 and bad.stderr.startswith("error: sha256 of") and "expected " + "0" * 64 in bad.stderr
    assert listing(tmp_path / "bundles") == []
    good = run("--url", url, "--sha256", digest.upper(), "--bundle_dir", "bundles")
    assert good.returncode == 0, good.stderr
    assert f"download_large_files --bundle_path bundles/{NAME}" in good.stdout
    assert (tmp_path / "bundles" / NAME / "configs" / "metadata.json").is_file()


def test_download_refuses_an_existing_target(release, tmp_path):
    (tmp_path / NAME).mkdir()
    (tmp_path / NAME / "mine.txt").write_text("kept")
    with pytest.raises(download.DownloadError, match="exists"):
        download.download(str(release["zip"]), published_sha256(release["zip"]), tmp_path)  # a local path
    assert listing(tmp_path) == [NAME, f"{NAME}/mine.txt"]


@pytest.mark.parametrize(
    "members, mode, message",
    [
        ({f"{NAME}/a.txt": b"a", f"{NAME}/../evil.txt": b"x"}, pack.FILE_MODE, "outside"),
        ({f"{NAME}/a.txt": b"a", "/tmp/evil.txt": b"x"}, pack.FILE_MODE, "outside"),
        ({f"{NAME}/a.txt": b"a", f"{NAME}\\..\\evil.txt": b"x"}, pack.FILE_MODE, "outside"),
        ({f"{NAME}/link": b"/etc/passwd"}, stat.S_IFLNK | 0o777, "not a plain file"),
        ({f"{NAME}/a.txt": b"a", "other/b.txt": b"b"}, pack.FILE_MODE, "one top-level folder"),
        ({"a.txt": b"a"}, pack.FILE_MODE, "one top-level folder"),
    ],
    ids=["dotdot", "absolute", "backslash", "symlink", "two_folders", "no_folder"],
)
def test_download_refuses_unsafe_members(tmp_path, members, mode, message):
    """Zips with the right sha256 but members that escape their folder: refused, nothing written."""
    source = tmp_path / "src" / "evil.zip"
    source.parent.mkdir()
    digest = write_zip(source, members, mode)
    target = tmp_path / "out" / "deep"
    with pytest.raises(download.DownloadError, match=message):
        download.download(str(source), digest, target)
    assert listing(tmp_path / "out") == ["deep"]


def test_download_refuses_bad_arguments(release, tmp_path):
    with pytest.raises(download.DownloadError, match="64 hex digits"):
        download.download(str(release["zip"]), "abc", tmp_path)
    with pytest.raises(download.DownloadError, match="could not download"):
        download.download(f"{release['base']}/missing.zip", "0" * 64, tmp_path)
    with pytest.raises(download.DownloadError, match="not 'ftp:'"):
        download.download("ftp://127.0.0.1/x.zip", "0" * 64, tmp_path)
    not_zip = tmp_path / "not.zip"
    not_zip.write_bytes(b"plain text")
    with pytest.raises(download.DownloadError, match="not a readable zip"):
        download.download(str(not_zip), hashlib.sha256(b"plain text").hexdigest(), tmp_path / "out")
    assert listing(tmp_path / "out") == []
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
