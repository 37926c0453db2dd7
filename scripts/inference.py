"""Inference on NIfTI volumes: reconstructions (and latents) of given scans, and new volumes sampled
from the latent diffusion model. One bad file never stops the others: each outcome is a row of the
run's CSV, and the run's exit status says whether anything failed."""

from __future__ import annotations

import csv
import io
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from monai.data import Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.inferers import Inferer, LatentDiffusionInferer

from scripts.checkpoints import save_atomic
from scripts.data import save_nifti_atomic
from scripts.engines import autocast
from scripts.io import write_atomic
from scripts.metrics import body_mask, masked_quality

logger = logging.getLogger(__name__)

CSV_FIELDS = ("file", "status", "psnr", "ssim", "seconds", "output", "latent", "error")


def _root_cause(error: BaseException) -> str:
    """The message that explains a chained error: MONAI wraps a transform's error (several times) in
    "applying transform ..." RuntimeErrors, which are skipped; the first other error is kept, so the
    bundle's own checks keep their message (which already quotes the library's reason)."""
    while (
        error.__cause__ is not None
        and isinstance(error, RuntimeError)
        and str(error).startswith("applying transform")
    ):
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def _tiles(size: int, roi: int, margin: int) -> list[tuple[int, int, int]]:
    """``(window_start, core_start, core_end)`` along one axis: windows of ``roi`` voxels whose cores
    partition ``[0, size)``, each core at least ``margin`` voxels inside its window except at the
    volume's own borders. Sizes are multiples of the network's factor, so every start is too."""
    if size <= roi:
        return [(0, 0, size)]
    tiles, core = [], 0
    while core < size:
        start = min(max(core - margin, 0), size - roi)
        end = size if start + roi >= size else start + roi - margin
        tiles.append((start, core, end))
        core = end
    return tiles


class TiledInferer(Inferer):
    """Whole-volume inference in windows of at most ``roi_size`` voxels, equal to running the network
    on the whole volume.

    Each window is read with ``margin`` voxels of real context on every side and only its centre
    (the core) is kept; the cores tile the volume. Nothing is padded and nothing is blended, so
    where the network's receptive field (in practice, its effective one) fits within the margin the
    result is the whole-volume result, whatever the window size. This needs a network without
    statistics over space (``norm="channel"``, no attention): ``GroupNorm`` normalises each window by
    its own statistics. Window starts are multiples of the inputs' size multiple (inputs are padded
    to the network's total factor first), so every window sees the same latent grid.

    Args:
        roi_size: the largest window, per axis; a volume smaller than it along an axis is not split there.
        margin: voxels of context around each kept core; rounded up to a multiple of ``multiple``.
        multiple: the network's total downsampling factor per axis (``spatial_multiple``).
    """

    def __init__(self, roi_size: Sequence[int], margin: int = 16, multiple: Sequence[int] | int = 1) -> None:
        super().__init__()
        self.roi_size = tuple(int(r) for r in roi_size)
        multiples = (multiple,) * len(self.roi_size) if isinstance(multiple, int) else tuple(multiple)
        if any(r % m for r, m in zip(self.roi_size, multiples)):
            raise ValueError(f"roi_size {list(self.roi_size)} must be a multiple of the total factor {list(multiples)} per axis.")
        self.margins = tuple(math.ceil(int(margin) / m) * m for m in multiples)
        if any(r <= 2 * g for r, g in zip(self.roi_size, self.margins)):
            raise ValueError(
                f"roi_size {list(self.roi_size)} must exceed twice the margin {list(self.margins)} (sw_margin, rounded "
                f"up to the total factor) on every axis, so that each window keeps a centre; use a larger roi_size or a smaller sw_margin."
            )

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        spatial = inputs.shape[2:]
        axes = [_tiles(s, r, g) for s, r, g in zip(spatial, self.roi_size, self.margins)]
        if all(len(a) == 1 for a in axes):
            return network(inputs, *args, **kwargs)
        output = None
        for tile in itertools.product(*axes):
            window = tuple(slice(start, min(start + r, s)) for (start, _, _), r, s in zip(tile, self.roi_size, spatial))
            pred = network(inputs[(..., *window)], *args, **kwargs)
            # the network may change the spatial size by a fixed ratio (an encoder): map the core through it
            ratio = [p / (w.stop - w.start) for p, w in zip(pred.shape[2:], window)]
            if output is None:
                output = pred.new_zeros((*pred.shape[:2], *(round(s * q) for s, q in zip(spatial, ratio))))
            core_out = tuple(slice(round(c0 * q), round(c1 * q)) for (_, c0, c1), q in zip(tile, ratio))
            core_in = tuple(slice(round((c0 - w0) * q), round((c1 - w0) * q)) for (w0, c0, c1), q in zip(tile, ratio))
            output[(..., *core_out)] = pred[(..., *core_in)]
        return output


