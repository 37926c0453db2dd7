"""The bundle as MONAI's tools see it: metadata, verifiers, exports, workflow properties, the zip
from scripts/pack.py and the download round trip.

MONAI's tools run through the Python functions that their command line calls (``monai.bundle``'s
``ckpt_export``, ``verify_net_in_out``, ``download_large_files``: the command line adds only
python-fire's argument parsing); the download round trip runs the standard-library ``download.py``
and the downloaded bundle's reconstruction as subprocesses, with the downloaded code. Every network is tiny
(8/16-channel autoencoder, a 32-channel two-level UNet) and every checkpoint is made here, in a
temporary copy of the bundle: no test writes into the repository. The round trip serves the packed
zip and the weights from ``python -m http.server`` on 127.0.0.1 only.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monai.apps.utils import HashCheckError
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, download_large_files, verify_metadata, verify_net_in_out
from monai.bundle.scripts import _get_fake_spatial_shape

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scripts import pack  # noqa: E402
from scripts.checkpoints import load_network  # noqa: E402
from scripts.diffusion import ClassConditionedDiffusionModelUNet  # noqa: E402

NAME = pack.BUNDLE_NAME
META = REPO / "configs" / "metadata.json"
WEIGHTS = (
    "models/model_autoencoder.pt",
    "models/model.pt",
    "models/model_autoencoder_8x.pt",
    "models/model_autoencoder_16x.pt",
    "models/model_8x.pt",
    "models/model_16x.pt",
    "models/model_features.pt",
)
TINY_AE = {"channels": [8, 16, 16], "norm_num_groups": 8, "latent_channels": 16}
TINY_DIFFUSION = {"diffusion_channels": [32, 32], "diffusion_attention_levels": [False, False], "diffusion_num_res_blocks": 1}
TINY_LATENT = [4, 4, 4]  # the latent of a 16^3 patch at the default total factor 4


# ---------------------------------------------------------------------------------------------
# helpers


def run_cli(args: list[str], cwd: Path, pythonpath: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python <args>`` with only ``pythonpath`` on PYTHONPATH; stdout and stderr merged."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    env["PYTHONWARNINGS"] = "ignore"
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )


def check_ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"{' '.join(map(str, result.args))} failed:\n{result.stdout[-4000:]}"
    return result.stdout


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parser_for(config: Path, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(config))
    for key, value in overrides.items():
        parser[key] = value
    return parser


def make_checkpoints(bundle: Path) -> None:
    """Tiny weights at the paths of large_files.yml, in the format the configs load: the
    autoencoders as autoencoder training writes them, model.pt as diffusion training writes it (on
    the latents of the 4x autoencoder)."""
    torch.manual_seed(0)
    models = bundle / "models"
    models.mkdir(exist_ok=True)
    for name, factors in (("model_autoencoder.pt", [2, 2]), ("model_autoencoder_8x.pt", [4, 2]), ("model_autoencoder_16x.pt", [4, 4])):
        train = parser_for(bundle / "configs" / "train_autoencoder.yaml", **TINY_AE, downsample_factors=factors)
        network = train.get_parsed_content("autoencoder_def")
        torch.save({"autoencoder": network.state_dict(), "autoencoder_args": train.get_parsed_content("autoencoder_args")}, models / name)
    diffusion_args = dict(
        spatial_dims=3, in_channels=TINY_AE["latent_channels"], out_channels=TINY_AE["latent_channels"], channels=[32, 32],
        attention_levels=[False, False], num_res_blocks=1, num_head_channels=32, norm_num_groups=32, num_class_embeds=None,
        use_flash_attention=True,
    )
    unet = ClassConditionedDiffusionModelUNet(**diffusion_args)
    torch.save(
        {
            "diffusion": unet.state_dict(),
            "diffusion_args": diffusion_args,
            "autoencoder_args": torch.load(models / "model_autoencoder.pt", weights_only=True)["autoencoder_args"],
            "scale_factor": 1.0,
            "noise_schedule": {
                "num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0195,
                "prediction_type": "v_prediction",
            },
            "classes": [],
            "spacing": [2.0, 2.0, 2.0],
            "image_size": [4 * s for s in TINY_LATENT],
            "latent_shape": TINY_LATENT,
        },
        models / "model.pt",
    )


def copy_bundle(source: Path, target: Path) -> Path:
    """The files ``scripts.pack`` would pack, plus the weights, copied to ``target``."""
    names = pack.bundle_files(source) + [w for w in WEIGHTS if (source / w).is_file()]
    for name in names:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, target / name)
    return target


def write_volume(path: Path, shape=(22, 26, 18), seed: int = 0) -> np.ndarray:
    """A small volume with a bright blob on a dark background and an LPS affine (flipped axes and
    an offset origin), so reorientation, cropping and padding all have something to undo."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    array = (np.exp(-4 * (grid**2).sum(0)) * 800 + rng.normal(scale=5, size=shape)).astype(np.float32)
    array[:2] = 0
    affine = np.array([[-2.0, 0, 0, 30.5], [0, -2.0, 0, 12.0], [0, 0, 2.0, -7.25], [0, 0, 0, 1]])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return affine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A copy of the bundle with tiny weights whose sha256 sums are in its large_files.yml."""
    root = copy_bundle(REPO, tmp_path_factory.mktemp("bundle") / NAME)
    make_checkpoints(root)
    digests = pack.update_hashes(root)
    assert all(digests[w] == sha256(root / w) for w in WEIGHTS)
    return root


@pytest.fixture(scope="module")
def served(bundle, tmp_path_factory, request) -> dict:
    """The bundle packed with ``--weights_url`` pointing at a loopback http.server that serves the
    zip, the weights and a tampered copy of the autoencoder's weights."""
    serve = tmp_path_factory.mktemp("serve")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert pack.main(["--bundle_root", str(bundle), "--output_dir", str(serve), "--weights_url", base]) == 0
    out = printed.getvalue()
    zip_path = serve / f"{NAME}_v{pack.bundle_version(bundle)}.zip"
    assert zip_path.is_file() and sha256(zip_path) in out
    for weight in WEIGHTS:
        shutil.copy2(bundle / weight, serve / Path(weight).name)
    (serve / "tampered.pt").write_bytes((bundle / WEIGHTS[0]).read_bytes() + b"\0")
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(serve), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def stop() -> None:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    request.addfinalizer(stop)
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"{base}/{zip_path.name}", timeout=2) as response:
                assert response.status == 200
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"http.server on port {port} did not answer (exit code {server.poll()}).")
            time.sleep(0.2)
    return {"base": base, "zip": zip_path, "serve": serve}


