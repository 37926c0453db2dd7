"""Tests for scripts/data.py: the demo phantoms, datalists, the split, the early checks and the
(invertible) preprocessing chain. Volumes are ~30^3 voxels, so the file runs in a few seconds."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from conftest import affine_for, error_text, phantom, write_volume
from scripts import data
from scripts.data import (
    DEMO_SHAPES,
    DEMO_SPACINGS,
    UnitIntensityRanged,
    check_patch_size,
    list_volumes,
    load_datalist,
    make_demo_dataset,
    split_datalist,
)

# ---------------------------------------------------------------------------------------------
# the demo dataset


def test_demo_dataset_is_deterministic_with_real_geometry(tmp_path):
    first = make_demo_dataset(tmp_path / "a", num_volumes=4)
    second = make_demo_dataset(tmp_path / "b", num_volumes=4)
    assert [Path(p).name for p in first] == [f"phantom_{i:03d}.nii.gz" for i in range(4)]
    for i, (a, b) in enumerate(zip(first, second)):
        assert Path(a).read_bytes() == Path(b).read_bytes(), f"demo volume {i} differs between two writes"
        img = nib.load(a)
        array = np.asarray(img.dataobj)
        # each of the four volumes has its own size and voxel size
        assert array.shape == DEMO_SHAPES[i]
        np.testing.assert_allclose(img.header.get_zooms()[:3], DEMO_SPACINGS[i], rtol=1e-6)
        assert not np.allclose(img.affine, np.eye(4)), "the demo affine should carry spacing and origin"
        np.testing.assert_allclose(np.diag(img.affine)[:3], DEMO_SPACINGS[i], rtol=1e-6)
        assert np.isfinite(array).all() and array.max() > 100 and array.min() >= 0  # an MRI-like scale, not empty
    # the four volumes are different phantoms, not copies
    arrays = [np.asarray(nib.load(p).dataobj) for p in first]
    assert len({a.shape for a in arrays}) == 4
    assert len({DEMO_SPACINGS[i] for i in range(4)}) == 4


def test_demo_dataset_keeps_existing_files(tmp_path):
    existing = tmp_path / "phantom_000.nii.gz"
    existing.write_bytes(b"a user's own file")
    paths = make_demo_dataset(tmp_path, num_volumes=2)
    assert existing.read_bytes() == b"a user's own file", "an existing file was overwritten"
    assert Path(paths[1]).is_file() and nib.load(paths[1]).shape == DEMO_SHAPES[1]


def test_demo_dir_is_filled_on_first_use(tmp_path):
    demo = tmp_path / "demo"
    items = list_volumes(demo, demo_dir=demo)
    assert len(items) == 8 and all(Path(i["image"]).is_file() for i in items)


# ---------------------------------------------------------------------------------------------
# datalists


def test_folder_of_nii_and_nii_gz(tmp_path):
    write_volume(tmp_path / "b.nii", phantom(seed=1))
    write_volume(tmp_path / "a.nii.gz", phantom(seed=2))
    (tmp_path / "notes.txt").write_text("not a volume")
    (tmp_path / "other.json").write_text(json.dumps({"labels": {}}))  # not a datalist: ignored
    (tmp_path / "sub").mkdir()
    items = load_datalist(tmp_path)
    assert items == [{"image": str(tmp_path / "a.nii.gz")}, {"image": str(tmp_path / "b.nii")}]
    assert list_volumes(tmp_path) == items


@pytest.fixture
def msd_folder(tmp_path):
    folder = tmp_path / "Task01"
    write_volume(folder / "imagesTr" / "case_1.nii.gz", phantom(seed=1))
    write_volume(folder / "imagesTr" / "case_2.nii.gz", phantom(seed=2))
    write_volume(folder / "imagesTr" / "unlisted.nii.gz", phantom(seed=3))  # only the JSON's list counts
    listing = {
        "name": "tiny",
        "training": [{"image": "imagesTr/case_2.nii.gz"}, {"image": "imagesTr/case_1.nii.gz", "label": "x"}],
        "test": ["imagesTs/none.nii.gz"],
    }
    (folder / "dataset.json").write_text(json.dumps(listing))
    return folder


def test_msd_datalist_in_folder_and_as_path(msd_folder):
    expected = [
        {"image": str(msd_folder / "imagesTr" / "case_2.nii.gz")},
        {"image": str(msd_folder / "imagesTr" / "case_1.nii.gz")},
    ]
    assert load_datalist(msd_folder) == expected  # paths relative to the JSON's folder, in the JSON's order
    assert load_datalist(msd_folder / "dataset.json") == expected
    assert all(Path(item["image"]).is_file() for item in expected)


def test_msd_datalist_from_another_working_directory(msd_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    items = load_datalist(os.path.relpath(msd_folder / "dataset.json", tmp_path))
    assert all(Path(item["image"]).is_file() for item in items)


def test_msd_datalist_entry_without_image(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"label": "x.nii.gz"}]}))
    with pytest.raises(ValueError, match=r"dataset\.json.*training\[0\].*'image'"):
        list_volumes(tmp_path)


def test_msd_datalist_pointing_at_missing_file(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": "gone.nii.gz"}]}))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "gone.nii.gz"))):
        load_datalist(tmp_path)


def test_two_datalists_are_refused(tmp_path):
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text(json.dumps({"training": []}))
    with pytest.raises(ValueError, match=r"several datalist JSONs.*a\.json.*b\.json"):
        list_volumes(tmp_path)


def test_missing_dataset_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        load_datalist(missing)
    message = str(info.value)
    assert "dataset_dir" in message and str(missing) in message and ".nii" in message


def test_empty_dataset_dir(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(ValueError) as info:
        load_datalist(tmp_path)
    message = str(info.value)
    assert "dataset_dir" in message and str(tmp_path) in message and "no .nii/.nii.gz volumes" in message


def test_unreadable_file_is_named(tmp_path):
    write_volume(tmp_path / "good.nii.gz", phantom())
    bad = tmp_path / "junk.nii.gz"
    bad.write_bytes(b"\x00not a nifti at all" * 20)
    with pytest.raises(ValueError) as info:
        load_datalist(tmp_path)
    assert str(bad) in str(info.value) and "not a readable NIfTI" in str(info.value)


def test_truncated_nifti_is_named(tmp_path):
    good = write_volume(tmp_path / "a.nii", phantom())
    truncated = tmp_path / "b.nii"
    truncated.write_bytes(good.read_bytes()[:200])  # half a header
    with pytest.raises(ValueError, match=re.escape(str(truncated))):
        load_datalist(tmp_path)


def test_4d_volume_with_more_channels_than_in_channels(tmp_path):
    path = write_volume(tmp_path / "two.nii.gz", np.stack([phantom(), phantom(seed=1)], axis=-1))
    with pytest.raises(ValueError) as info:
        load_datalist(tmp_path, in_channels=1)
    message = str(info.value)
    assert str(path) in message and "2 channels" in message and "in_channels is 1" in message
    # the same volume is fine for a two-channel network, and a trailing singleton axis is one channel
    assert load_datalist(tmp_path, in_channels=2) == [{"image": str(path)}]
    single = write_volume(tmp_path / "one" / "one.nii.gz", phantom()[..., None])
    assert data.check_volume(single, 1) == phantom().shape


def test_2d_image_is_refused(tmp_path):
    path = write_volume(tmp_path / "slice.nii.gz", phantom()[:, :, 10], affine=np.eye(4))
    with pytest.raises(ValueError) as info:
        load_datalist(tmp_path)
    assert str(path) in str(info.value) and "expected a 3D volume" in str(info.value)


# ---------------------------------------------------------------------------------------------
# the split


def _items(n):
    return [{"image": f"/data/v{i:02d}.nii.gz"} for i in range(n)]


@pytest.mark.parametrize("n, fraction, n_val", [(2, 0.25, 1), (4, 0.25, 1), (10, 0.2, 2), (10, 0.25, 3), (7, 0.9, 6)])
def test_split_is_deterministic_disjoint_covering(n, fraction, n_val):
    items = _items(n)
    train, val = split_datalist(items, fraction, seed=3)
    assert (train, val) == split_datalist(items, fraction, seed=3)
    assert len(val) == n_val and len(train) == n - n_val
    names_train, names_val = {i["image"] for i in train}, {i["image"] for i in val}
    assert not names_train & names_val
    assert names_train | names_val == {i["image"] for i in items}


def test_split_depends_on_seed():
    items = _items(20)
    splits = {tuple(i["image"] for i in split_datalist(items, 0.25, seed=s)[1]) for s in range(5)}
    assert len(splits) > 1


def test_split_is_pinned_by_the_file_names_alone(monkeypatch):
    """The split is a hash of each file name and the seed: the same volumes validate whatever the
    order of the list, the folder it lies in or the NumPy version (its generator is not used: a
    NumPy upgrade once could move validation volumes into training on resume)."""
    items = _items(10)
    expected = ["/data/v02.nii.gz", "/data/v08.nii.gz", "/data/v09.nii.gz"]  # SHA-256 of "0:v02.nii.gz" etc.
    assert [i["image"] for i in split_datalist(items, 0.25, seed=0)[1]] == expected
    moved = [{"image": i["image"].replace("/data/", "/elsewhere/")} for i in reversed(items)]
    assert sorted(i["image"].split("/")[-1] for i in split_datalist(moved, 0.25, seed=0)[1]) == [p.split("/")[-1] for p in expected]
    monkeypatch.setattr(np.random, "default_rng", None)  # no NumPy generator involved
    assert [i["image"] for i in split_datalist(items, 0.25, seed=0)[1]] == expected


def test_split_keeps_a_given_validation_list():
    train, val = split_datalist(_items(3), 0.25, val_datalist=[{"image": "/val/a.nii.gz"}])
    assert train == _items(3) and val == [{"image": "/val/a.nii.gz"}]


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1])
def test_split_refuses_bad_fraction(fraction):
    with pytest.raises(ValueError, match=r"val_fraction must be between 0 and 1.*" + re.escape(repr(fraction))):
        split_datalist(_items(4), fraction)


def test_split_refuses_a_single_volume():
    with pytest.raises(ValueError, match=r"1 volume\(s\); at least 2"):
        split_datalist(_items(1), 0.25)


# ---------------------------------------------------------------------------------------------
# patch size


def test_check_patch_size():
    assert check_patch_size([16, 16, 8], (8, 8, 4)) == [16, 16, 8]
    with pytest.raises(ValueError) as info:
        check_patch_size([16, 16, 12], (8, 8, 8))
    message = str(info.value)
    assert "patch_size [16, 16, 12]" in message and "[8, 8, 8]" in message and "[16, 16, 16]" in message
    with pytest.raises(ValueError, match="patch_size must be 3 positive integers"):
        check_patch_size([16, 16], (4, 4, 4))
    with pytest.raises(ValueError, match="patch_size must be 3 positive integers"):
        check_patch_size([16, 0, 16], (4, 4, 4))


# ---------------------------------------------------------------------------------------------
# intensity normalisation and the preprocessing chain


def _meta_image(array, affine=None):
    return MetaTensor(torch.as_tensor(array)[None], affine=torch.as_tensor(affine if affine is not None else np.eye(4)))


@pytest.mark.parametrize("modality", ["mri", "ct"])
def test_unit_intensity_range_and_its_inverse(modality):
    rng = np.random.default_rng(0)
    if modality == "mri":
        array = rng.gamma(2.0, 300.0, size=(12, 14, 10)).astype(np.float32)
        low, high = np.percentile(array, [0.5, 99.5])
    else:
        array = rng.uniform(-1500, 2500, size=(12, 14, 10)).astype(np.float32)
        low, high = -1000.0, 1000.0
    scale = UnitIntensityRanged("image", modality=modality, percentiles=(0.5, 99.5), ct_window=(-1000, 1000))
    out = scale({"image": _meta_image(array)})
    image = out["image"]
    # [low, high] maps onto [0, 1] linearly and nothing is clipped: values beyond the range lie beyond 0 and 1
    expected = (array - low) / (high - low)
    np.testing.assert_allclose(image[0].numpy(), expected, atol=1e-5)
    assert float(image.min()) < 0.0 and float(image.max()) > 1.0

    out["pred"] = MetaTensor(image.clone())
    restored = Invertd(keys="pred", transform=scale, orig_keys="image")(out)["pred"]
    # the inverse restores every intensity, in range or not
    np.testing.assert_allclose(restored[0].numpy(), array, rtol=1e-5, atol=1e-3 * (high - low))


def test_unit_intensity_range_keeps_mri_values_above_p99_5_exactly():
    """A bright vessel above p99.5 survives the mapping and its inverse (no clipping)."""
    array = np.random.default_rng(1).uniform(0, 100, size=(10, 10, 10)).astype(np.float32)
    array[5, 5, 5] = 5000.0  # far above p99.5
    scale = UnitIntensityRanged("image", modality="mri")
    out = scale({"image": _meta_image(array)})
    low, high = np.percentile(array, [0.5, 99.5])
    assert float(out["image"][0, 5, 5, 5]) == pytest.approx((5000.0 - low) / (high - low), rel=1e-5)
    assert float(out["image"][0, 5, 5, 5]) > 40  # far beyond 1
    out["pred"] = MetaTensor(out["image"].clone())
    restored = Invertd(keys="pred", transform=scale, orig_keys="image")(out)["pred"][0].numpy()
    assert abs(float(restored[5, 5, 5]) - 5000.0) < 1e-3
    np.testing.assert_allclose(restored, array, atol=1e-3)


def test_unit_intensity_range_keeps_ct_bone_above_the_window_exactly():
    """3000 HU (dense bone, metal) with a [-1000, 1000] window maps to 2.0 and comes back as 3000."""
    array = np.full((6, 6, 6), -1000.0, np.float32)
    array[2:4, 2:4, 2:4] = 40.0
    array[3, 3, 3] = 3000.0
    scale = UnitIntensityRanged("image", modality="ct", ct_window=(-1000, 1000))
    out = scale({"image": _meta_image(array)})
    assert float(out["image"][0, 3, 3, 3]) == pytest.approx(2.0, abs=1e-6)
    assert float(out["image"][0, 0, 0, 0]) == pytest.approx(0.0, abs=1e-6)
    out["pred"] = MetaTensor(out["image"].clone())
    restored = Invertd(keys="pred", transform=scale, orig_keys="image")(out)["pred"][0].numpy()
    assert abs(float(restored[3, 3, 3]) - 3000.0) < 1e-3
    np.testing.assert_allclose(restored, array, atol=1e-3)


def test_unit_intensity_range_constant_volume_maps_to_zero():
    out = UnitIntensityRanged("image")({"image": _meta_image(np.full((4, 4, 4), 7.0, np.float32))})
    assert torch.isfinite(out["image"]).all() and float(out["image"].abs().max()) == 0.0


def test_unit_intensity_range_refuses_unknown_modality():
    with pytest.raises(ValueError, match="modality must be 'mri'.*'pet'"):
        UnitIntensityRanged("image", modality="pet")


@pytest.mark.parametrize("spacing", [None, (4.0, 4.0, 4.0)])
def test_preprocessing_and_invert_restore_shape_and_affine(tmp_path, spacing):
    shape = (30, 34, 26)
    array = phantom(shape, (1.8, 1.8, 2.2), seed=5)
    # a flipped x axis (LAS) and a shifted origin: Orientationd to RAS must be undone too
    affine = affine_for(shape, (1.8, 1.8, 2.2), origin_shift=(4.0, -3.0, 2.0))
    affine[0, 0] = -1.8
    path = write_volume(tmp_path / "in.nii.gz", array, affine=affine)
    multiple = (4, 4, 2)
    chain = Compose(data.preprocessing(1, spacing, "mri", (0.5, 99.5), (-1000, 1000), multiple))
    item = chain({"image": str(path)})
    image = item["image"]
    assert image.shape[0] == 1 and all(s % m == 0 for s, m in zip(image.shape[1:], multiple))
    # the input's [p0.5, p99.5] maps onto [0, 1], unclipped: the extremes map just beyond it
    low, high = np.percentile(array, [0.5, 99.5])
    lo01, hi01 = (array.min() - low) / (high - low), (array.max() - low) / (high - low)
    assert lo01 - 1e-5 <= float(image.min()) and float(image.max()) <= hi01 + 1e-5
    assert float(image.max()) > 1.0
    if spacing is not None:
        np.testing.assert_allclose(np.abs(np.diag(image.affine.numpy())[:3]), spacing, rtol=1e-5)
    item["pred"] = MetaTensor(image.as_tensor().clone())
    restored = Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=False)(item)["pred"]
    assert tuple(restored.shape) == (1, *shape)
    np.testing.assert_allclose(restored.affine.numpy(), affine, atol=1e-4)
    # and the content is back in place and in the input's units (unclipped): a resampled copy of the input
    restored_np = restored[0].numpy()
    reference = array
    if spacing is None:  # no resampling: the chain and its inverse return the input itself
        np.testing.assert_allclose(restored_np, array, rtol=0, atol=1e-4 * (high - low))
    corr = np.corrcoef(restored_np.ravel(), reference.ravel())[0, 1]
    assert corr > (0.999 if spacing is None else 0.9)
    assert abs(restored_np.mean() - reference.mean()) < 0.05 * (high - low)


def test_preprocessing_names_a_volume_with_nans(tmp_path):
    array = phantom()
    array[3, 4, 5] = np.nan
    path = write_volume(tmp_path / "nan.nii.gz", array)
    chain = Compose(data.preprocessing(1, None, "mri", (0.5, 99.5), (-1000, 1000), (4, 4, 4)))
    with pytest.raises(Exception) as info:
        chain({"image": str(path)})
    chain_text = error_text(info.value)
    assert str(path) in chain_text and "NaN" in chain_text


def test_make_dataset_modes(tmp_path):
    items = [{"image": str(write_volume(tmp_path / "a.nii.gz", phantom()))}]
    chain = Compose(data.preprocessing(1, None, "mri", (0.5, 99.5), (-1000, 1000), (4, 4, 4)))
    for cache in ("memory", "gpu", "disk", "none"):
        ds = data.make_dataset(items, chain, cache=cache, cache_dir=str(tmp_path / "cache"))
        assert ds[0]["image"].shape[0] == 1
    assert any((tmp_path / "cache").iterdir())  # disk cache wrote its files there
    with pytest.raises(ValueError, match="cache must be one of 'memory', 'gpu', 'disk', 'none', got 'ram'"):
        data.make_dataset(items, chain, cache="ram")
    with pytest.raises(ValueError, match="cache must be one of"):
        data.cache_placement("ram", "cpu")
    with pytest.raises(ValueError, match="cache 'disk' needs cache_dir"):
        data.make_dataset(items, chain, cache="disk", cache_dir=None)


def test_disk_cache_is_keyed_by_the_transforms(tmp_path):
    """A PersistentDataset cache written with one total factor is not read back for another."""
    from monai.transforms import Compose

    path = write_volume(tmp_path / "v.nii.gz", phantom((30, 34, 26)))
    shapes = []
    for multiple in ((4, 4, 4), (16, 16, 16)):
        transform = Compose(data.preprocessing(1, None, "mri", (0.5, 99.5), (-1000, 1000), multiple))
        dataset = data.make_dataset([{"image": str(path)}], transform, cache="disk", cache_dir=str(tmp_path / "cache"))
        shapes.append(tuple(dataset[0]["image"].shape[1:]))
    assert all(s % 4 == 0 for s in shapes[0]) and all(s % 16 == 0 for s in shapes[1])
    assert shapes[0] != shapes[1]


# ---------------------------------------------------------------------------------------------
# the data checks of the preprocessing chain (training and inference alike)


@pytest.mark.parametrize("value", [0.0, 310.0])
def test_constant_volume_is_refused_by_name(tmp_path, value):
    path = write_volume(tmp_path / "blank.nii.gz", np.full((30, 30, 30), value, np.float32))
    chain = Compose(data.preprocessing(1, None, "mri", (0.5, 99.5), (-1000, 1000), (4, 4, 4)))
    with pytest.raises(Exception) as info:
        chain({"image": str(path)})
    assert f"volume '{path}' is constant (every voxel is {value:g}); expected an image with contrast" in error_text(info.value)


def test_training_refuses_a_constant_validation_volume_when_its_dataset_is_built(tmp_path):
    """The training config's validation dataset (CacheDataset) runs the checks as it is built, before
    any epoch: a blank volume is named there, not after an epoch of training."""
    from conftest import AE_CONFIG, make_workflow, train_overrides, write_dataset

    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    write_dataset(train_dir, 2)
    write_volume(val_dir / "head.nii.gz", phantom(seed=3))
    blank = write_volume(val_dir / "blank.nii.gz", np.zeros((30, 30, 30), np.float32))
    workflow = make_workflow(AE_CONFIG, **train_overrides(tmp_path, train_dir, val_dataset_dir=str(val_dir)))
    with pytest.raises(Exception) as info:
        workflow.parser.get_parsed_content("validate#dataset")
    assert f"volume '{blank}' is constant (every voxel is 0)" in error_text(info.value)


def test_training_crops_leave_the_cached_volumes_as_they_were(tmp_path):
    """The training dataset hands its random crops out without copying each cached volume first
    (copy_cache false): over several passes the cache keeps its values and its transform history,
    and a batch written into in place does not reach it (the loader's collation copies the crop)."""
    from conftest import AE_CONFIG, make_workflow, train_overrides, write_dataset

    write_dataset(tmp_path / "train", 3)
    workflow = make_workflow(AE_CONFIG, **train_overrides(tmp_path, tmp_path / "train", patch_size=[16, 16, 16], batch_size=1))
    dataset, loader = workflow.parser.get_parsed_content("train#dataset"), workflow.parser.get_parsed_content("train#dataloader")
    assert dataset.copy_cache is False
    cached = [item["image"] for item in dataset._cache]
    values = [v.clone() for v in cached]
    history = [len(v.applied_operations) for v in cached]
    for _ in range(4):
        for batch in loader:
            assert tuple(batch["image"].shape[2:]) == (16, 16, 16)
            batch["image"].add_(100.0)
    assert all(torch.equal(v, c) for v, c in zip(values, cached))
    assert [len(v.applied_operations) for v in cached] == history


def test_gpu_cache_keeps_the_volumes_on_the_training_device_and_crops_them_there(tmp_path):
    """cache 'gpu': the cached volumes end their deterministic transforms on the training device (here
    the CPU, the test machine's), so each step's crop and collation run there; the
    crops leave the cache as it was; the bytes the planner reserves for them bound what they take;
    worker processes, which cannot reach a GPU, are refused before anything is cached."""
    from monai.transforms import EnsureTyped

    from conftest import AE_CONFIG, make_workflow, train_overrides, write_dataset

    write_dataset(tmp_path / "train", 3)
    overrides = train_overrides(tmp_path, tmp_path / "train", patch_size=[16, 16, 16], batch_size=2, cache="gpu")
    workflow = make_workflow(AE_CONFIG, **overrides)
    transforms = workflow.parser.get_parsed_content("train#preprocessing").transforms
    placement = [t for t in transforms if isinstance(t, EnsureTyped) and t.converter.device is not None]
    assert len(placement) == 1 and placement[0].converter.device == torch.device("cpu")
    dataset, loader = workflow.parser.get_parsed_content("train#dataset"), workflow.parser.get_parsed_content("train#dataloader")
    cached = [item["image"] for item in dataset._cache]
    assert all(v.device.type == "cpu" for v in cached)
    values = [v.clone() for v in cached]
    for _ in range(3):
        for batch in loader:
            assert tuple(batch["image"].shape[1:]) == (1, 16, 16, 16)
            batch["image"].add_(100.0)
    assert all(torch.equal(v, c) for v, c in zip(values, cached))
    reserved = workflow.parser.get_parsed_content("gpu_cache_bytes")
    taken = sum(v.numel() * v.element_size() for v in cached)
    assert 0 < taken <= reserved
    assert make_workflow(AE_CONFIG, **train_overrides(tmp_path, tmp_path / "train")).parser.get_parsed_content("gpu_cache_bytes") == 0
    workflow = make_workflow(AE_CONFIG, **{**overrides, "num_workers": 2})
    with pytest.raises(Exception) as info:
        workflow.parser.get_parsed_content("train#preprocessing")
    assert "cache 'gpu' keeps the volumes in GPU memory" in error_text(info.value) and "set num_workers 0 (got 2)" in error_text(info.value)


def test_cached_bytes_bound_the_preprocessed_volumes_from_their_headers(tmp_path):
    paths = [write_volume(tmp_path / f"v{i}.nii.gz", phantom(shape), spacing=(1.0, 1.5, 2.0))
             for i, shape in enumerate([(30, 34, 26), (28, 28, 28)])]
    items = [{"image": str(p)} for p in paths]
    chain = Compose(data.preprocessing(1, (2.0, 2.0, 2.0), "mri", (0.5, 99.5), (-1000, 1000), (4, 4, 4)))
    taken = sum(chain(dict(item))["image"].numel() * 4 for item in items)
    expected = sum(np.prod([-(-n // 4) * 4 for n in data.resampled_shape(p, (2.0, 2.0, 2.0))]) * 4 for p in paths)
    assert taken <= data.cached_bytes(items, (2.0, 2.0, 2.0), 1, (4, 4, 4)) == expected
    assert data.cached_bytes(items, "none") == sum(np.prod(nib.load(str(p)).shape) * 4 for p in paths)
    # a volume smaller than the patch is cached padded to it
    assert data.cached_bytes(items[1:], "none", patch=(40, 16, 16)) == 40 * 28 * 28 * 4


@pytest.mark.parametrize("case", range(5))
def test_resampled_shape_is_the_shape_spacingd_gives(tmp_path, case):
    """From the header alone, the shape after Orientationd (RAS) and Spacingd: axes swapped, flipped,
    anisotropic and oblique."""
    from monai.transforms import EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

    rng = np.random.default_rng(case)
    shape = tuple(int(n) for n in rng.integers(5, 20, 3))
    affine = np.diag([*rng.uniform(0.7, 5.0, 3), 1.0])
    swap = np.eye(4)
    swap[:3, :3] = np.eye(3)[rng.permutation(3)] * rng.choice([-1, 1], 3)
    affine = swap @ affine
    if case == 4:  # oblique: rotated by 0.2 rad about z
        rotation = np.eye(4)
        rotation[:2, :2] = [[np.cos(0.2), -np.sin(0.2)], [np.sin(0.2), np.cos(0.2)]]
        affine = rotation @ affine
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), affine), str(path))
    spacing = rng.uniform(0.8, 3.0, 3).round(2).tolist()
    chain = Compose(
        [LoadImaged("image", image_only=True), EnsureChannelFirstd("image"), Orientationd("image", "RAS", labels=None), Spacingd("image", spacing)]
    )
    assert data.resampled_shape(path, spacing) == tuple(chain({"image": str(path)})["image"].shape[1:])
    assert data.resampled_shape(path, None) == shape


def test_volume_too_large_once_resampled_is_refused_from_its_header(tmp_path):
    """A 15 KB file of 16^3 voxels of 25 mm is 376^3 voxels at 1 mm: refused in well under a second,
    by name, with the size and the option, before it is loaded or resampled."""
    path = write_volume(tmp_path / "coarse.nii.gz", phantom((16, 16, 16), (25.0,) * 3), spacing=(25.0,) * 3)
    chain = Compose(data.preprocessing(1, [1.0, 1.0, 1.0], "mri", (0.5, 99.5), (-1000, 1000), (4, 4, 4), max_voxels=50_000_000))
    start = time.perf_counter()
    with pytest.raises(Exception) as info:
        chain({"image": str(path)})
    assert time.perf_counter() - start < 1.0
    assert (
        f"volume '{path}' (16x16x16 voxels) would be 376x376x376 at spacing [1.0, 1.0, 1.0] mm: 53,157,376 voxels, "
        f"more than max_voxels (50,000,000). Use a coarser spacing, or raise max_voxels" in error_text(info.value)
    )
    # within the limit, or without one, the same file goes through
    small = Compose(data.preprocessing(1, [8.0, 8.0, 8.0], "mri", (0.5, 99.5), (-1000, 1000), (4, 4, 4), max_voxels=200_000))
    assert small({"image": str(path)})["image"].shape[1:] == (48, 48, 48)


def test_datalist_keeps_each_volumes_class(tmp_path):
    write_volume(tmp_path / "a.nii.gz", phantom((16, 16, 16)))
    write_volume(tmp_path / "b.nii.gz", phantom((16, 16, 16), seed=1))
    (tmp_path / "datalist.json").write_text(
        json.dumps({"training": [{"image": "a.nii.gz", "class": "T2"}, {"image": "b.nii.gz", "class": "T1"}]})
    )
    items = data.list_volumes(tmp_path)
    assert [(Path(i["image"]).name, i["class"]) for i in items] == [("a.nii.gz", "T2"), ("b.nii.gz", "T1")]
    classes = data.class_names(items, "class")
    assert classes == ["T1", "T2"]  # sorted: the labels do not depend on the datalist's order
    assert [i["class_index"] for i in data.with_class_index(items, "class", classes)] == [1, 0]
    # unconditional: no classes, the datalist unchanged
    assert data.class_names(items, None) == [] and data.with_class_index(items, None, []) == items


def test_a_volume_without_its_class_is_refused_by_name():
    items = [{"image": "/data/a.nii.gz", "class": "T1"}, {"image": "/data/b.nii.gz"}]
    with pytest.raises(ValueError) as info:
        data.class_names(items, "class")
    message = str(info.value)
    assert "condition_key is 'class', but 1 volume(s) have no 'class'" in message and "'/data/b.nii.gz'" in message
    assert "or set condition_key to null" in message
    with pytest.raises(ValueError, match="volume '/data/a.nii.gz' has class 'T1', which is not one of the classes \\['T2'\\]"):
        data.with_class_index(items[:1], "class", ["T2"])
