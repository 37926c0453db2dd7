"""Prepare the volumes of the generation study (docs/generation.md): the head MRI of the fixed split of
docs/data.md, each labelled with its contrast, resampled to at most 2 mm per axis (the grid the
diffusion model trains on; coarser axes are left to the bundle's own resampling) and stored as int16,
with a datalist JSON per split whose items carry the label under "class".

    python docs/study/prepare_generation.py SOURCE_DIR OUT_DIR

SOURCE_DIR holds the volumes of prepare_volumes.py (in any subfolder).
Writes OUT_DIR/train/ and OUT_DIR/val/, each with its volumes and datalist.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, Spacing

# head MRI, by contrast. T2 holds the T2-weighted and FLAIR volumes; EPI the echo-planar ones (b=0,
# BOLD, ASL, fMRI mean), which share their low resolution and distortion
CLASSES = {
    "train": {
        "T1": [
            "dcmqa_decubitus_t1_sag2d", "itk_KmeansTest_T1", "niivue_MR_Gd", "niivue_fs_norm",
            "niivue_vs_seg_t1c_ds2", "nilearn_mni152_2009a_t1", "vrd_seg3d_mr_head", "vrd_stroke_t1",
            "vtkdata_head_mr_volume",
        ],
        "T2": ["clinical_tutorial_t2", "niivue_FLAIR", "vrd_stroke_t2"],
        "EPI": [
            "dcmqa_toshiba_dti_b0", "dipy_aniso_vox_b0", "nibabel_example4d_epi_vol0", "niivue_dwi_b0",
            "niivue_fsl_mean_func", "niivue_mpld_asl_vol0",
        ],
    },
    "val": {"T1": ["niivue_otsu_t1", "pyradiomics_brain2_t1gd_aniso"], "T2": ["niivue_m2208_t2w"]},
}
MAX_SPACING = 2.0


def resample(src: Path, dst: Path) -> None:
    image = Compose([LoadImage(image_only=True), EnsureChannelFirst(), Orientation(axcodes="RAS", labels=None)])(str(src))
    spacing = [max(float(s), MAX_SPACING) for s in image.pixdim]
    image = Spacing(pixdim=spacing, mode="bilinear")(image.float())
    data = image[0].numpy()
    out = nib.Nifti1Image(data.astype(np.float32), np.asarray(image.affine, dtype=np.float64))
    out.set_data_dtype(np.int16)  # nibabel picks scl_slope/scl_inter for the range
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(dst))


def main(source: str, output: str) -> None:
    torch.set_num_threads(2)
    for split, classes in CLASSES.items():
        items = []
        for label, names in classes.items():
            for name in names:
                resample(next(Path(source).rglob(f"{name}.nii.gz")), Path(output) / split / f"{name}.nii.gz")
                items.append({"image": f"{name}.nii.gz", "class": label})
                print(split, label, name)
        (Path(output) / split / "datalist.json").write_text(json.dumps({"training": items}, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