# ---------------------------------------------------------------------------------------------
# metadata


def load_meta() -> dict:
    return json.loads(META.read_text())


@pytest.fixture(scope="module")
def schema() -> Path:
    """MONAI's metadata schema, offline: the file that META_SCHEMA_FILE names, or where the model
    card's verify_metadata command downloads it (eval/); the tests that need it skip without it."""
    pytest.importorskip("jsonschema", reason="verify_metadata needs jsonschema: pip install -r requirements-dev.txt")
    name = load_meta()["schema"].rsplit("/", 1)[-1]
    path = Path(os.environ.get("META_SCHEMA_FILE") or REPO / "eval" / name)
    if not path.is_file():
        pytest.skip(
            f"MONAI's metadata schema is not at {path}. To run this check, download it once: `python -m monai.bundle "
            f"verify_metadata --meta_file configs/metadata.json --filepath eval/{name}` (with internet access), "
            f"or set META_SCHEMA_FILE=/path/to/{name} (docs/README.md, 'Sharing, verifying, exporting')."
        )
    return path


def test_verify_metadata_cli(schema):
    check_ok(
        run_cli(
            ["-m", "monai.bundle", "verify_metadata", "--meta_file", str(META), "--filepath", str(schema)], cwd=REPO
        )
    )


def test_verify_metadata_rejects_a_broken_file(schema, tmp_path):
    """The schema check is live: metadata without network_data_format fails."""
    meta = load_meta()
    del meta["network_data_format"]
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(broken), filepath=str(schema))


