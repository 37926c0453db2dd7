"""Prepare the quality study's volumes: the fixed train/validation split of docs/quality.md, each
volume cropped to its nonzero bounding box and stored as int16 (exact for integer sources; float
sources get an int16 scale slope, a quantisation step of 1/65000 of their range).

    python docs/study/prepare_volumes.py SOURCE_DIR OUT_DIR

Writes OUT_DIR/train/*.nii.gz and OUT_DIR/val/*.nii.gz. Geometry (affine) is kept, shifted to the crop.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np

VALIDATION = (
    "niivue_otsu_t1.nii.gz",  # T1 head, 1 mm
    "niivue_m2208_t2w.nii.gz",  # T2w head, 1 mm
    "pyradiomics_brain2_t1gd_aniso.nii.gz",  # contrast T1, 0.78 x 0.78 x 6.5 mm
    "totalseg_example_mr.nii.gz",  # abdominal MRI, 3 mm
    "monai_prostate_t2.nii.gz",  # prostate T2, 0.5 x 0.5 x 3 mm
    "sct_spine_t2.nii.gz",  # cervical spine T2, 1 mm
    "invesalius_cranium_head_ct.nii.gz",  # head CT, HU
)


def compact(src: Path, dst: Path) -> None:
    img = nib.load(str(src))
    data = np.asarray(img.dataobj)
    if data.ndim == 4:
        data = data[..., 0]
    nonzero = np.argwhere(data != data.min()) if data.min() < 0 else np.argwhere(data != 0)
    lo, hi = nonzero.min(0), nonzero.max(0) + 1
    data = data[tuple(slice(a, b) for a, b in zip(lo, hi))]
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ lo + img.affine[:3, 3]
    out = nib.Nifti1Image(data.astype(np.float32) if not np.allclose(data, np.round(data)) else data.astype(np.int16), affine)
    if out.get_data_dtype() == np.float32:
        out.set_data_dtype(np.int16)  # nibabel picks scl_slope/scl_inter for the range
    out.header.set_zooms(img.header.get_zooms()[:3])
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(dst))


def main(source: str, output: str) -> None:
    for src in sorted(Path(source).glob("*.nii.gz")):
        split = "val" if src.name in VALIDATION else "train"
        compact(src, Path(output) / split / src.name)
        print(split, src.name)


if __name__ == "__main__":
    main(*sys.argv[1:3])
