"""Data for the bundle: the demo phantoms, datalists, the train/val split and the checks that run
before any long work starts, so a bad file or key fails in seconds with its name."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import CacheDataset, Dataset, PersistentDataset, load_decathlon_datalist
from monai.transforms import MapTransform, ScaleIntensityRanged, ScaleIntensityRangePercentilesd
from scipy.ndimage import gaussian_filter
from scipy.ndimage import zoom as zoom_array

from scripts.checkpoints import atomic_path

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DEMO_SHAPES = ((64, 72, 56), (60, 68, 52), (56, 64, 48), (68, 76, 60))
DEMO_SPACINGS = ((2.0, 2.0, 2.0), (1.8, 1.8, 2.2), (2.2, 2.2, 2.0), (2.0, 2.0, 2.4))


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def save_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: str | Path) -> None:
    """Write a NIfTI file atomically (see :func:`scripts.checkpoints.atomic_path`)."""
    with atomic_path(path) as tmp:
        nib.save(nib.Nifti1Image(array, affine), tmp)


def _phantom(shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """A head-like phantom: skull, brain, ventricles and a few blobs as nested ellipsoids, with smooth
    texture and noise, in millimetres so that different spacings describe the same anatomy."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    half = np.array([n * s for n, s in zip(shape, spacing)]) / 2
    radii = half * rng.uniform(0.78, 0.88, size=3)

    def ellipsoid(scale: float, centre=(0.0, 0.0, 0.0), r=None) -> np.ndarray:
        r = radii * scale if r is None else np.asarray(r)
        return ((x - centre[0]) / r[0]) ** 2 + ((y - centre[1]) / r[1]) ** 2 + ((z - centre[2]) / r[2]) ** 2 <= 1

    image = np.zeros(shape, dtype=np.float32)
    image[ellipsoid(1.0)] = 0.9  # scalp and skull
    image[ellipsoid(0.92)] = 0.25  # cerebrospinal fluid
    image[ellipsoid(0.86)] = 0.6  # grey matter
    image[ellipsoid(0.7)] = 0.75  # white matter
    for side in (-1, 1):  # ventricles
        image[ellipsoid(0, centre=(side * radii[0] * 0.18, 0, radii[2] * 0.1), r=radii * [0.12, 0.35, 0.18])] = 0.2
    for _ in range(3):  # lesions of random size and contrast
        centre = rng.uniform(-0.45, 0.45, size=3) * radii
        image[ellipsoid(0, centre=centre, r=radii * rng.uniform(0.05, 0.12, size=3))] = rng.uniform(0.3, 1.0)
    texture = rng.normal(size=[max(2, n // 6) for n in shape]).astype(np.float32)
    zoom = [n / t for n, t in zip(shape, texture.shape)]
    texture = zoom_array(texture, zoom, order=3)[tuple(slice(0, n) for n in shape)]
    image *= 1.0 + 0.08 * texture
    image = gaussian_filter(image, sigma=0.6)
    image += rng.normal(scale=0.02, size=shape).astype(np.float32)
    return np.clip(image, 0, None) * 1000.0  # an MRI-like arbitrary intensity scale


def make_demo_dataset(dataset_dir: str | Path, num_volumes: int = 8, seed: int = 0) -> list[str]:
    """Write the deterministic demo phantoms into ``dataset_dir`` (skipping those already there)."""
    dataset_dir = Path(dataset_dir)
    paths = []
    for i in range(num_volumes):
        path = dataset_dir / f"phantom_{i:03d}.nii.gz"
        paths.append(str(path))
        if path.exists():
            continue
        rng = np.random.default_rng(seed + i)
        shape, spacing = DEMO_SHAPES[i % len(DEMO_SHAPES)], DEMO_SPACINGS[i % len(DEMO_SPACINGS)]
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = [-(n - 1) * s / 2 for n, s in zip(shape, spacing)]  # centred, RAS
        save_nifti_atomic(_phantom(shape, spacing, rng).astype(np.float32), affine, path)
    logger.info(f"demo dataset: {num_volumes} phantoms in {dataset_dir}")
    return paths


def load_datalist(dataset_dir: str | Path, in_channels: int = 1, demo_dir: str | Path | None = None) -> list[dict]:
    """The volumes to use, as ``[{"image": path}, ...]``, checked before any training starts.

    ``dataset_dir`` is a folder of ``*.nii``/``*.nii.gz`` volumes, a folder holding one datalist JSON in
    the Medical Segmentation Decathlon form, or that JSON itself. If it is ``demo_dir``, the demo
    phantoms are written there first.
    """
    root = Path(dataset_dir)
    if demo_dir is not None and root.resolve() == Path(demo_dir).resolve():
        make_demo_dataset(root)
    if not root.exists():
        raise FileNotFoundError(
            f"dataset_dir '{root}' does not exist; expected a folder of .nii/.nii.gz volumes or a datalist JSON."
        )
    if root.is_file():
        items = _read_datalist_json(root)
    else:
        jsons = sorted(p for p in root.glob("*.json") if _has_training_key(p))
        if len(jsons) > 1:
            raise ValueError(f"dataset_dir '{root}' holds several datalist JSONs {[p.name for p in jsons]}; keep one.")
        if jsons:
            items = _read_datalist_json(jsons[0])
        else:
            items = [{"image": str(p)} for p in sorted(root.iterdir()) if _is_nifti(p)]
    if not items:
        raise ValueError(f"dataset_dir '{root}' holds no .nii/.nii.gz volumes and no datalist JSON with a 'training' list.")
    for item in items:
        check_volume(item["image"], in_channels)
    return items


def _has_training_key(path: Path) -> bool:
    try:
        return "training" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def _read_datalist_json(path: Path) -> list[dict]:
    try:
        items = load_decathlon_datalist(str(path), is_segmentation=False, data_list_key="training")
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"datalist '{path}' is not a Decathlon datalist with a 'training' list: {e}") from e
    for i, item in enumerate(items):
        if "image" not in item:
            raise ValueError(f"datalist '{path}': training[{i}] has no 'image' key: {item}.")
    return [{"image": item["image"]} for item in items]


def check_volume(path: str | Path, in_channels: int = 1) -> tuple[int, ...]:
    """Read a NIfTI header and refuse what training cannot use; returns the spatial shape."""
    try:
        header = nib.load(str(path)).header
        shape = tuple(int(s) for s in header.get_data_shape())
    except FileNotFoundError:
        raise FileNotFoundError(f"volume '{path}' listed in the dataset does not exist.") from None
    except Exception as e:
        raise ValueError(f"volume '{path}' is not a readable NIfTI file: {e}") from e
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) < 3:
        raise ValueError(f"volume '{path}' has shape {shape}; expected a 3D volume (or 4D with channels last).")
    if len(shape) > 4:
        raise ValueError(f"volume '{path}' has shape {shape}; expected at most 4 dimensions (x, y, z, channels).")
    channels = shape[3] if len(shape) == 4 else 1
    if channels != in_channels:
        raise ValueError(f"volume '{path}' has {channels} channels (shape {shape}), but in_channels is {in_channels}.")
    return shape[:3]


def split_datalist(datalist: Sequence[dict], val_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A deterministic train/validation split: the same datalist, fraction and seed give the same split."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}.")
    if len(datalist) < 2:
        raise ValueError(f"the dataset has {len(datalist)} volume(s); at least 2 are needed for a train/validation split.")
    order = np.random.default_rng(seed).permutation(len(datalist))
    n_val = min(len(datalist) - 1, max(1, math.ceil(len(datalist) * val_fraction)))
    val = [datalist[i] for i in sorted(order[:n_val])]
    train = [datalist[i] for i in sorted(order[n_val:])]
    return train, val


def check_patch_size(patch_size: Sequence[int], multiple: Sequence[int], spatial_dims: int = 3) -> list[int]:
    """Refuse a ``patch_size`` the network cannot encode, naming the key and the required multiple."""
    if len(patch_size) != spatial_dims or any(int(p) != p or p < 1 for p in patch_size):
        raise ValueError(f"patch_size must be {spatial_dims} positive integers, got {list(patch_size)!r}.")
    if any(p % m for p, m in zip(patch_size, multiple)):
        raise ValueError(
            f"patch_size {list(patch_size)} is not divisible by {list(multiple)}, the total downsampling factor per "
            f"axis of downsample_factors; use multiples of it, e.g. {[math.ceil(p / m) * m for p, m in zip(patch_size, multiple)]}."
        )
    return [int(p) for p in patch_size]


def intensity_transform(
    keys: str | Sequence[str],
    modality: str,
    percentiles: Sequence[float] = (0.5, 99.5),
    ct_window: Sequence[float] = (-1000.0, 1000.0),
) -> MapTransform:
    """Intensity normalisation to [0, 1]: per-volume percentiles for MRI, a fixed HU window for CT."""
    if modality == "mri":
        lower, upper = percentiles
        return ScaleIntensityRangePercentilesd(keys, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True)
    if modality == "ct":
        a_min, a_max = ct_window
        return ScaleIntensityRanged(keys, a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True)
    raise ValueError(f"modality must be 'mri' (per-volume percentiles) or 'ct' (fixed HU window), got {modality!r}.")


def make_dataset(data: Sequence[dict], transform, cache: str = "memory", cache_dir: str | None = None, num_workers: int = 0):
    """A MONAI dataset with the configured caching: ``memory`` (CacheDataset), ``disk`` (PersistentDataset) or ``none``."""
    if cache == "memory":
        return CacheDataset(data, transform, num_workers=num_workers or None, progress=False)
    if cache == "disk":
        if not cache_dir:
            raise ValueError("cache 'disk' needs cache_dir, a folder for PersistentDataset's files.")
        return PersistentDataset(data, transform, cache_dir=cache_dir)
    if cache == "none":
        return Dataset(data, transform)
    raise ValueError(f"cache must be 'memory', 'disk' or 'none', got {cache!r}.")
