"""The linear floor: a principal-component code of each cell of voxels, learned on the training
volumes, keeping as many values per cell as the autoencoder's latent has channels; scored with the
bundle's measure in each validation volume's own grid, beside the interpolation floor and beside the
two parameter-free codes of the latent shortcut (``pool`` and ``cosine``, as the network computes them).

A learned autoencoder that does not beat this linear code has not yet learned what a linear
transform gets in seconds. Run from the bundle root:
    python docs/study/linear_floor.py DATA_DIR      (DATA_DIR holds train/ and val/, see prepare_volumes.py)
    python docs/study/linear_floor.py DATA_DIR --cases 8:192,8:256      (other cells and latent sizes)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from scripts.metrics import PERCENTILES, interpolation_floor, score
from scripts.networks import cosine_basis, shortcut_factors

# (cell size per axis, values kept per cell): the latents of the shipped and earlier weights
CASES = ((4, 16), (4, 3), (8, 32), (8, 128), (16, 64), (16, 1024))
SAMPLES_PER_VOLUME = 20000
MAX_PCA_VALUES = 128  # a principal-component code of more values per cell is past this machine's memory


def load(path: Path) -> np.ndarray:
    array = np.asanyarray(nib.load(path).dataobj).astype(np.float32)
    return array[..., 0] if array.ndim == 4 else array


def cells(volume: np.ndarray, f: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """The volume (cropped to a multiple of ``f``) as one row of ``f**3`` values per cell."""
    shape = tuple(s - s % f for s in volume.shape)
    v = volume[: shape[0], : shape[1], : shape[2]]
    rows = v.reshape(shape[0] // f, f, shape[1] // f, f, shape[2] // f, f).transpose(0, 2, 4, 1, 3, 5)
    return rows.reshape(-1, f**3), shape


def uncells(rows: np.ndarray, shape: tuple[int, ...], f: int) -> np.ndarray:
    grid = rows.reshape(shape[0] // f, shape[1] // f, shape[2] // f, f, f, f).transpose(0, 3, 1, 4, 2, 5)
    return grid.reshape(shape)


def unit(volume: np.ndarray) -> tuple[np.ndarray, float, float]:
    low, high = (float(v) for v in np.percentile(volume, PERCENTILES))
    return (volume - low) / max(high - low, 1e-12), low, high


def pool_basis(f: int, k: int) -> np.ndarray:
    """The pool shortcut's code as an orthonormal basis (``f**3`` x ``k``): the averages over the
    sub-blocks that :func:`scripts.networks.shortcut_factors` chooses."""
    pool, keep = shortcut_factors((f,) * 3, 1, k)
    columns = []
    for index in np.ndindex(*keep):
        block = np.zeros((f, f, f))
        block[tuple(slice(i * p, (i + 1) * p) for i, p in zip(index, pool))] = 1.0
        columns.append(block.ravel() / np.sqrt(block.sum()))
    return np.stack(columns, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--cases", help='cell size and values kept, e.g. "8:192,8:256"; default: the latents of the shipped and earlier weights')
    args = parser.parse_args()
    cases = [tuple(int(v) for v in case.split(":")) for case in args.cases.split(",")] if args.cases else CASES
    rng = np.random.default_rng(0)
    train = sorted((args.data_dir / "train").glob("*.nii*"))
    val = sorted((args.data_dir / "val").glob("*.nii*"))
    for f, k in cases:
        codes = {"cosine": (cosine_basis((f,) * 3, 1, k).double().numpy() * f**1.5, 0.0)}
        try:
            codes["pool"] = (pool_basis(f, k), 0.0)
        except ValueError:  # no split of the cell into k sub-blocks (4x with 3 values)
            pass
        if k <= MAX_PCA_VALUES:
            samples = []
            for path in train:
                rows, _ = cells(unit(load(path))[0], f)
                samples.append(rows[rng.choice(len(rows), min(len(rows), SAMPLES_PER_VOLUME), replace=False)])
            x = np.concatenate(samples)
            mean = x.mean(0)
            codes["principal components"] = (np.linalg.svd(x - mean, full_matrices=False)[2][:k].T, mean)
        print(f"\n{f}x per axis, {k} of {f ** 3} values per cell: PSNR (dB) / SSIM / MAE of each code")
        print(f"| volume | {' | '.join(codes)} | interpolation floor (dB) |\n| --- |{' --- |' * (len(codes) + 1)}")
        for path in val:
            raw = load(path)
            scaled, low, high = unit(raw)
            rows, shape = cells(scaled, f)
            reference = raw[: shape[0], : shape[1], : shape[2]]
            results = []
            for basis, mean in codes.values():
                coded = uncells((rows - mean) @ basis @ basis.T + mean, shape, f) * (high - low) + low
                r = score(reference, coded)
                results.append(f"{r['psnr']:.2f} / {r['ssim']:.3f} / {r['mae']:.1f}")
            floor = score(reference, interpolation_floor(torch.from_numpy(reference.copy())[None, None], (f,) * 3)[0, 0].numpy())
            print(f"| {path.name} | {' | '.join(results)} | {floor['psnr']:.2f} |")

if __name__ == "__main__":
    main()
