"""Data for the bundle: the demo phantoms, datalists, the train/val split and the checks that run
before any long work starts, so a bad file or key fails in seconds with its name."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import CacheDataset, Dataset, PersistentDataset, load_decathlon_datalist
from monai.data.utils import pickle_hashing
import torch
from monai.transforms import (
    CropForegroundd,
    DivisiblePadd,
    EnsureChannelFirstd,
    EnsureTyped,
    InvertibleTransform,
    LoadImaged,
    MapTransform,
    Orientationd,
    Spacingd,
)
from monai.transforms.utils_pytorch_numpy_unification import percentile
from monai.utils import TraceKeys
from scipy.ndimage import gaussian_filter
from scipy.ndimage import zoom as zoom_array

from scripts.io import atomic_path

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DEMO_SHAPES = ((64, 72, 56), (60, 68, 52), (56, 64, 48), (68, 76, 60))
DEMO_SPACINGS = ((2.0, 2.0, 2.0), (1.8, 1.8, 2.2), (2.2, 2.2, 2.0), (2.0, 2.0, 2.4))


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def save_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: str | Path) -> None:
    """Write a NIfTI file atomically (see :func:`scripts.io.atomic_path`)."""
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
    """The volumes to train on, as ``[{"image": path}, ...]``, each checked before training starts."""
    items = list_volumes(dataset_dir, demo_dir)
    for item in items:
        check_volume(item["image"], in_channels)
    return items


def list_volumes(dataset_dir: str | Path, demo_dir: str | Path | None = None) -> list[dict]:
    """The volumes of ``dataset_dir`` as ``[{"image": path}, ...]``.

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
    return [{k: v for k, v in item.items() if k != "label"} for item in items]  # "label" is a segmentation's


def class_names(datalist: Sequence[dict], condition_key: str | None) -> list[str]:
    """The classes of a class-conditioned diffusion model: the sorted values of ``condition_key`` in
    the datalist (e.g. ``"class": "T1"``); none when ``condition_key`` is None."""
    if not condition_key:
        return []
    missing = [str(item["image"]) for item in datalist if condition_key not in item]
    if missing:
        raise ValueError(
            f"condition_key is '{condition_key}', but {len(missing)} volume(s) have no '{condition_key}' in the datalist, "
            f"e.g. '{missing[0]}'; give every training volume its class (a datalist JSON item like "
            f'{{"image": "scan.nii.gz", "{condition_key}": "T1"}}), or set condition_key to null.'
        )
    return sorted({str(item[condition_key]) for item in datalist})


def with_class_index(datalist: Sequence[dict], condition_key: str | None, classes: Sequence[str]) -> list[dict]:
    """The datalist with each item's class as an integer label, ``class_index`` (its position in
    ``classes``); unchanged when the model is unconditional."""
    if not condition_key:
        return list(datalist)
    classes = list(classes)
    out = []
    for item in datalist:
        name = str(item.get(condition_key))
        if name not in classes:
            raise ValueError(f"volume '{item['image']}' has {condition_key} '{name}', which is not one of the classes {classes}.")
        out.append(dict(item, class_index=classes.index(name)))
    return out


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


def split_datalist(
    datalist: Sequence[dict], val_fraction: float, seed: int = 0, val_datalist: Sequence[dict] | None = None
) -> tuple[list[dict], list[dict]]:
    """The train/validation split: ``val_datalist`` when one is given, else ``val_fraction`` of the
    volumes, those whose file names hash lowest with ``seed`` (SHA-256). It depends on the names and
    the seed alone, not on a random generator whose output a NumPy upgrade may change, nor on where
    the folder lies, so a resumed run validates on the volumes the first run did."""
    if val_datalist is not None:
        return list(datalist), list(val_datalist)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}.")
    if len(datalist) < 2:
        raise ValueError(f"the dataset has {len(datalist)} volume(s); at least 2 are needed for a train/validation split.")

    def rank(i: int) -> tuple[str, str]:
        path = str(datalist[i]["image"])
        return hashlib.sha256(f"{seed}:{Path(path).name}".encode()).hexdigest(), path

    order = sorted(range(len(datalist)), key=rank)
    n_val = min(len(datalist) - 1, max(1, math.ceil(len(datalist) * val_fraction)))
    val = set(order[:n_val])
    return [d for i, d in enumerate(datalist) if i not in val], [d for i, d in enumerate(datalist) if i in val]


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


