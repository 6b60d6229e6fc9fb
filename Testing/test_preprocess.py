"""Preprocessing cache (geometry, crop, storage, reuse) and patch sampling."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_data import blob_label, make_dataset, write_image

from SASSRSegmentLib.commands import preprocess as preprocess_command
from SASSRSegmentLib.data import cache as preprocess
from SASSRSegmentLib.data.datasets import open_dataset
from SASSRSegmentLib.data.normalization import erode
from SASSRSegmentLib.data.sampling import Augmentation, PatchSampler, lr_from_hr
from SASSRSegmentLib.io import geometry
from SASSRSegmentLib.runtime.errors import UserError
from SASSRSegmentLib.training.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent


def prep3d(**overrides) -> dict:
    prep = {
        "spatial_dims": 3,
        "scale": 2,
        "channels": ["T1"],
        "lr_spacing": [2.0, 2.0, 2.0],
        "lr_longer_side": None,
        "normalization": {"kind": "mri"},
        "patch_size_lr": [4, 4, 4],
        "labels": [1],
    }
    return prep | overrides


def build(root: Path, prep: dict, folder: Path, margin: int = 2) -> preprocess.Cache:
    preprocess.build_cache(open_dataset(root), prep, folder, margin, workers=1)
    return preprocess.open_cache(folder)


def cropped_grid(entry: dict) -> geometry.Grid:
    return geometry.Grid(
        tuple(entry["shape"][::-1]),
        tuple(entry["spacing"]),
        tuple(entry["origin"]),
        tuple(entry["direction"]),
    )


def physical_centroid(mask: np.ndarray, grid: geometry.Grid) -> np.ndarray:
    index = np.argwhere(mask > 0).mean(axis=0)[::-1]  # (x, y, z)
    return grid.index_to_physical(index)


def oblique_case(root: Path) -> Path:
    """Anisotropic, rotated, offset volume: body in one corner, one lesion in the body."""
    shape = (20, 40, 36)  # z, y, x
    image = np.zeros(shape, np.float32)
    image[5:14, 4:26, 3:22] = 200 + np.random.default_rng(0).normal(0, 10, (9, 22, 19))
    label = blob_label(shape, [((9, 14, 12), 4)])
    image += 150 * label
    angle = math.radians(30)
    direction = (math.cos(angle), -math.sin(angle), 0.0, math.sin(angle), math.cos(angle), 0.0, 0.0, 0.0, 1.0)
    make_dataset(root, {}, shape=shape)
    write_image(
        root / "imagesTr" / "oblique_0000.nii.gz", image, (0.8, 1.2, 2.5), (10.0, -5.0, 3.0), direction
    )
    write_image(root / "labelsTr" / "oblique.nii.gz", label, (0.8, 1.2, 2.5), (10.0, -5.0, 3.0), direction)
    return root


def test_cache_overlays_the_source_in_physical_space(tmp_path):
    root = oblique_case(tmp_path / "ds")
    cache = build(root, prep3d(), tmp_path / "cache")
    entry = cache.cases["oblique"]
    source_label = sitk.ReadImage(str(root / "labelsTr" / "oblique.nii.gz"))
    source = geometry.Grid.from_image(source_label)
    hr = cropped_grid(entry)
    assert hr.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert all(n % 2 == 0 for n in entry["shape"])
    # Cropped to the body: smaller than the working grid, but every lesion voxel kept.
    working = geometry.training_hr_grid(source, prep3d())
    assert np.prod(entry["shape"]) < 0.6 * np.prod(working.size)
    full = sitk.GetArrayFromImage(geometry.resample_label(source_label, working))
    assert entry["lesion_voxels"] == int(full.sum()) == int(cache.seg("oblique").sum())
    # The cached lesion sits where the source lesion is, in millimetres.
    seg = np.asarray(cache.seg("oblique"))
    source_centroid = physical_centroid(sitk.GetArrayFromImage(source_label), source)
    assert np.linalg.norm(physical_centroid(seg, hr) - source_centroid) < 0.5
    source_volume = sitk.GetArrayFromImage(source_label).sum() * np.prod(source.spacing)
    assert seg.sum() * np.prod(hr.spacing) == pytest.approx(source_volume, rel=0.1)
    # LR and HR grids of the cached case cover the same physical extent; the working grid covers the source.
    lr = geometry.lr_grid(hr, 2)
    np.testing.assert_allclose(lr.extent_corners(), hr.extent_corners(), atol=1e-9)
    lo, hi = source.extent_corners(), working.extent_corners()
    np.testing.assert_allclose(hi[0], lo[0], atol=1e-9)  # same starting corner
    assert np.all(np.linalg.norm(hi - lo, axis=1) < 2.0 * math.sqrt(3))  # overshoot below one LR voxel
    assert cache.image("oblique").dtype == np.float16 and seg.dtype == np.uint8


def test_lr_input_is_the_block_average(tmp_path):
    root = oblique_case(tmp_path / "ds")
    cache = build(root, prep3d(), tmp_path / "cache")
    hr = cache.normalized(np.asarray(cache.image("oblique")))
    expected = geometry.downsample_block(hr, 2, spatial_dims=3)
    got = lr_from_hr(torch.from_numpy(hr)[None], 2)[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    grid = cropped_grid(cache.cases["oblique"])
    lr_image = geometry.make_lr_image(grid.image_from_array(hr[0]), 2)
    np.testing.assert_allclose(sitk.GetArrayFromImage(lr_image), got[0], atol=1e-6)
    np.testing.assert_allclose(
        geometry.Grid.from_image(lr_image).extent_corners(), grid.extent_corners(), atol=1e-9
    )


def lesion_case_root(root: Path, shape=(24, 40, 40)) -> Path:
    """Identity resampling (1 mm source, 2 mm LR): a big lesion, a small one and a 1-voxel speck."""
    lesions = [((12, 10, 10), 5), ((12, 30, 30), 1.5), ((3, 3, 36), 0)]
    make_dataset(root, {"multi": {"shape": shape, "lesions": lesions}})
    return root


def test_components_and_size_balanced_sampling(tmp_path):
    cache = build(lesion_case_root(tmp_path / "ds"), prep3d(), tmp_path / "cache")
    components = cache.cases["multi"]["components"]
    assert [c["size"] for c in components] == [515, 19, 1]
    assert components[1]["centroid"] == pytest.approx([12, 30, 30])
    sampler = PatchSampler(
        cache, ["multi"], (8, 8, 8), p_fg=1.0, augmentation=Augmentation(p_intensity=0, p_gamma=0)
    )
    rng = np.random.default_rng(0)
    sums = np.array([sampler.sample(rng)[1].sum() for _ in range(300)])
    small = np.mean((sums > 0) & (sums <= 19))
    big = np.mean(sums > 30)
    # Each real lesion about half the time although one is 70x the other; the speck never.
    assert 0.38 < small < 0.62 and small + big == 1.0
    uniform = PatchSampler(cache, ["multi"], (8, 8, 8), p_fg=0.0)
    with_lesion = np.mean([uniform.sample(rng)[1].any() for _ in range(100)])
    assert with_lesion < 0.5


def test_augmentation_keeps_image_and_mask_aligned(tmp_path):
    root = lesion_case_root(tmp_path / "ds")
    label = sitk.ReadImage(str(root / "labelsTr" / "multi.nii.gz"))
    # The image is the lesion indicator itself, kept exact by a [0, 1] window.
    sitk.WriteImage(sitk.Cast(label, sitk.sitkFloat32), str(root / "imagesTr" / "multi_0000.nii.gz"))
    cache = build(root, prep3d(normalization={"kind": "ct", "window": [0.0, 1.0]}), tmp_path / "cache")
    aug = Augmentation(
        flip_axes=(0, 1, 2), rot90=True, p_intensity=0, p_gamma=0, p_affine=1.0, affine_degrees=30
    )
    sampler = PatchSampler(cache, ["multi"], (10, 12, 12), p_fg=0.8, augmentation=aug)
    rng = np.random.default_rng(1)
    changed = 0
    for _ in range(30):
        image, seg = sampler.sample(rng)
        assert image.shape == (1, 10, 12, 12) and seg.shape == (10, 12, 12)
        np.testing.assert_array_equal(image[0] >= 0.5, seg.astype(bool))
        changed += np.any((image[0] > 0.01) & (image[0] < 0.99))  # interpolated, i.e. really warped
    assert changed > 10


def test_intensity_augmentation_and_padding(tmp_path):
    root = make_dataset(tmp_path / "ds", {"small": {"shape": (6, 8, 8)}})
    cache = build(root, prep3d(), tmp_path / "cache")
    assert cache.cases["small"]["shape"] == [6, 8, 8]
    plain = PatchSampler(
        cache, ["small"], (12, 16, 16), p_fg=0.0, augmentation=Augmentation(p_intensity=0, p_gamma=0)
    )
    image, seg = plain.sample(np.random.default_rng(0))
    assert image.shape == (1, 12, 16, 16)
    stored = cache.normalized(np.asarray(cache.image("small")))[0]
    # Somewhere in the padded patch is the whole case; the rest is the background value (0 for mri).
    assert (
        np.isclose(image.sum(), stored.sum(), atol=1e-2)
        and seg.sum() == cache.cases["small"]["lesion_voxels"]
    )
    assert np.count_nonzero(image) == np.count_nonzero(stored)
    augmented = PatchSampler(
        cache, ["small"], (6, 8, 8), augmentation=Augmentation(p_intensity=1.0, p_gamma=1.0)
    )
    rng = np.random.default_rng(0)
    spreads = [augmented.sample(rng)[0].std() for _ in range(20)]
    assert np.std(spreads) > 0.01  # scale/shift/gamma change the patch statistics


def test_cache_reuse_and_invalidation(tmp_path):
    root = make_dataset(tmp_path / "ds", 3)
    folder = tmp_path / "cache"
    build(root, prep3d(), folder)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npy")}
    build(root, prep3d(), folder)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npy")} == stamps
    label = root / "labelsTr" / "case1.nii.gz"
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    (folder / preprocess.CACHE_FILE).unlink()  # also: an interrupted run resumes per case
    build(root, prep3d(), folder)
    redone = {n for n, t in stamps.items() if (folder / n).stat().st_mtime_ns != t}
    assert redone == {"case1_img.npy", "case1_seg.npy"}
    cache = build(root, prep3d(normalization={"kind": "ct", "window": [0.0, 300.0]}), folder)
    assert all((folder / n).stat().st_mtime_ns != t for n, t in stamps.items())
    assert cache.prep["normalization"]["kind"] == "ct"


def test_3d_cases_are_cached_in_the_training_axis_order_whatever_order_they_are_stored_in(tmp_path):
    """A case stored as a sagittal acquisition is (with its label) the same cached arrays, on the same
    grid, as the axial copy of it: the network learns one axis order, the one `segment` gives it."""
    root = make_dataset(
        tmp_path / "ds", {"axial": {"lesions": [((4, 5, 9), 3)]}}, shape=(12, 14, 16), spacing=(1.0, 1.0, 3.0)
    )
    for folder, suffix in (("imagesTr", "_0000"), ("labelsTr", "")):
        axial = sitk.ReadImage(str(root / folder / f"axial{suffix}.nii.gz"))
        stored = sitk.Flip(sitk.PermuteAxes(axial, [1, 2, 0]), [True, False, False], flipAboutOrigin=False)
        assert geometry.orientation(stored) != "LPS"
        sitk.WriteImage(stored, str(root / folder / f"sagittal{suffix}.nii.gz"))
    (root / "dataset.json").write_text(
        json.dumps({**json.loads((root / "dataset.json").read_text()), "numTraining": 2})
    )
    cache = build(root, prep3d(orientation=preprocess.TRAINING_ORIENTATION), tmp_path / "cache")
    axial, sagittal = cache.cases["axial"], cache.cases["sagittal"]
    assert sagittal["shape"] == axial["shape"]
    assert cropped_grid(sagittal) == pytest.approx(cropped_grid(axial))
    np.testing.assert_array_equal(cache.seg("sagittal"), cache.seg("axial"))
    np.testing.assert_array_equal(cache.image("sagittal"), cache.image("axial"))
    assert cache.seg("axial").sum() > 0
    # Every 3D model made from now on records the order, and its default working spacing is the cases'
    # median in that order (the sagittal copy's 3 mm axis is its y as stored); 2D images have none.
    prep = preprocess.make_prep(TrainConfig(), open_dataset(root))
    assert prep["orientation"] == "LPS" and prep["lr_spacing"] == [2.0, 2.0, 6.0]
    flat = make_dataset(tmp_path / "ds2", 1, shape=(16, 16), ending=".png")
    assert preprocess.make_prep(TrainConfig(), open_dataset(flat))["orientation"] is None


def test_cache_folder_is_protected_and_checked(tmp_path):
    root = make_dataset(tmp_path / "ds", 2)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="holds files that are not a training cache"):
        build(root, prep3d(), folder)
    # A user's config, split and arrays beside a cache had been deleted as its leftovers, exit 0.
    mine = {"my-config.json": '{"scale": 2}', "my-split.json": '{"train": [], "val": []}'}
    for cache in (tmp_path / "fresh", tmp_path / "made"):
        cache.mkdir()
        if cache.name == "made":
            build(root, prep3d(), cache)
            (cache / preprocess.CACHE_FILE).unlink()  # and interrupted: its cases are kept, resumed
        for name, text in mine.items():
            (cache / name).write_text(text)
        with pytest.raises(UserError, match=r"not a training cache \(my-config.json, my-split.json\)"):
            build(root, prep3d(), cache)
        assert {n: (cache / n).read_text() for n in mine} == mine
        for name in mine:
            (cache / name).unlink()
    made = tmp_path / "made"
    stamps = {p.name: p.stat().st_mtime_ns for p in made.glob("case*")}
    # Arrays without an entry: refused where no cache is; in a cache (a case stopped between its arrays
    # and its entry, gone from the dataset since), left where they are, unread.
    (tmp_path / "fresh" / "x_img.npy").write_text("1")
    with pytest.raises(UserError, match=r"not a training cache \(x_img.npy\)"):
        build(root, prep3d(), tmp_path / "fresh")
    (made / "x_img.npy").write_text("1")
    (root / "imagesTr" / "case1_0000.nii.gz").unlink()  # case1 leaves the dataset: its files go
    (root / "labelsTr" / "case1.nii.gz").unlink()
    (root / "dataset.json").write_text(
        json.dumps({**json.loads((root / "dataset.json").read_text()), "numTraining": 1})
    )
    build(root, prep3d(), made)
    assert sorted(p.name for p in made.iterdir()) == [
        "cache.json",
        "case0.json",
        "case0_img.npy",
        "case0_seg.npy",
        "x_img.npy",
    ]
    assert all((made / n).stat().st_mtime_ns == stamps[n] for n in ("case0_img.npy", "case0.json"))
    other = make_dataset(tmp_path / "other", 2)
    build(other, prep3d(), tmp_path / "cache")
    with pytest.raises(UserError, match="holds the cache of dataset other, not ds"):
        build(root, prep3d(), tmp_path / "cache")
    (tmp_path / "cache" / "case1_seg.npy").unlink()
    with pytest.raises(UserError, match="case1_seg.npy: cannot be read"):
        preprocess.open_cache(tmp_path / "cache")
    with pytest.raises(UserError, match="not a training cache"):
        preprocess.open_cache(tmp_path / "ds")


def test_2d_uint8_storage(tmp_path):
    root = make_dataset(
        tmp_path / "us", {"a": {"shape": (30, 50)}, "b": {"shape": (40, 24)}}, channels=("US",), ending=".png"
    )
    for name, shape in (("a", (30, 50)), ("b", (40, 24))):
        image = np.clip(np.random.default_rng(0).normal(100, 30, shape), 0, 255).astype(np.uint8)
        write_image(root / "imagesTr" / f"{name}_0000.png", image)
    prep = prep3d(
        spatial_dims=2, channels=["US"], lr_spacing=None, lr_longer_side=20, normalization={"kind": "uint8"}
    )
    cache = build(root, prep, tmp_path / "cache")
    assert cache.storage == "uint8" and cache.image("a").dtype == np.uint8
    assert cache.cases["a"]["shape"] == [24, 40] and cache.cases["b"]["shape"][0] == 40
    stored = np.asarray(cache.image("a"))
    np.testing.assert_allclose(cache.normalized(stored), stored / 255.0, atol=1e-7)
    write_image(root / "imagesTr" / "b_0000.png", np.full((40, 24), 1000, np.uint16))
    with pytest.raises(UserError, match='do not fit 8 bits but the normalisation is "uint8"'):
        build(root, prep, tmp_path / "cache2")


def test_brats_raw_and_prenormalised_cases_match_after_preprocessing(shared_data, tmp_path):
    source = shared_data / "Dataset001_BraTSFLAIR"
    root = tmp_path / "brats"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    (root / "dataset.json").symlink_to(source / "dataset.json")
    for case in ("Brats18_2013_11_1", "brats_2013_pat0003_1"):
        (root / "imagesTr" / f"{case}_0000.nii.gz").symlink_to(source / "imagesTr" / f"{case}_0000.nii.gz")
        (root / "labelsTr" / f"{case}.nii.gz").symlink_to(source / "labelsTr" / f"{case}.nii.gz")
    parser = argparse.ArgumentParser()
    preprocess_command.add_arguments(parser)
    config = REPO / "configs" / "brain-tumour-flair-3d.json"
    args = parser.parse_args(
        ["--dataset", str(root), "--output", str(tmp_path / "cache"), "--config", str(config)]
    )
    args.progress = "quiet"
    assert preprocess_command.run(args) == 0  # two worker processes
    cache = preprocess.open_cache(tmp_path / "cache")
    raw_max = {}
    for case in cache.names:
        raw = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "imagesTr" / f"{case}_0000.nii.gz")))
        raw_max[case] = float(raw.max())
        image = np.asarray(cache.image(case)[0], dtype=np.float32)
        seg = np.asarray(cache.seg(case)) > 0
        # Standardised over the brain's interior; the rim holds partial volumes of brain and background.
        body = erode(image != 0)  # normalised background is exactly 0
        assert abs(image[body].mean()) < 0.02 and abs(image[body].std() - 1) < 0.02, case
        assert image[seg].mean() > 0.5, case  # FLAIR: the tumour is bright, whichever convention
    assert raw_max["Brats18_2013_11_1"] > 100 > 20 > raw_max["brats_2013_pat0003_1"]
    assert cache.meta["groups"] == [["brats_2013_pat0006_1", "Brats18_2013_20_1"]]
    assert json.loads((tmp_path / "cache" / "cache.json").read_text())["prep"]["lr_spacing"] == [
        2.0,
        2.0,
        2.0,
    ]


def test_several_channels(tmp_path):
    root = make_dataset(tmp_path / "ds", 2, channels=("T1", "FLAIR"))
    cache = build(root, prep3d(channels=["T1", "FLAIR"]), tmp_path / "cache")
    shape = cache.cases["case0"]["shape"]
    assert cache.image("case0").shape == (2, *shape)
    sampler = PatchSampler(cache, cache.names, (8, 8, 8), p_fg=1.0, augmentation=Augmentation(p_affine=1.0))
    image, seg = sampler.sample(np.random.default_rng(0))
    assert image.shape == (2, 8, 8, 8) and seg.shape == (8, 8, 8) and seg.any()
    assert not np.allclose(image[0], image[1])  # the channels stay distinct