def test_metadata_versions_match_requirements():
    meta = load_meta()
    assert next(iter(meta["changelog"])) == meta["version"]  # the newest entry is the version's
    requirements = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(==|>=)\s*([0-9.]+)", line)
            assert m, f"requirements.txt line {line!r}: expected NAME==X or NAME>=X"
            requirements[m.group(1).lower()] = (m.group(2), m.group(3))

    def satisfies(version: str, op: str, bound: str) -> bool:
        v, b = (tuple(int(x) for x in s.split(".")) for s in (version, bound))
        return v == b if op == "==" else v >= b

    assert satisfies(meta["monai_version"], *requirements.pop("monai"))
    assert satisfies(meta["pytorch_version"], *requirements.pop("torch"))
    packages = {k.lower(): v for k, v in meta["required_packages_version"].items()}
    assert sorted(packages) == sorted(requirements), "required_packages_version must list requirements.txt"
    for name, (op, bound) in requirements.items():
        assert satisfies(packages[name], op, bound), f"{name} {packages[name]} does not satisfy {op}{bound}"
    # measured numbers (docs/performance.md), the same as the model card states: they cannot drift apart
    assert {"psnr", "ssim"} <= set(meta["eval_metrics"])
    card = (REPO / "docs" / "README.md").read_text()
    for name, value in meta["eval_metrics"].items():
        assert isinstance(value, (int, float)), name
        assert f"{value:.2f}" in card or f"{value:.3f}" in card, f"eval_metrics {name}={value} is not in docs/README.md"


def test_metadata_shapes_match_the_configs():
    """The multiple in network_data_format is the autoencoder's spatial_multiple, and the
    autoencoder/diffusion formats are the default config's real shapes."""
    meta = load_meta()
    recon = parser_for(REPO / "configs" / "inference_autoencoder.yaml")
    ae = recon.get_parsed_content("autoencoder_def")
    for side, key in (("inputs", "image"), ("outputs", "pred")):
        spec = meta["network_data_format"][side][key]
        assert _get_fake_spatial_shape(spec["spatial_shape"], n=1) == tuple(ae.spatial_multiple)
        assert _get_fake_spatial_shape(spec["spatial_shape"], n=3) == tuple(3 * m for m in ae.spatial_multiple)
        assert spec["num_channels"] == recon.get_parsed_content("autoencoder_args")["in_channels"]

    train = parser_for(REPO / "configs" / "train_autoencoder.yaml")
    patch = train.get_parsed_content("patch")
    train_ae = train.get_parsed_content("autoencoder_def")
    assert train_ae.total_factor == ae.total_factor
    latent = list(train_ae.latent_shape(patch))
    ae_format = meta["autoencoder_data_format"]
    assert ae_format["inputs"]["image"]["spatial_shape"] == patch == ae_format["outputs"]["pred"]["spatial_shape"]
    for key in ("z_mu", "z_sigma"):
        assert ae_format["outputs"][key]["spatial_shape"] == latent
        assert ae_format["outputs"][key]["num_channels"] == train["latent_channels"]

    # the diffusion format is the shipped model.pt's: its latents and the sampling config's
    generate = parser_for(REPO / "configs" / "inference.yaml")
    diffusion = generate.get_parsed_content("diffusion_args")
    saved_latent = torch.load(REPO / "models" / "model.pt", map_location="cpu", weights_only=True)["latent_shape"]
    d_format = meta["diffusion_data_format"]
    for spec in (d_format["inputs"]["latent"], d_format["outputs"]["pred"]):
        assert spec["spatial_shape"] == list(saved_latent)
        assert spec["num_channels"] == diffusion["in_channels"] == diffusion["out_channels"]


def test_large_files_lists_every_weight():
    meta = load_meta()
    entries = pack.read_large_files(REPO)
    assert [e["path"] for e in entries] == list(WEIGHTS)
    for entry in entries:
        assert entry["hash_type"] == "sha256"
        assert entry["url"] == pack.canonical_url(meta["version"], Path(entry["path"]).name)
        assert entry["hash_val"] == "" or re.fullmatch(r"[0-9a-f]{64}", entry["hash_val"])
        if (REPO / entry["path"]).is_file():  # weights in place: their hash must be the listed one
            assert entry["hash_val"] == sha256(REPO / entry["path"]), "run python -m scripts.pack --update_hashes"
            assert (REPO / entry["path"]).stat().st_size <= 20e6, "weights in models/ are kept under 20 MB (half precision)"


# ---------------------------------------------------------------------------------------------
# MONAI's verifiers and exports


