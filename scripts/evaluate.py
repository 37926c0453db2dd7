"""The bundle's one quality measure, and the command that applies it to a folder of scans.

    python -m scripts.evaluate --dataset_dir SCANS --checkpoint models/model_autoencoder.pt --output_dir eval/quality

Every volume is reconstructed by the autoencoder (through the preprocessing its checkpoint records)
and scored in its own grid and intensity units with the measure of :mod:`scripts.metrics`, beside
the interpolation floor at the network's total factor. A CSV and a Markdown table are written, a row
per volume; a volume that fails is a row with its error, and the exit status is then 1.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from scripts.checkpoints import load_checkpoint, preprocessing_settings
from scripts.engines import autocast, autocast_dtype
from scripts.io import write_atomic
from scripts.inference import ResultsCSV, TiledInferer, _root_cause
from scripts.metrics import interpolation_floor, score
from scripts.networks import FactorAutoencoderKL, Reconstructor

logger = logging.getLogger(__name__)

FIELDS = ("file", "shape", "spacing", "psnr", "psnr_floor", "ssim", "ssim_floor", "mae", "mae_floor", "seconds", "error")


def _load_reference(path: str) -> tuple[np.ndarray, tuple[int, ...], tuple[float, ...]]:
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    return data, tuple(int(s) for s in data.shape), tuple(round(float(z), 3) for z in img.header.get_zooms()[:3])


class Evaluation:
    """Reconstruct and score each volume of a folder with one checkpoint; rows go to a CSV and a
    Markdown table as they come, and a file that fails is a row with its error, not the end."""

    def __init__(
        self,
        checkpoint: str | Path,
        output_dir: str | Path,
        roi_size: Sequence[int] = (256, 256, 256),
        sw_margin: int = 32,
        device: str | torch.device | None = None,
        mixed_precision: str | None = "bf16",
        preprocessing: dict | None = None,
    ) -> None:
        from scripts.data import preprocessing as build_preprocessing

        ckpt = load_checkpoint(checkpoint, "checkpoint")
        if "autoencoder" not in ckpt or "autoencoder_args" not in ckpt:
            raise ValueError(
                f"checkpoint '{checkpoint}' holds {sorted(ckpt)}; expected an autoencoder checkpoint of this bundle "
                f"(model_autoencoder.pt, with 'autoencoder' and 'autoencoder_args')."
            )
        self.device = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
        self.autoencoder = FactorAutoencoderKL(**ckpt["autoencoder_args"])
        self.autoencoder.load_state_dict(ckpt["autoencoder"])
        self.network = Reconstructor(self.autoencoder).to(self.device).eval()
        overrides = {k: "none" if v is None else v for k, v in (preprocessing or {}).items()}  # None given: no resampling
        # spacing and modality have no safe default for an older checkpoint; the rest default as in the configs
        missing = {"spacing", "modality"} - set(ckpt.get("preprocessing") or {}) - set(overrides)
        if missing:
            raise ValueError(
                f"checkpoint '{checkpoint}' does not record its preprocessing ({sorted(missing)} missing); "
                f"give them with --spacing/--modality (older checkpoints were trained at 1 mm, modality mri)."
            )
        self.settings = settings = preprocessing_settings(ckpt, overrides, checkpoint, "checkpoint")
        multiple = self.autoencoder.spatial_multiple
        self.transform = Compose(
            build_preprocessing(
                int(ckpt["autoencoder_args"].get("in_channels", 1)),
                settings["spacing"],
                settings["modality"],
                settings["intensity_percentiles"],
                settings["ct_window"],
                multiple,
            )
        )
        self.inferer = TiledInferer(roi_size, sw_margin, multiple)
        self.amp_dtype = autocast_dtype(mixed_precision, self.device)
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.results = ResultsCSV(self.output_dir / "evaluation.csv", FIELDS)
        self.csv_path = self.results.path
        self.md_path = self.csv_path.with_suffix(".md")
        self.checkpoint = str(checkpoint)

    def __call__(self, path: str) -> dict:
        start = time.perf_counter()
        try:
            reference, shape, spacing = _load_reference(path)
            item = self.transform({"image": path})
            x = item["image"].as_tensor().unsqueeze(0).to(self.device)
            with torch.no_grad(), autocast(self.device, self.amp_dtype):
                recon = self.inferer(x, self.network).float()
            floor = interpolation_floor(x, self.autoencoder.total_factor)
            back = {}
            for name, volume in (("recon", recon), ("floor", floor)):
                inverted = Invertd("pred", self.transform, orig_keys="image", nearest_interp=False)(
                    {"image": item["image"], "pred": MetaTensor(volume[0].cpu())}
                )["pred"]
                back[name] = inverted[0].numpy()
                if back[name].shape != shape:
                    raise RuntimeError(f"inverted {name} has shape {back[name].shape}, the input {shape}")
            ours, floors = score(reference, back["recon"]), score(reference, back["floor"])
            row = {
                "file": Path(path).name,
                "shape": "x".join(map(str, shape)),
                "spacing": "x".join(f"{z:g}" for z in spacing),
                **{k: f"{v:.4f}" for k, v in ours.items()},
                **{f"{k}_floor": f"{v:.4f}" for k, v in floors.items()},
            }
        except Exception as e:
            logger.error(f"{path}: {_root_cause(e)}")
            row = {"file": Path(path).name, "error": _root_cause(e)}
        row["seconds"] = f"{time.perf_counter() - start:.1f}"
        self.results.add(**row)
        write_atomic(self.md_path, markdown_table(self.results.rows, self.checkpoint))
        logger.info(
            f"[{len(self.results.rows)}] {row['file']}: "
            + (f"PSNR {row['psnr']} dB (floor {row['psnr_floor']}), SSIM {row['ssim']}, MAE {row['mae']}" if "psnr" in row else "failed")
            + f", {row['seconds']} s"
        )
        return row

    @property
    def failures(self) -> list[dict]:
        return [r for r in self.results.rows if r["error"]]


def markdown_table(rows: Sequence[dict], checkpoint: str = "") -> str:
    """The rows as a Markdown table, the floor beside each figure, and the means."""
    lines = [
        f"Checkpoint: `{checkpoint}`. PSNR/SSIM over the body, clipped to each input's [p0.5, p99.5]; "
        f"MAE over the body in the input's units; floor: average-pool by the total factor + trilinear.",
        "",
        "| volume | shape | spacing (mm) | PSNR (dB) | floor | gain | SSIM | floor | MAE | floor |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    ok = [r for r in rows if not r["error"]]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['file']} | failed: {r['error']} | | | | | | | | |")
            continue
        gain = float(r["psnr"]) - float(r["psnr_floor"])
        lines.append(
            f"| {r['file']} | {r['shape']} | {r['spacing']} | {float(r['psnr']):.2f} | {float(r['psnr_floor']):.2f} | "
            f"{gain:+.2f} | {float(r['ssim']):.3f} | {float(r['ssim_floor']):.3f} | {float(r['mae']):.1f} | {float(r['mae_floor']):.1f} |"
        )
    if ok:
        mean = {k: float(np.mean([float(r[k]) for r in ok])) for k in FIELDS[3:9]}
        lines.append(
            f"| **mean of {len(ok)}** | | | {mean['psnr']:.2f} | {mean['psnr_floor']:.2f} | {mean['psnr'] - mean['psnr_floor']:+.2f} | "
            f"{mean['ssim']:.3f} | {mean['ssim_floor']:.3f} | {mean['mae']:.1f} | {mean['mae_floor']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from scripts.data import list_volumes

    p = argparse.ArgumentParser(prog="python -m scripts.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset_dir", required=True, help="a folder of .nii/.nii.gz volumes, or a datalist JSON")
    p.add_argument("--checkpoint", default="models/model_autoencoder.pt", help="an autoencoder checkpoint of this bundle")
    p.add_argument("--output_dir", default="eval/quality", help="where evaluation.csv and evaluation.md are written")
    p.add_argument("--roi_size", type=int, nargs=3, default=[256, 256, 256], help="largest window; smaller volumes go whole")
    p.add_argument("--sw_margin", type=int, default=32, help="voxels of context around each window's kept centre")
    p.add_argument("--device", default=None, help="cuda:0, cpu, ...; default: the first GPU if there is one")
    p.add_argument("--mixed_precision", default="bf16", help="bf16, fp16 or none (ignored on CPU)")
    p.add_argument("--spacing", default=None, help="override the checkpoint's voxel spacing: 'none' or e.g. 1,1,1")
    p.add_argument("--modality", default=None, choices=("mri", "ct"), help="override the checkpoint's intensity mapping")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    overrides: dict = {}
    if args.spacing is not None:
        overrides["spacing"] = None if args.spacing.lower() == "none" else [float(v) for v in args.spacing.split(",")]
    if args.modality is not None:
        overrides["modality"] = args.modality
    volumes = [item["image"] for item in list_volumes(args.dataset_dir)]
    evaluation = Evaluation(
        args.checkpoint, args.output_dir, args.roi_size, args.sw_margin, args.device, args.mixed_precision, overrides
    )
    logger.info(f"evaluating {len(volumes)} volume(s) with {args.checkpoint} ({evaluation.settings})")
    for path in volumes:
        evaluation(str(path))
    logger.info(f"results: {evaluation.csv_path} and {evaluation.md_path}")
    if evaluation.failures:
        logger.error(f"{len(evaluation.failures)} of {len(volumes)} volume(s) failed; the tables say why.")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
