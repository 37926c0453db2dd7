"""Inference on NIfTI volumes: reconstructions (and latents) of given scans, and new volumes sampled
from the latent diffusion model. One bad file never stops the others: each outcome is a row of the
run's CSV, and the run's exit status says whether anything failed."""

from __future__ import annotations

import csv
import io
import itertools
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn as nn
from monai.data import Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.inferers import Inferer, LatentDiffusionInferer
from monai.utils import CommonKeys

from scripts.checkpoints import save_atomic
from scripts.data import save_nifti_atomic
from scripts.engines import autocast
from scripts.io import atomic_path, claim_path, claimed, write_atomic
from scripts.metrics import body_mask, masked_quality

logger = logging.getLogger(__name__)

CSV_FIELDS = ("file", "status", "shape", "psnr", "ssim", "seconds", "output", "latent", "error")


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


def _stem(path: str | Path) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def check_output_dir(output_dir: str | Path) -> Path:
    """Create ``output_dir`` and prove that a file can be written there, so that a folder that is a
    file or read-only is refused before the first volume is computed."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output_dir '{path}' is a file; expected a folder (it is created if missing).")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise PermissionError(
            f"output_dir '{path}' cannot be written to ({e.strerror or e}); give a folder this user can write to."
        ) from e
    return path


def check_output_dtype(output_dtype: str | None) -> np.dtype | None:
    """``None`` (each input's own data type), or a NumPy integer or float type such as ``float32``."""
    if output_dtype is None or str(output_dtype).lower() in ("none", "null"):
        return None
    try:
        dtype = np.dtype(output_dtype)
    except TypeError:
        dtype = None
    if dtype is None or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ValueError(f"output_dtype must be null (each input's own type) or a number type such as float32, got {output_dtype!r}.")
    return dtype


def save_nifti_like(
    array: np.ndarray, affine: np.ndarray, path: str | Path, reference: str | Path, dtype: np.dtype | None = None
) -> None:
    """Write ``array`` (channels first) atomically as NIfTI in the manner of the ``reference`` file:
    its qform and sform codes (an MNI-space input, code 4, stays code 4), its spatial units, channels
    last as it stores them, and its data type unless ``dtype`` is given. To an integer type values are
    rounded and clipped to its range (for an input stored with a scale factor nibabel picks a new one)."""
    header = nib.load(str(reference)).header
    data = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    if dtype is None:
        dtype = header.get_data_dtype()
        if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
            dtype = np.dtype(np.float32)  # e.g. RGB or complex inputs
    slope, inter = header.get_slope_inter()
    scaled = slope not in (None, 1.0) or inter not in (None, 0.0)
    if np.issubdtype(dtype, np.integer) and not scaled:
        info = np.iinfo(dtype)
        data = np.clip(np.rint(data), info.min, info.max).astype(dtype)
    elif np.issubdtype(dtype, np.floating):
        data = data.astype(dtype)
    image = nib.Nifti1Image(data, affine)
    image.header.set_data_dtype(dtype)
    image.header.set_xyzt_units(*header.get_xyzt_units())
    image.set_qform(affine, code=int(header.get("qform_code", 0)))
    image.set_sform(affine, code=int(header.get("sform_code", 2)))
    with atomic_path(path) as tmp:
        nib.save(image, tmp)


class ResultsCSV:
    """The run's results table, a row per file, under a name claimed for this run alone (``name.csv``
    or ``name_1.csv``, ...: runs into one folder never share one) and rewritten atomically after each row."""

    def __init__(self, path: str | Path, fields: Sequence[str] = CSV_FIELDS) -> None:
        self.fields = tuple(fields)
        self.rows: list[dict] = []
        self.path = claim_path(path)
        self._write()

    def add(self, **row: Any) -> None:
        self.rows.append({k: row.get(k, "") for k in self.fields})
        self._write()

    def _write(self) -> None:
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


def _image_batch(batchdata: list[dict], device: torch.device, non_blocking: bool = False, **kwargs: Any) -> tuple:
    """``prepare_batch`` for one item of ``no_collation``: its image with a batch axis, and no label."""
    (item,) = batchdata
    return item["image"].as_tensor().unsqueeze(0).to(device, non_blocking=non_blocking), None


class ReconstructionEvaluator(SupervisedEvaluator):
    """Encode and decode every volume of ``val_data_loader`` (a :class:`SafeDataset` with batch size 1
    and ``no_collation``) and write each reconstruction in its input's own geometry, intensity units,
    header codes and data type (``output_dtype`` for another), optionally its latent ``z_mu``, and a
    CSV row of PSNR and SSIM (the measure of :mod:`scripts.metrics`, on the preprocessed volume;
    ``python -m scripts.evaluate`` takes it in the input's own grid) and seconds per file.

    The parts are MONAI's: the evaluator's own iteration runs the network through ``inferer``
    (:class:`TiledInferer`, so memory stays bounded) in eval mode without gradients; ``postprocessing``
    (the ``Invertd`` of the preprocessing) returns the result to the input's grid and units. What is
    added is per file: a file that fails any step becomes a row with its error and the next is
    processed, output names are claimed (``O_EXCL``) so concurrent runs into one ``output_dir`` never
    overwrite each other, and a log line shows progress (index/total, shape, seconds).
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
        output_dtype: str | None = None,
        amp_dtype: torch.dtype | None = None,
        val_handlers: Sequence | None = None,
    ) -> None:
        if save_latent not in (None, "nifti", "pt"):
            raise ValueError(f"save_latent must be null, 'nifti' or 'pt', got {save_latent!r}.")
        self.output_dtype = check_output_dtype(output_dtype)
        self.output_dir = check_output_dir(output_dir)
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            network=network,
            prepare_batch=_image_batch,
            inferer=inferer,
            postprocessing=None,  # applied per file in _iteration, where its failure is that file's row
            val_handlers=val_handlers,
            amp=amp_dtype is not None,
            amp_kwargs={"dtype": amp_dtype},
            decollate=False,
        )
        self.invert = postprocessing
        self.latent_inferer = latent_inferer or inferer
        self.save_latent = save_latent
        self.amp_dtype = amp_dtype
        self.results = ResultsCSV(self.output_dir / "reconstruction_metrics.csv")

    def _iteration(self, engine: Any, batchdata: list[dict]) -> dict:
        (item,) = batchdata
        start = time.perf_counter()
        if "error" in item:  # SafeDataset's record of a file refused by the checks or not loadable
            row = {"file": item["image_path"], "status": "failed", "error": item["error"]}
        else:
            row = {"file": item["image"].meta.get("filename_or_obj", ""), "shape": "x".join(map(str, item["image"].shape[1:]))}
            try:
                row.update(self._reconstruct(engine, batchdata))
            except Exception as e:
                row.update(status="failed", error=_root_cause(e))
        row["seconds"] = f"{time.perf_counter() - start:.3f}"
        self.results.add(**row)
        position = f"[{engine.state.iteration}/{engine.state.epoch_length}] {row['file']}"
        if row["status"] == "ok":
            logger.info(f"{position}: {row['shape']} voxels after preprocessing, PSNR {float(row['psnr']):.2f} dB, {float(row['seconds']):.1f} s -> {row['output']}")
        else:
            logger.error(f"{position}: {row['error']}")
        return row

    def _reconstruct(self, engine: Any, batchdata: list[dict]) -> dict:
        (item,) = batchdata
        path = item["image"].meta.get("filename_or_obj", "")
        output = super()._iteration(engine, batchdata)  # MONAI's: prepare_batch, eval mode, no_grad, autocast, inferer
        x, recon = output[CommonKeys.IMAGE], output[CommonKeys.PRED].float()
        quality = masked_quality(x, recon, body_mask(x))  # the bundle's measure, on the preprocessed grid
        out = self.invert({"image": item["image"], "pred": MetaTensor(recon[0].cpu())})["pred"]
        with claimed(self.output_dir / f"{_stem(path)}_recon.nii.gz") as target:
            save_nifti_like(out.numpy(), out.affine.numpy(), target, path, self.output_dtype)
        row = {"status": "ok", "psnr": f"{quality['psnr']:.4f}", "ssim": f"{quality['ssim']:.4f}", "output": str(target)}
        if self.save_latent is not None:
            row["latent"] = str(self._write_latent(x, item["image"], path))
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
        suffix = "pt" if self.save_latent == "pt" else "nii.gz"
        with claimed(self.output_dir / f"{_stem(path)}_latent.{suffix}") as target:
            if self.save_latent == "pt":
                save_atomic({"z_mu": z_mu, "affine": torch.as_tensor(affine)}, target)
            else:
                save_nifti_like(z_mu.numpy(), affine, target, path, np.dtype(np.float32))
        return target


class GenerationEvaluator(SupervisedEvaluator):
    """Sample one volume per item of ``val_data_loader`` (``{"index": i}``): noise of the latent shape
    from a generator seeded by ``(seed, i)``, ``num_inference_steps`` DDIM steps through
    ``LatentDiffusionInferer.sample`` (which divides by the latent scale factor saved with the
    diffusion model), decode, and write NIfTI with the training voxel spacing. With ``condition``,
    one of the model's ``classes``, the samples are of that class, guided by classifier-free
    guidance at ``guidance_scale`` (1: the conditioned prediction alone). The same seed writes the
    same volumes; output names are claimed, so no run overwrites another's."""

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
        num_inference_steps: int = 50,
        seed: int = 0,
        amp_dtype: torch.dtype | None = None,
        val_handlers: Sequence | None = None,
        condition: str | None = None,
        classes: Sequence[str] = (),
        guidance_scale: float = 3.0,
    ) -> None:
        self.label = check_condition(condition, classes)
        if self.label is not None and not float(guidance_scale) >= 1.0:
            raise ValueError(f"guidance_scale is {guidance_scale}; expected at least 1 (1: no guidance, 3: the default).")
        if not 1 <= int(num_inference_steps) <= scheduler.num_train_timesteps:  # with no step DDIM decodes the noise itself
            raise ValueError(
                f"num_inference_steps is {num_inference_steps}; it must be at least 1 and at most "
                f"{scheduler.num_train_timesteps}, the steps the model was trained with (num_train_timesteps)."
            )
        scheduler.set_timesteps(num_inference_steps=int(num_inference_steps))
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            network=network,
            inferer=inferer,
            val_handlers=val_handlers,
            decollate=False,
        )
        self.output_dir = check_output_dir(output_dir)
        self.autoencoder = autoencoder
        self.scheduler = scheduler
        self.latent_shape = tuple(latent_shape)
        self.spacing = tuple(spacing) if spacing is not None else (1.0,) * (len(self.latent_shape) - 1)
        self.seed = seed
        self.amp_dtype = amp_dtype
        self.condition = condition
        self.guidance_scale = float(guidance_scale)
        self.results = ResultsCSV(self.output_dir / "generated.csv")

    def _iteration(self, engine: Any, batchdata: list[dict]) -> dict:
        (item,) = batchdata
        index = int(item["index"])
        start = time.perf_counter()
        generator = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + index)
        noise = torch.randn((1, *self.latent_shape), generator=generator).to(self.state.device)
        self.network.eval()
        self.autoencoder.eval()
        guided = {}
        if self.label is not None:
            guided = dict(conditioning=torch.tensor([self.label], device=self.state.device), cfg=self.guidance_scale)
        with torch.no_grad(), autocast(self.state.device, self.amp_dtype):
            image = self.inferer.sample(
                input_noise=noise,
                autoencoder_model=self.autoencoder,
                diffusion_model=self.network,
                scheduler=self.scheduler,
                verbose=False,
                **guided,
            )
        volume = image.float().clamp(0, 1)[0, 0].cpu().numpy()
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = [-(n - 1) * s / 2 for n, s in zip(volume.shape, self.spacing)]
        name = f"sample_{self.condition}_seed{self.seed}_{index:04d}" if self.condition else f"sample_seed{self.seed}_{index:04d}"
        with claimed(self.output_dir / f"{name}.nii.gz") as output:
            save_nifti_atomic(volume, affine, output)
        self.results.add(file=str(index), status="ok", seconds=f"{time.perf_counter() - start:.3f}", output=str(output))
        logger.info(f"wrote {output}")
        return {}


def check_condition(condition: str | None, classes: Sequence[str]) -> int | None:
    """The class label of ``condition`` among the model's ``classes`` (None: unconditional), refusing a
    class the model does not know, or any class for an unconditional model."""
    if condition is None or (isinstance(condition, str) and condition.lower() in ("none", "null")):
        return None
    if not classes:
        raise ValueError(f"condition '{condition}' was given, but the diffusion model is unconditional (it records no classes).")
    if str(condition) not in list(classes):
        raise ValueError(f"condition '{condition}' is not a class of the diffusion model; its classes are {list(classes)}.")
    return list(classes).index(str(condition))


def finish(evaluator: Any) -> None:
    """End the run with a summary (volumes done and failed, where the table and the outputs are), and
    exit status 1 if any file failed (the table says why)."""
    failures = evaluator.results.failures
    total = len(evaluator.results.rows)
    logger.info(
        f"{total - len(failures)} of {total} done, {len(failures)} failed; "
        f"results in {evaluator.results.path}, outputs in {evaluator.output_dir}"
    )
    if failures:
        logger.error(f"{len(failures)} of {total} failed: " + "; ".join(f"{r['file']}: {r['error']}" for r in failures))
        raise SystemExit(1)