def test_verify_net_in_out(monkeypatch):
    """The model card's ``verify_net_in_out network_def --n 16``, from the bundle's root: the default
    reconstruction network with the shipped weights on a 64^3 input (4*16 per axis)."""
    monkeypatch.chdir(REPO)
    verify_net_in_out(
        net_id="network_def", meta_file="configs/metadata.json", config_file="configs/inference_autoencoder.yaml", n=16
    )


def test_verify_net_in_out_catches_a_wrong_format(bundle):
    with pytest.raises(ValueError, match="channel number"):
        verify_net_in_out(
            net_id="network_def",
            meta_file=str(META),
            config_file=str(REPO / "configs" / "inference_autoencoder.yaml"),
            device="cpu",
            autoencoder_ckpt=str(bundle / "models" / "model_autoencoder.pt"),
            **{"_meta_#network_data_format#outputs#pred#num_channels": 2},
        )


def test_verify_diffusion_unet():
    """The UNet's formats through MONAI's verifier: its Python API, since ``timesteps`` must be a
    tensor, which the command line cannot pass. diffusion_data_format stands in for
    network_data_format, the only format the verifier reads."""
    d_format = load_meta()["diffusion_data_format"]
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(META),
        config_file=str(REPO / "configs" / "inference.yaml"),
        device="cpu",
        extra_forward_args={"timesteps": torch.tensor([500])},
        **{
            "_meta_#network_data_format": {
                "inputs": {"image": d_format["inputs"]["latent"]},
                "outputs": {"pred": d_format["outputs"]["pred"]},
            }
        },
    )


def test_documented_outputs_are_ignored_by_git():
    """What the README's and the model card's commands write (--filepath, --output_dir, --output)
    lands in a folder that git ignores, never loose in the bundle's root."""
    written = set()
    for doc in ("README.md", "docs/README.md"):
        for m in re.finditer(r"--(filepath|output_dir|output)\s+([^\s`\"']+)", (REPO / doc).read_text()):
            if not re.fullmatch(r"[A-Z_]+", m.group(2)):  # OUT, DIR: the user's choice
                written.add(m.group(2) + ("/file" if m.group(1) == "output_dir" else ""))
    written = sorted(written)
    assert "runs/export/autoencoder.ts" in written
    try:
        result = subprocess.run(["git", "-C", str(REPO), "check-ignore", "--no-index", *written], capture_output=True, text=True)
    except OSError:
        pytest.skip("git is not installed")
    if result.returncode == 128:
        pytest.skip(f"not a git work tree: {result.stderr.strip()}")
    assert sorted(result.stdout.split()) == written, f"not ignored by .gitignore: {set(written) - set(result.stdout.split())}"


def eager_reconstructor(ckpt: Path) -> torch.nn.Module:
    parser = parser_for(REPO / "configs" / "inference_autoencoder.yaml", autoencoder_ckpt=str(ckpt))
    net = parser.get_parsed_content("network_def")
    load_network(net, ckpt, "autoencoder", parser.get_parsed_content("autoencoder_args"))
    return net.eval()


