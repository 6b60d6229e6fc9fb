"""The LR/HR grid rule: exact physical overlay, inverse grids, working grids, resampling, ROIs."""

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SASSRSegmentLib.io.geometry import (
    Grid,
    crop_to_multiple,
    downsample_block,
    hr_grid,
    lr_grid,
    make_lr_image,
    resample,
    resample_label,
    roi_region,
    training_hr_grid,
    working_lr_grid,
)
from SASSRSegmentLib.runtime.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _oblique_direction() -> tuple[float, ...]:
    a, b = np.deg2rad(20), np.deg2rad(-35)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rz @ rx).ravel())


GRIDS = [
    Grid((30, 20, 12), (0.8, 0.8, 5.0), (-12.5, 40.0, 7.25), _oblique_direction()),
    Grid((31, 17), (0.3, 0.45), (5.0, -3.0), (0.0, 1.0, 1.0, 0.0)),
    Grid((10, 11, 9), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("scale", [2, 4])
def test_hr_grid_covers_exactly_the_same_physical_extent(grid, scale):
    hr = hr_grid(grid, scale)
    assert np.allclose(hr.extent_corners(), grid.extent_corners(), atol=1e-6)
    assert np.allclose(np.asarray(hr.spacing) * scale, grid.spacing)
    assert hr.direction == grid.direction
    back = lr_grid(hr, scale)
    assert (
        back.size == grid.size
        and np.allclose(back.origin, grid.origin)
        and np.allclose(back.spacing, grid.spacing)
    )


def test_hr_voxel_centres_average_to_their_lr_voxel_centre():
    grid = GRIDS[0]
    hr = hr_grid(grid, 2)
    block = [hr.index_to_physical([i, j, k]) for i in (2, 3) for j in (4, 5) for k in (6, 7)]
    assert np.allclose(np.mean(block, axis=0), grid.index_to_physical([1, 2, 3]), atol=1e-9)


def test_lr_grid_requires_multiples():
    with pytest.raises(ValueError, match="multiple"):
        lr_grid(GRIDS[1], 2)


def test_working_lr_grid_3d_spacing_policy_keeps_a_matching_grid_identical():
    hr_case = Grid((240, 240, 155), (1.0, 1.0, 1.0), (0.0, -239.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    prep = {"lr_spacing": [2.0, 2.0, 2.0], "scale": 2}
    work = working_lr_grid(hr_case, prep)
    assert work.size == (120, 120, 78) and work.spacing == (2.0, 2.0, 2.0)
    hr = training_hr_grid(hr_case, prep)
    # Voxel centres of the training HR grid coincide with the case's own voxels (no interpolation).
    assert np.allclose(hr.origin, hr_case.origin) and hr.size == (240, 240, 156)
    lr_input = Grid((120, 120, 78), (2.0, 2.0, 2.0), (5.0, 6.0, 7.0), hr_case.direction)
    assert working_lr_grid(lr_input, prep) == lr_input


def test_working_lr_grid_2d_longer_side_policy_covers_the_input():
    grid = Grid((473, 323), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    work = working_lr_grid(grid, {"lr_longer_side": 160})
    assert max(work.size) == 160 and work.spacing[0] == work.spacing[1]
    lo_in, hi_in = grid.extent_corners().min(0), grid.extent_corners().max(0)
    lo, hi = work.extent_corners().min(0), work.extent_corners().max(0)
    assert np.all(lo <= lo_in + 1e-9) and np.all(hi >= hi_in - 1e-9)
    assert np.all(hi - hi_in < np.asarray(work.spacing) + 1e-9)


def test_working_lr_grid_rejects_wrong_dimensionality():
    with pytest.raises(UserError, match="3D"):
        working_lr_grid(GRIDS[1], {"lr_spacing": [2.0, 2.0, 2.0]})


def test_downsample_block_and_make_lr_image():
    arr = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
    lr = downsample_block(arr, 2)
    assert lr.shape == (2, 3, 4)
    assert lr[0, 0, 0] == pytest.approx(arr[:2, :2, :2].mean())
    image = GRIDS[0].image_from_array(np.random.default_rng(0).random((12, 20, 30)).astype(np.float32))
    lr_image = make_lr_image(image, 4)  # 30x20x12 -> cropped to 28x20x12
    assert lr_image.GetSize() == (7, 5, 3)
    cropped = Grid.from_image(crop_to_multiple(image, 4))
    assert np.allclose(Grid.from_image(lr_image).extent_corners(), cropped.extent_corners(), atol=1e-6)
    assert sitk.GetArrayViewFromImage(lr_image).mean() == pytest.approx(
        sitk.GetArrayFromImage(crop_to_multiple(image, 4)).mean(), rel=1e-5
    )


def test_resample_onto_own_grid_is_identity_and_label_area_is_kept():
    rng = np.random.default_rng(1)
    image = GRIDS[2].image_from_array(rng.random((9, 11, 10)).astype(np.float32))
    same = resample(image, GRIDS[2])
    assert np.allclose(sitk.GetArrayViewFromImage(same), sitk.GetArrayViewFromImage(image), atol=1e-5)
    disk = np.zeros((200, 200), np.uint8)
    yy, xx = np.mgrid[:200, :200]
    disk[(yy - 90) ** 2 + (xx - 110) ** 2 < 40**2] = 1
    label = Grid((200, 200), (0.5, 0.5), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0)).image_from_array(disk)
    coarse = working_lr_grid(Grid.from_image(label), {"lr_longer_side": 64})
    small = resample_label(label, coarse)
    area = sitk.GetArrayViewFromImage(small).sum() * np.prod(small.GetSpacing())
    assert area == pytest.approx(disk.sum() * 0.25, rel=0.05)


def test_antialiasing_removes_a_pattern_the_coarse_grid_cannot_hold():
    stripes = np.tile(np.array([0.0, 1.0], np.float32), 64)[None, :].repeat(32, 0)
    image = Grid((128, 32), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0)).image_from_array(stripes)
    # Coarse samples fall on fine voxel centres (x = 2, 6, ...), all in the same phase of the stripes.
    coarse = Grid((31, 8), (4.0, 4.0), (2.0, 1.5), (1.0, 0.0, 0.0, 1.0))
    smooth = sitk.GetArrayFromImage(resample(image, coarse))
    aliased = sitk.GetArrayFromImage(resample(image, coarse, antialias=False))
    # Without smoothing that phase is all the coarse image sees: a flat 0 image, not the 0.5 average.
    assert aliased.max() < 0.01
    assert abs(smooth[2:-2, 2:-2].mean() - 0.5) < 0.05


def test_roi_region_from_ras_bounds():
    grid = Grid((100, 80, 40), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    # LPS x in [10, 30] is RAS x in [-30, -10]; LPS y in [5, 25] is RAS y in [-25, -5].
    start, size = roi_region(grid, [-30, -10, -25, -5, 10, 30])
    assert start == [10, 5, 5] and size == [21, 21, 11]
    with pytest.raises(UserError, match="does not overlap"):
        roi_region(grid, [100, 200, 100, 200, 100, 200])
    with pytest.raises(UserError, match="6 numbers"):
        roi_region(grid, [0, 1, 0, 1])


def test_no_array_view_of_a_temporary_image():
    # A view does not keep its image alive: a view of a temporary reads freed memory (CI saw garbage).
    pattern = re.compile(r"GetArrayViewFromImage\(\s*[\w.]+\(")
    sources = [*(ROOT / "SASSRSegment").rglob("*.py"), *(ROOT / "Testing").rglob("*.py")]
    sources += [*(ROOT / "tools").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in sources
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, f"use GetArrayFromImage on a temporary image: {offenders}"