class SafeDataset(Dataset):
    """A MONAI ``Dataset`` whose failing items become error records instead of exceptions, so a
    corrupt file is reported and the next one is processed."""

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as e:
            return {"error": _root_cause(e), "image_path": str(self.data[index]["image"])}


def unique_path(path: str | Path) -> Path:
    """``path``, or ``name_1``, ``name_2``, ... beside it: outputs never overwrite an existing file."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    stem = path.name[: len(path.name) - len(suffix)]
    candidate, i = path, 0
    while candidate.exists():
        i += 1
        candidate = path.with_name(f"{stem}_{i}{suffix}")
    return candidate


def _stem(path: str | Path) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


class ResultsCSV:
    """The per-file results table, rewritten atomically after each file."""

    def __init__(self, path: str | Path, fields: Sequence[str] = CSV_FIELDS) -> None:
        self.path = Path(path)
        self.fields = tuple(fields)
        self.rows: list[dict] = []

    def add(self, **row: Any) -> None:
        self.rows.append({k: row.get(k, "") for k in self.fields})
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.fields)
        writer.writeheader()
        writer.writerows(self.rows)
        write_atomic(self.path, buffer.getvalue())

    @property
    def failures(self) -> list[dict]:
        return [r for r in self.rows if r["status"] != "ok"]


class LatentEncoder(nn.Module):
    """The autoencoder's encoder as one tensor in, ``z_mu`` out, for sliding-window encoding."""

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(x)[0].float()