def test_ckpt_export_torchscript(bundle, tmp_path):
    """The model card's export command, into runs/export/ as it documents."""
    ckpt = bundle / "models" / "model_autoencoder.pt"
    target = tmp_path / "runs" / "export" / "autoencoder.ts"
    target.parent.mkdir(parents=True)  # mkdir -p runs/export, as documented: ckpt_export makes no folder
    ckpt_export(
        net_id="network_def", filepath=str(target), ckpt_file=str(ckpt), meta_file=str(META),
        config_file=str(REPO / "configs" / "inference_autoencoder.yaml"), key_in_ckpt="autoencoder", use_trace=True,
        input_shape=[1, 1, 16, 16, 16], autoencoder_ckpt=str(ckpt),
    )
    extra = {"metadata.json": ""}
    scripted = torch.jit.load(str(target), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == load_meta()["version"]
    eager = eager_reconstructor(ckpt)
    torch.manual_seed(1)
    for shape in ((1, 1, 16, 16, 16), (1, 1, 16, 24, 32)):  # the traced shape and another multiple of 4
        x = torch.rand(shape)
        with torch.no_grad():
            expected, got = eager(x), scripted(x)
        assert got.dtype == torch.float32 and got.shape == x.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_onnx_export(bundle, tmp_path):
    pytest.importorskip("onnx", reason="onnx is not installed; onnx_export needs onnx and onnxruntime")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed; it runs the exported model")
    ckpt = bundle / "models" / "model_autoencoder.pt"
    target = tmp_path / "autoencoder.onnx"
    check_ok(
        run_cli(
            ["-m", "monai.bundle", "onnx_export", "network_def", "--filepath", str(target), "--ckpt_file", str(ckpt),
             "--meta_file", "configs/metadata.json", "--config_file", "configs/inference_autoencoder.yaml",
             "--key_in_ckpt", "autoencoder", "--use_trace", "True", "--input_shape", "[1, 1, 16, 16, 16]",
             "--converter_kwargs", "{'dynamo': False}", "--autoencoder_ckpt", str(ckpt)],
            cwd=REPO,
            pythonpath=REPO,
        )
    )
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    x = torch.rand(1, 1, 16, 16, 16)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = eager_reconstructor(ckpt)(x)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# MONAI's workflow properties


@pytest.mark.parametrize(
    "configs, workflow_type",
    [
        (["train_autoencoder.yaml"], "train"),
        (["train_autoencoder.yaml", "train_diffusion.yaml"], "train"),
        (["inference_autoencoder.yaml"], "infer"),
        (["inference.yaml"], "infer"),
    ],
    ids=["train_autoencoder", "train_diffusion", "inference_autoencoder", "inference"],
)
def test_workflow_properties(bundle, tmp_path, configs, workflow_type):
    """initialize() and then check_properties(): no required property missing, no optional one
    under a wrong id. Runs in a copy of the bundle with tiny weights and two tiny volumes."""
    root = tmp_path / NAME
    shutil.copytree(bundle, root)
    data = tmp_path / "data"
    for i in range(2):
        write_volume(data / f"vol_{i}.nii.gz", shape=(24, 24, 24), seed=i)
    overrides = dict(TINY_AE, **TINY_DIFFUSION, bundle_root=str(root), dataset_dir=str(data))
    if workflow_type == "train":
        overrides.update(use_mlflow=False, cache="none", patch_size=[32, 32, 32], val_fraction=0.5, batch_size=1)
    config_file = [str(root / "configs" / c) for c in configs]
    workflow = ConfigWorkflow(
        config_file=config_file if len(config_file) > 1 else config_file[0],
        workflow_type=workflow_type,
        logging_file=False,
        **overrides,
    )
    workflow.initialize()
    assert workflow.check_properties() == []


# ---------------------------------------------------------------------------------------------
# the zip


def zip_names(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        return zf.namelist()


def test_pack_is_deterministic_and_holds_the_bundle(bundle, tmp_path):
    first = pack.pack(bundle, tmp_path / "a")
    # a second copy with other timestamps, an executable bit and junk that must stay out
    other = tmp_path / "other" / NAME
    shutil.copytree(bundle, other, copy_function=shutil.copy)
    os.utime(other / "configs" / "metadata.json", (1e9, 1e9))
    (other / "scripts" / "pack.py").chmod(0o755)
    junk = ["runs/autoencoder/checkpoint_last.pt", "eval/mlruns.db", "data/demo/phantom_000.nii.gz", "tests/test_x.py",
            "scripts/__pycache__/pack.cpython-311.pyc", "scripts/.hidden.py", "models/model_extra.ts", "dist/old.zip",
            ".git/config", "configs/.DS_Store", "notes.txt"]
    for name in junk:
        (other / name).parent.mkdir(parents=True, exist_ok=True)
        (other / name).write_bytes(b"junk")
    second = pack.pack(other, tmp_path / "b")
    assert first.name == f"{NAME}_v{load_meta()['version']}.zip"
    assert first.read_bytes() == second.read_bytes()

    names = zip_names(first)
    assert names == sorted(names) and all(n.startswith(f"{NAME}/") for n in names)
    files = {n.removeprefix(f"{NAME}/") for n in names if not n.endswith("/")}
    assert {"LICENSE", "large_files.yml", "configs/metadata.json", "configs/inference_autoencoder.yaml",
            "configs/inference.yaml", "configs/train_autoencoder.yaml", "configs/train_diffusion.yaml",
            "scripts/__init__.py", "scripts/networks.py", "scripts/pack.py"} <= files
    assert not files & set(WEIGHTS) and not files & set(junk)
    assert not any(re.search(r"(^|/)(runs|eval|data|tests|__pycache__|\.git)/|\.pyc$|\.pt$", f) for f in files)
    with zipfile.ZipFile(first) as zf:
        for info in zf.infolist():
            assert info.date_time == pack.ZIP_DATE
            assert info.external_attr >> 16 == (pack.DIR_MODE if info.is_dir() else pack.FILE_MODE)
        assert zf.read(f"{NAME}/large_files.yml") == (bundle / "large_files.yml").read_bytes()


def test_pack_of_the_repository(tmp_path):
    """From the work tree itself (git mode: tracked or addable files): runs/, eval/, data/demo/,
    caches and tests stay out."""
    names = zip_names(pack.pack(REPO, tmp_path, allow_unhashed=True))
    files = [n.removeprefix(f"{NAME}/") for n in names if not n.endswith("/")]
    assert "configs/metadata.json" in files and "scripts/pack.py" in files
    assert not [f for f in files if re.search(r"^(runs|eval|data|tests|dist|\.ci)/|__pycache__|\.pyc$|\.pt$", f)]
    assert all((REPO / f).is_file() for f in files)


def test_zip_readme_runs_only_what_the_zip_holds(bundle, tmp_path):
    """The packed README's section for users of the zip names only files that the zip holds, and
    sends the tests (which it does not hold) to the repository."""
    zip_path = pack.pack(bundle, tmp_path)
    with zipfile.ZipFile(zip_path) as zf:
        files = {n.removeprefix(f"{NAME}/") for n in zf.namelist()}
        readme = zf.read(f"{NAME}/README.md").decode()
    assert "requirements-dev.txt" not in files and not any(f.startswith("tests/") for f in files)
    section = readme.split("## Using the packed zip", 1)[1].split("\n## ", 1)[0]
    commands = "\n".join(re.findall(r"```bash\n(.*?)```", section, re.S))
    assert "download_large_files" in commands and "pytest" not in commands and "requirements-dev" not in commands
    named = re.findall(r"(?:-r|--config_file)\s+(\S+)", commands)
    assert "requirements.txt" in named and all(n in files for n in named), named
    assert "the tests and `requirements-dev.txt` are in the repository only" in " ".join(section.split())
    # the fresh-machine commands, which do need them, say that they run in a clone
    assert "In a clone of this repository" in readme.split("## Two commands for a fresh machine", 1)[1]


def test_pack_refuses_unverifiable_weights(bundle, tmp_path):
    root = tmp_path / NAME
    shutil.copytree(bundle, root)
    (root / WEIGHTS[0]).write_bytes(b"retrained")
    with pytest.raises(ValueError, match="update_hashes"):
        pack.pack(root, tmp_path / "dist")
    before = (root / "large_files.yml").read_text()
    assert pack.main(["--update_hashes", "--bundle_root", str(root)]) == 0
    after = (root / "large_files.yml").read_text()
    assert [l for l in before.splitlines() if l.lstrip().startswith("#")] == [
        l for l in after.splitlines() if l.lstrip().startswith("#")
    ], "comments are kept"
    assert pack.read_large_files(root)[0]["hash_val"] == sha256(root / WEIGHTS[0])
    pack.pack(root, tmp_path / "dist")  # now consistent

    text = re.sub(r'hash_val: "[0-9a-f]+"', 'hash_val: ""', after, count=1)
    (root / "large_files.yml").write_text(text)
    with pytest.raises(ValueError, match="no hash_val"):
        pack.pack(root, tmp_path / "dist")
    assert pack.pack(root, tmp_path / "dev", allow_unhashed=True).is_file()


# ---------------------------------------------------------------------------------------------
# download round trip on loopback


def test_download_round_trip(served, bundle, tmp_path):
    """The model card's verified download: download.py run alone (standard library only) checks the
    zip's published sha256 and unpacks it, download_large_files fetches the weights by the packed
    hashes, and the downloaded bundle reconstructs a scan with its own code, config and weights."""
    with zipfile.ZipFile(served["zip"]) as zf:
        packed = yaml.safe_load(zf.read(f"{NAME}/large_files.yml"))["large_files"]
    assert [e["url"] for e in packed] == [f"{served['base']}/{Path(w).name}" for w in WEIGHTS]
    assert [e["hash_val"] for e in packed] == [sha256(bundle / w) for w in WEIGHTS]
    version = pack.bundle_version(bundle)  # the packed bundle's own large_files.yml keeps the canonical urls
    assert [e["url"] for e in pack.read_large_files(bundle)] == [pack.canonical_url(version, Path(w).name) for w in WEIGHTS]

    published = pack.sha256_path(served["zip"]).read_text().split()[0]
    shutil.copy(REPO / "scripts" / "download.py", tmp_path / "download.py")
    downloads = tmp_path / "downloads"
    check_ok(
        run_cli(
            ["-I", "-S", "download.py", "--url", f"{served['base']}/{served['zip'].name}", "--sha256", published,
             "--bundle_dir", str(downloads)],
            cwd=tmp_path,
        )
    )
    root = downloads / NAME
    assert (root / "configs" / "metadata.json").is_file()
    assert not any((root / w).exists() for w in WEIGHTS)
    download_large_files(bundle_path=str(root))
    for weight in WEIGHTS:
        assert (root / weight).read_bytes() == (bundle / weight).read_bytes()

    # reconstruct with the downloaded copy's own code, config and weights
    volume = tmp_path / "in" / "scan.nii.gz"
    affine = write_volume(volume)
    output = tmp_path / "out"
    check_ok(
        run_cli(
            ["-m", "monai.bundle", "run", "--config_file", "configs/inference_autoencoder.yaml",
             "--dataset_dir", str(volume.parent), "--output_dir", str(output), "--roi_size", "[32, 32, 32]",
             "--sw_margin", "8"],  # the network comes from the downloaded weights
            cwd=root,
            pythonpath=root,
        )
    )
    recon = nib.load(str(output / "scan_recon.nii.gz"))
    assert recon.shape == nib.load(str(volume)).shape
    np.testing.assert_allclose(recon.affine, affine, atol=1e-4)
    assert np.isfinite(np.asarray(recon.dataobj)).all()


def test_download_large_files_rejects_a_wrong_hash(served, bundle, tmp_path):
    """A served file whose bytes differ from hash_val: the download fails and leaves nothing at
    the target path, nor a partial file anywhere in the bundle."""
    root = tmp_path / NAME
    root.mkdir()
    entry = {
        "path": WEIGHTS[0],
        "url": f"{served['base']}/tampered.pt",
        "hash_val": sha256(bundle / WEIGHTS[0]),
        "hash_type": "sha256",
    }
    (root / "large_files.yml").write_text(yaml.safe_dump({"large_files": [entry]}))
    with pytest.raises(HashCheckError, match="hash check of downloaded file failed"):
        download_large_files(bundle_path=str(root))
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == ["large_files.yml"]


# ---------------------------------------------------------------------------------------------
# checkpoints are read with weights_only=True


def _loads_in_python(path: Path) -> list[tuple[int, bool]]:
    """(line, passes weights_only=True) for each torch.load in a Python file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
            found.append((node.lineno, False))  # `from torch import load` would hide calls from this check
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            if isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                safe = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                found.append((node.lineno, safe))
    return found


def _loads_in_text(text: str) -> list[tuple[int, bool]]:
    """(line, passes weights_only=True) for each ``torch.load(...)`` in a config's text."""
    found = []
    for m in re.finditer(r"torch\s*\.\s*load\s*\(", text):
        depth, end = 1, m.end()
        while depth and end < len(text):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        found.append((text.count("\n", 0, m.start()) + 1, bool(re.search(r"weights_only\s*=\s*True", text[m.end() : end]))))
    return found


def test_checkpoints_load_weights_only():
    unsafe = []
    for path in sorted((REPO / "scripts").rglob("*.py")):
        unsafe += [f"{path.relative_to(REPO)}:{line}" for line, safe in _loads_in_python(path) if not safe]
    for path in sorted(p for p in (REPO / "configs").rglob("*") if p.suffix in (".yaml", ".yml", ".json")):
        unsafe += [f"{path.relative_to(REPO)}:{line}" for line, safe in _loads_in_text(path.read_text()) if not safe]
    assert not unsafe, f"torch.load without weights_only=True (use scripts.checkpoints.load_checkpoint): {unsafe}"
    # the checker itself sees both forms
    assert _loads_in_text("x: \"$torch.load(p, map_location='cpu')\"") == [(1, False)]
    assert _loads_in_text("x: \"$torch.load(f(p), weights_only=True)\"") == [(1, True)]