class UnitIntensityRanged(MapTransform, InvertibleTransform):
    """Map an intensity range linearly onto [0, 1]: per-volume percentiles for MRI (arbitrary units),
    a fixed HU window for CT.

    Nothing is clipped: values outside the range keep their distance beyond 0 or 1 (CT bone above the
    window, the brightest vessels of an MRI above p99.5), the network learns them like any other, and
    the inverse returns them in the input's own units. The range used is recorded with the image, so
    ``Invertd`` maps a reconstruction back.
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        modality: str = "mri",
        percentiles: Sequence[float] = (0.5, 99.5),
        ct_window: Sequence[float] = (-1000.0, 1000.0),
    ) -> None:
        super().__init__(keys)
        if modality not in ("mri", "ct"):
            raise ValueError(f"modality must be 'mri' (per-volume percentiles) or 'ct' (fixed HU window), got {modality!r}.")
        self.modality = modality
        self.percentiles = tuple(float(p) for p in percentiles)
        self.ct_window = tuple(float(w) for w in ct_window)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if self.modality == "mri":
                low, high = (float(percentile(image, q)) for q in self.percentiles)
            else:
                low, high = self.ct_window
            high = max(high, low + 1e-6)  # a constant volume maps to 0
            d[key] = (image - low) / (high - low)
            self.push_transform(d, key, extra_info={"low": low, "high": high})
        return d

    def inverse(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            info = self.pop_transform(d, key)[TraceKeys.EXTRA_INFO]
            d[key] = d[key] * (info["high"] - info["low"]) + info["low"]
        return d


def resampled_shape(path: str | Path, spacing: Sequence[float] | None) -> tuple[int, ...]:
    """The spatial shape a volume will have after ``Orientationd`` (RAS) and ``Spacingd(pixdim=spacing)``,
    from its header alone (``Spacingd``'s own rule, :func:`monai.data.utils.compute_shape_offset`:
    the extent between voxel centres over the new spacing, plus one); its own shape for ``spacing`` None."""
    image = nib.load(str(path))
    shape = image.shape[:3]
    if spacing is None:
        return tuple(int(s) for s in shape)
    zooms = np.linalg.norm(image.affine[:3, :3], axis=0)
    ras_axis = nib.orientations.io_orientation(image.affine)[:, 0].astype(int)  # axis i goes to RAS axis ras_axis[i]
    resampled = [0, 0, 0]
    for n, z, a in zip(shape, zooms, ras_axis):
        resampled[a] = int(np.round((n - 1) * z / float(spacing[a]) + 1))
    return tuple(resampled)


class CheckVolumed(MapTransform):
    """Refuse, by its path and from its header only (before anything is loaded), a volume that is not
    3D, has the wrong number of channels, or would exceed ``max_voxels`` once resampled to ``spacing``."""

    def __init__(
        self,
        keys: str | Sequence[str],
        in_channels: int = 1,
        spacing: Sequence[float] | None = None,
        max_voxels: int | None = None,
    ) -> None:
        super().__init__(keys)
        self.in_channels = in_channels
        self.spacing = spacing
        self.max_voxels = max_voxels

    def __call__(self, data: Mapping) -> Mapping:
        for key in self.key_iterator(data):
            shape = check_volume(data[key], self.in_channels)
            if self.max_voxels is not None:
                resampled = resampled_shape(data[key], self.spacing)
                voxels = math.prod(resampled) * self.in_channels
                if voxels > self.max_voxels:
                    at = f" at spacing {list(self.spacing)} mm" if self.spacing is not None else ""
                    raise ValueError(
                        f"volume '{data[key]}' ({'x'.join(map(str, shape))} voxels) would be {'x'.join(map(str, resampled))}"
                        f"{at}: {voxels:,} voxels, more than max_voxels ({self.max_voxels:,}). "
                        f"Use a coarser spacing, or raise max_voxels if this machine has the memory for it."
                    )
        return data


class CheckIntensityd(MapTransform):
    """Refuse, naming its file, a loaded volume that holds NaN or infinite values, or one value
    throughout (an all-zero or constant volume has nothing to reconstruct or learn, and its [0, 1]
    mapping would be empty)."""

    def __call__(self, data: Mapping) -> Mapping:
        for key in self.key_iterator(data):
            image = torch.as_tensor(data[key])
            name = getattr(data[key], "meta", {}).get("filename_or_obj", key)
            if not torch.isfinite(image).all():
                raise ValueError(f"volume '{name}' contains NaN or infinite values.")
            low, high = torch.aminmax(image)
            if low == high:
                raise ValueError(f"volume '{name}' is constant (every voxel is {low.item():g}); expected an image with contrast.")
        return data


def _spacing(spacing: Sequence[float] | str | None) -> Sequence[float] | None:
    """``spacing`` as given on the command line, which cannot pass None: the strings none/null stand for it."""
    return None if isinstance(spacing, str) and spacing.lower() in ("none", "null") else spacing


def preprocessing(
    in_channels: int,
    spacing: Sequence[float] | None,
    modality: str,
    percentiles: Sequence[float],
    ct_window: Sequence[float],
    multiple: Sequence[int],
    keys: str = "image",
    max_voxels: int | None = None,
) -> list:
    """The one preprocessing chain of training, validation and inference: check, load, channel
    first, RAS, optional resampling, intensity range to [0, 1] (unclipped), foreground crop, pad to
    the network's multiple. Every step is invertible, so reconstructions return to the input's
    geometry and units. With ``max_voxels``, a volume larger than that once resampled is refused
    from its header, before it is loaded."""
    spacing = _spacing(spacing)
    transforms = [
        CheckVolumed(keys, in_channels, spacing, max_voxels),
        LoadImaged(keys, image_only=True),
        CheckIntensityd(keys),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS", labels=None),
    ]
    if spacing is not None:
        transforms.append(Spacingd(keys, pixdim=spacing, mode="bilinear"))
    transforms += [
        UnitIntensityRanged(keys, modality, percentiles, ct_window),
        CropForegroundd(keys, source_key=keys, allow_smaller=True),
        DivisiblePadd(keys, k=multiple),
        EnsureTyped(keys, dtype=torch.float32),
    ]
    return transforms


CACHES = ("memory", "gpu", "disk", "none")


def _check_cache(cache: str) -> None:
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {', '.join(map(repr, CACHES))}, got {cache!r}.")


def make_dataset(
    data: Sequence[dict], transform, cache: str = "memory", cache_dir: str | None = None, num_workers: int = 0, copy_cache: bool = True
):
    """A MONAI dataset with the configured caching: ``memory`` or ``gpu`` (CacheDataset; with ``gpu``
    the transforms end their deterministic part on the GPU: :func:`cache_placement`), ``disk``
    (PersistentDataset) or ``none``. ``copy_cache`` is CacheDataset's: False skips the copy of each
    cached volume before the random transforms, for transforms that never write into their input (a
    random crop, whose view the loader's collation copies)."""
    _check_cache(cache)
    if cache in ("memory", "gpu"):
        return CacheDataset(data, transform, num_workers=num_workers or None, progress=False, copy_cache=copy_cache)
    if cache == "disk":
        if not cache_dir:
            raise ValueError("cache 'disk' needs cache_dir, a folder for PersistentDataset's files.")
        # the transforms' settings are part of the cache key, so a cache written with other factors,
        # spacing or intensity settings is never read back
        return PersistentDataset(data, transform, cache_dir=cache_dir, hash_transform=pickle_hashing)
    return Dataset(data, transform)  # cache 'none'


def cache_placement(cache: str, device: torch.device | str, num_workers: int = 0, keys: str = "image") -> list:
    """The transform that puts the cached volumes where ``cache`` says: for ``gpu``, on ``device``, so
    that the random crop and the collation of each batch run there and the step does not wait for
    the host (MONAI's fast-training recipe: CacheDataset, then ToDevice); otherwise nothing. Data
    loading worker processes cannot reach a GPU's memory, so ``gpu`` needs ``num_workers`` 0."""
    _check_cache(cache)
    if cache != "gpu":
        return []
    if num_workers:
        raise ValueError(f"cache 'gpu' keeps the volumes in GPU memory, which data-loading worker processes cannot "
                         f"reach: set num_workers 0 (got {num_workers}); the crops then run on the GPU.")
    return [EnsureTyped(keys, device=torch.device(device))]


def cached_bytes(datalist: Sequence[dict], spacing: Sequence[float] | str | None, in_channels: int = 1,
                 multiple: Sequence[int] = (1, 1, 1), patch: Sequence[int] = (1, 1, 1), key: str = "image") -> int:
    """At most how many bytes the cached training volumes take (float32, resampled to ``spacing``,
    padded to ``multiple`` and to at least ``patch``, before the foreground crop, which only shrinks
    them), from the headers alone: what a ``gpu`` cache takes from the memory that training has."""
    spacing = _spacing(spacing)
    total = 0
    for item in datalist:
        shape = resampled_shape(item[key], spacing)
        total += math.prod(max(-(-n // m) * m, p) for n, m, p in zip(shape, multiple, patch)) * in_channels * 4
    return total