class ReconstructionEvaluator(SupervisedEvaluator):
    """Encode and decode every volume of ``val_data_loader`` (a :class:`SafeDataset` with batch size 1
    and ``no_collation``), write the reconstruction in the input's own geometry and intensity units
    (``postprocessing`` holds the ``Invertd``), optionally the latent ``z_mu``, and a CSV of PSNR and
    SSIM (the measure of :mod:`scripts.metrics`, on the preprocessed volume; ``python -m
    scripts.evaluate`` takes it in the input's own grid) and time per file. Large volumes go through
    ``inferer`` (:class:`TiledInferer`) so memory stays bounded.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: Any,
        network: nn.Module,
        inferer: Inferer,
        postprocessing: Callable,
        output_dir: str | Path,
        latent_inferer: Inferer | None = None,
        save_latent: str | None = None,
        amp_dtype: torch.dtype | None = None,
        val_handlers: Sequence | None = None,
    ) -> None:
        if save_latent not in (None, "nifti", "pt"):
            raise ValueError(f"save_latent must be null, 'nifti' or 'pt', got {save_latent!r}.")
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            network=network,
            inferer=inferer,
            postprocessing=None,
            val_handlers=val_handlers,
            decollate=False,
        )
        self.invert = postprocessing
        self.output_dir = Path(output_dir)
        self.latent_inferer = latent_inferer or inferer
        self.save_latent = save_latent
        self.amp_dtype = amp_dtype
        self.results = ResultsCSV(unique_path(self.output_dir / "reconstruction_metrics.csv"))

    def _iteration(self, engine: Any, batchdata: list[dict]) -> dict:
        (item,) = batchdata
        start = time.perf_counter()
        if "error" in item:
            logger.error(f"{item['image_path']}: {item['error']}")
            self.results.add(file=item["image_path"], status="failed", error=item["error"])
            return {}
        path = item["image"].meta.get("filename_or_obj", "")
        try:
            row = self._reconstruct(item, path)
        except Exception as e:
            logger.error(f"{path}: {_root_cause(e)}")
            row = {"file": path, "status": "failed", "error": _root_cause(e)}
        row["seconds"] = f"{time.perf_counter() - start:.3f}"
        self.results.add(**row)
        return {}

    def _reconstruct(self, item: dict, path: str) -> dict:
        image = item["image"]
        x = image.as_tensor().unsqueeze(0).to(self.state.device)
        self.network.eval()
        with torch.no_grad(), autocast(self.state.device, self.amp_dtype):
            recon = self.inferer(x, self.network).float()
        quality = masked_quality(x, recon, body_mask(x))  # the bundle's measure, on the preprocessed grid
        psnr, ssim = quality["psnr"], quality["ssim"]
        out = self.invert({"image": image, "pred": MetaTensor(recon[0].cpu())})["pred"]
        output = unique_path(self.output_dir / f"{_stem(path)}_recon.nii.gz")
        save_nifti_atomic(out[0].numpy().astype(np.float32), out.affine.numpy(), output)
        row = {"file": path, "status": "ok", "psnr": f"{psnr:.4f}", "ssim": f"{ssim:.4f}", "output": str(output)}
        if self.save_latent is not None:
            row["latent"] = str(self._write_latent(x, image, path))
        return row

    def _write_latent(self, x: torch.Tensor, image: MetaTensor, path: str) -> Path:
        autoencoder = self.network.autoencoder
        with torch.no_grad(), autocast(self.state.device, self.amp_dtype):
            z_mu = self.latent_inferer(x, LatentEncoder(autoencoder)).float()[0].cpu()
        # a latent voxel summarises a block of `factor` input voxels: its centre sets the affine
        factor = autoencoder.total_factor
        scale = np.diag([*factor, 1.0]).astype(np.float64)
        scale[:3, 3] = [(f - 1) / 2 for f in factor]
        affine = image.affine.numpy() @ scale
        if self.save_latent == "pt":
            target = unique_path(self.output_dir / f"{_stem(path)}_latent.pt")
            save_atomic({"z_mu": z_mu, "affine": torch.as_tensor(affine)}, target)
        else:
            target = unique_path(self.output_dir / f"{_stem(path)}_latent.nii.gz")
            save_nifti_atomic(np.moveaxis(z_mu.numpy(), 0, -1), affine, target)
        return target


class GenerationEvaluator(SupervisedEvaluator):
    """Sample one volume per item of ``val_data_loader`` (``{"index": i}``): noise of the latent shape
    from a generator seeded by ``(seed, i)``, DDIM through ``LatentDiffusionInferer.sample`` (which
    divides by the latent scale factor saved with the diffusion model), decode, and write NIfTI with
    the training voxel spacing. The same seed writes the same volumes."""

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: Any,
        network: nn.Module,
        autoencoder: nn.Module,
        inferer: LatentDiffusionInferer,
        scheduler: Any,
        latent_shape: Sequence[int],
        output_dir: str | Path,
        spacing: Sequence[float] | None,
        seed: int = 0,
        amp_dtype: torch.dtype | None = None,
        val_handlers: Sequence | None = None,
    ) -> None:
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            network=network,
            inferer=inferer,
            val_handlers=val_handlers,
            decollate=False,
        )
        self.autoencoder = autoencoder
        self.scheduler = scheduler
        self.latent_shape = tuple(latent_shape)
        self.output_dir = Path(output_dir)
        self.spacing = tuple(spacing) if spacing is not None else (1.0,) * (len(self.latent_shape) - 1)
        self.seed = seed
        self.amp_dtype = amp_dtype
        self.results = ResultsCSV(unique_path(self.output_dir / "generated.csv"))

    def _iteration(self, engine: Any, batchdata: list[dict]) -> dict:
        (item,) = batchdata
        index = int(item["index"])
        start = time.perf_counter()
        generator = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + index)
        noise = torch.randn((1, *self.latent_shape), generator=generator).to(self.state.device)
        self.network.eval()
        self.autoencoder.eval()
        with torch.no_grad(), autocast(self.state.device, self.amp_dtype):
            image = self.inferer.sample(
                input_noise=noise,
                autoencoder_model=self.autoencoder,
                diffusion_model=self.network,
                scheduler=self.scheduler,
                verbose=False,
            )
        volume = image.float().clamp(0, 1)[0, 0].cpu().numpy()
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = [-(n - 1) * s / 2 for n, s in zip(volume.shape, self.spacing)]
        output = unique_path(self.output_dir / f"sample_seed{self.seed}_{index:04d}.nii.gz")
        save_nifti_atomic(volume, affine, output)
        self.results.add(file=str(index), status="ok", seconds=f"{time.perf_counter() - start:.3f}", output=str(output))
        logger.info(f"wrote {output}")
        return {}


def finish(evaluator: Any) -> None:
    """End the run: a summary line, and exit status 1 if any file failed (the CSV says which)."""
    failures = evaluator.results.failures
    total = len(evaluator.results.rows)
    logger.info(f"{total - len(failures)} of {total} done; results in {evaluator.results.path}")
    if failures:
        logger.error(f"{len(failures)} of {total} failed: " + "; ".join(f"{r['file']}: {r['error']}" for r in failures))
        raise SystemExit(1)


def latent_noise_shape(latent_channels: int, spatial_shape: Sequence[int], multiple: Sequence[int]) -> list[int]:
    """The latent shape (channels first) that decodes to ``spatial_shape``, refusing sizes the
    network cannot produce."""
    if any(s % m for s, m in zip(spatial_shape, multiple)):
        raise ValueError(
            f"image_size {list(spatial_shape)} is not divisible by {list(multiple)}, the total factor per axis; "
            f"use e.g. {[math.ceil(s / m) * m for s, m in zip(spatial_shape, multiple)]}."
        )
    return [latent_channels, *(s // m for s, m in zip(spatial_shape, multiple))]
