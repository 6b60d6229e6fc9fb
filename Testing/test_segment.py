"""`segment`: exact HR geometry, input handling, every flag, batch mode and real inputs.

Geometry tests use a pointwise "network" (trilinear upsampling of the normalised input, then a steep
logit) so that the expected mask is known: a ball in the input must come out as the same ball.
"""

import csv
import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from SASSRSegmentLib import cli
from SASSRSegmentLib.commands import segment as segment_command
from SASSRSegmentLib.inference import inputs, lesions, memory, noise, pipeline, pixels
from SASSRSegmentLib.inference.lesions import lesion_rows, lesion_table
from SASSRSegmentLib.inference.windows import window_starts
from SASSRSegmentLib.io import geometry, imageio
from SASSRSegmentLib.io.geometry import Grid, same_grid
from SASSRSegmentLib.model.bundle import load_bundle
from SASSRSegmentLib.runtime.errors import UserError

CPU = torch.device("cpu")
SAMPLE = segment_command.samples_dir() / segment_command.SAMPLE_NAME


@pytest.fixture(autouse=True)
def _one_thread():
    # Two shared cores: oversubscribed torch threads make tiny convolutions hundreds of times slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class Interpolator(torch.nn.Module):
    """HR logits = steep function of the linearly upsampled input (align_corners=False is the HR rule)."""

    sr_decoder = True

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def _up(self, x):
        return F.interpolate(
            x, scale_factor=2, mode="trilinear" if x.dim() == 5 else "bilinear", align_corners=False
        )

    def forward(self, x):
        return (self._up(x) - 0.5) * 40

    def super_resolve_image(self, x):
        return self._up(x)


def _card(dims: int) -> dict:
    prep = {
        "spatial_dims": dims,
        "scale": 2,
        "lr_spacing": [2.0] * 3 if dims == 3 else None,
        "lr_longer_side": None if dims == 3 else 40,
        "normalization": {"kind": "ct", "window": [0.0, 100.0]},
        "patch_size_lr": [12] * dims,
    }
    return {
        "name": "interpolator",
        "network": {"in_channels": 1, "features": [4]},
        "threshold": 0.5,
        "preprocessing": prep,
    }


def _rotation(a: float, b: float) -> np.ndarray:
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx


def ball_image(grid: Grid, centre, radius: float, sub: int = 4) -> sitk.Image:
    """100 x the fraction of each voxel inside the ball (partial volume by sub^d supersampling)."""
    d = grid.dims
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    index = (
        np.stack(np.meshgrid(*[np.arange(n) for n in grid.size], indexing="ij"), -1)
        .reshape(-1, d)
        .astype(float)
    )
    inside = np.zeros(len(index))
    for offset in np.stack(np.meshgrid(*[offsets] * d, indexing="ij"), -1).reshape(-1, d):
        points = np.asarray(grid.origin) + ((index + offset) * grid.spacing) @ grid.matrix.T
        inside += np.linalg.norm(points - np.asarray(centre), axis=1) <= radius
    array = (100.0 * inside / sub**d).reshape(grid.size).T.astype(np.float32)
    return grid.image_from_array(np.ascontiguousarray(array))


OBLIQUE = Grid((40, 36, 9), (1.0, 1.0, 5.0), (12.5, -30.0, 41.0), tuple(_rotation(0.4, 0.3).ravel()))


def _assert_same_extent(a: sitk.Image, b: sitk.Image) -> None:
    np.testing.assert_allclose(
        Grid.from_image(a).extent_corners(), Grid.from_image(b).extent_corners(), atol=1e-4
    )


def _equivalent_radius(row: dict) -> float:
    size = row.get("volume_mm3")
    return (3 * size / (4 * math.pi)) ** (1 / 3) if size is not None else math.sqrt(row["area_mm2"] / math.pi)


def test_hr_output_overlays_an_oblique_anisotropic_volume():
    centre = OBLIQUE.index_to_physical([19.3, 17.6, 4.2])
    image = ball_image(OBLIQUE, centre, 10.0)
    mask, probabilities = pipeline.segment_image(image, Interpolator(), _card(3), CPU)
    _assert_same_extent(mask, image)
    np.testing.assert_allclose(mask.GetSpacing(), (0.5, 0.5, 2.5))
    assert mask.GetSize() == (80, 72, 18)
    np.testing.assert_allclose(mask.GetDirection(), image.GetDirection(), atol=1e-12)
    assert Grid.from_image(probabilities) == Grid.from_image(mask)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(probabilities) >= 0.5)
    (ball,) = lesion_table(mask)
    np.testing.assert_allclose(ball["centroid_lps_mm"], centre, atol=0.1)
    assert _equivalent_radius(ball) == pytest.approx(10.0, abs=0.5)
    # --output-grid input: the very grid of the input, the same ball.
    on_input, _ = pipeline.segment_image(image, Interpolator(), _card(3), CPU, output_grid="input")
    assert Grid.from_image(on_input) == Grid.from_image(image)
    (ball,) = lesion_table(on_input)
    np.testing.assert_allclose(ball["centroid_lps_mm"], centre, atol=0.2)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 5.0), (2.0, 2.0, 2.0)])
def test_mask_alone_or_with_8_bit_probabilities_is_the_same_mask(spacing):
    # (2, 2, 2) is the card's LR spacing: the mask is streamed slab by slab; (1, 1, 5) is resampled.
    grid = Grid((30, 26, 8), spacing, (4.0, -3.0, 2.0), tuple(_rotation(0.3, 0.2).ravel()))
    image = ball_image(grid, grid.index_to_physical([14.2, 12.7, 3.6]), 7.0)
    card = _card(3)
    card["preprocessing"]["patch_size_lr"] = [4, 8, 8]  # several windows on every axis
    mask, probabilities = pipeline.segment_image(image, Interpolator(), card, CPU)
    alone, none = pipeline.segment_image(image, Interpolator(), card, CPU, probabilities="none")
    assert none is None and Grid.from_image(alone) == Grid.from_image(mask)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(alone), sitk.GetArrayFromImage(mask))
    assert 0 < sitk.GetArrayFromImage(mask).sum() < math.prod(mask.GetSize())
    with_8_bit, p8 = pipeline.segment_image(image, Interpolator(), card, CPU, probabilities="uint8")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(with_8_bit), sitk.GetArrayFromImage(mask))
    assert p8.GetPixelID() == sitk.sitkUInt8 and Grid.from_image(p8) == Grid.from_image(mask)
    p = sitk.GetArrayFromImage(probabilities)
    assert np.abs(sitk.GetArrayFromImage(p8) / 255.0 - p).max() <= 0.5 / 255 + 1e-6
    (ball,) = lesion_table(mask, probabilities)
    (ball_8_bit,) = lesion_table(mask, p8)
    assert ball_8_bit["mean_probability"] == pytest.approx(ball["mean_probability"], abs=0.5 / 255)
    assert 0.5 < ball["mean_probability"] <= 1.0


def test_hr_output_overlays_a_2d_image():
    grid = Grid((50, 34), (0.5, 0.7), (3.0, -4.0), (1.0, 0.0, 0.0, 1.0))
    centre = grid.index_to_physical([23.6, 15.2])
    image = ball_image(grid, centre, 6.0)
    mask, _ = pipeline.segment_image(image, Interpolator(), _card(2), CPU)
    _assert_same_extent(mask, image)
    assert mask.GetSize() == (100, 68)
    (disc,) = lesion_table(mask)
    np.testing.assert_allclose(disc["centroid_lps_mm"], centre, atol=0.1)
    assert _equivalent_radius(disc) == pytest.approx(6.0, abs=0.35)


def test_super_resolved_image_lies_on_the_mask_grid():
    grid = Grid((10, 8, 6), (1.0, 1.5, 3.0), (5.0, 6.0, 7.0), tuple(_rotation(0.2, 0.1).ravel()))
    x = np.arange(10, dtype=np.float32) * 10.0  # a ramp along x: linear interpolation reproduces it
    image = grid.image_from_array(np.broadcast_to(x, (6, 8, 10)).copy())
    card = _card(3)
    card["preprocessing"]["lr_spacing"] = [1.0, 1.5, 3.0]  # no resampling to a working grid
    sr = pipeline.super_resolve_image(image, Interpolator(), card, CPU)
    mask, _ = pipeline.segment_image(image, Interpolator(), card, CPU)
    assert Grid.from_image(sr) == Grid.from_image(mask)
    hr_x = (np.arange(20) + 0.5) / 2 - 0.5  # HR voxel centres in LR index units
    expected = np.clip(hr_x, 0, 9) * 10.0 / 100.0  # ct window [0, 100] -> [0, 1]
    np.testing.assert_allclose(sitk.GetArrayFromImage(sr)[3, 5, 1:-1], expected[1:-1], atol=1e-5)


def test_single_slice_volume_with_a_2d_model(tiny_bundle_2d):
    card, net = load_bundle(tiny_bundle_2d)
    grid = Grid((30, 20, 1), (0.6, 0.4, 3.0), (1.0, 2.0, 3.0), tuple(_rotation(0.5, 0.2).ravel()))
    image = grid.image_from_array(np.random.default_rng(0).integers(0, 255, (1, 20, 30)).astype(np.uint8))
    mask, probabilities = pipeline.segment_image(image, net, card, CPU)
    assert mask.GetSize() == (60, 40, 1)
    np.testing.assert_allclose(mask.GetSpacing(), (0.3, 0.2, 3.0))
    _assert_same_extent(mask, image)
    on_input, _ = pipeline.segment_image(image, net, card, CPU, output_grid="input")
    assert Grid.from_image(on_input) == grid


def test_a_single_slice_volume_numbers_its_lesions_where_they_are(tiny_bundle_2d):
    """The lesion numbers made on the 2D proxy are lifted onto the volume with the mask."""
    card, net = load_bundle(tiny_bundle_2d)
    grid = Grid((30, 20, 1), (0.6, 0.4, 3.0), (1.0, 2.0, 3.0), tuple(_rotation(0.5, 0.2).ravel()))
    image = grid.image_from_array(np.random.default_rng(1).integers(0, 255, (1, 20, 30)).astype(np.uint8))
    _, probabilities = pipeline.segment_image(image, net, card, CPU)
    threshold = float(np.median(sitk.GetArrayViewFromImage(probabilities)))  # about half the voxels
    result = pipeline.segment_lesions(image, net, card, CPU, threshold=threshold, number_lesions=True)
    numbered, count = lesions.numbered_mask(result.mask, result.numbered)
    relabelled = lesions.numbered_lesions(result.mask)
    expected, expected_count = lesions.numbered_mask(result.mask, relabelled)
    assert count == expected_count > 1
    assert Grid.from_image(numbered) == Grid.from_image(expected) == Grid.from_image(result.mask)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(numbered), sitk.GetArrayFromImage(expected))
    # The table's coordinates are the volume's, not the 2D proxy's.
    rows, expected_rows = lesions.lesion_rows(result.numbered), lesions.lesion_rows(relabelled)
    for row, expected_row in zip(rows, expected_rows):
        np.testing.assert_allclose(row["centroid_ras_mm"], expected_row["centroid_ras_mm"], atol=1e-6)
        np.testing.assert_allclose(row["bbox_ras_min_mm"], expected_row["bbox_ras_min_mm"], atol=1e-6)


def test_roi_is_given_in_ras_and_keeps_the_geometry():
    centre = OBLIQUE.index_to_physical([19.3, 17.6, 4.2])
    image = ball_image(OBLIQUE, centre, 10.0)
    ras = np.asarray(centre) * [-1, -1, 1]
    box = [v for c in ras for v in (c - 6.0, c + 6.0)]
    mask, _ = pipeline.segment_image(image, Interpolator(), _card(3), CPU, roi=box)
    full_mask, _ = pipeline.segment_image(image, Interpolator(), _card(3), CPU)
    full, roi = Grid.from_image(full_mask), Grid.from_image(mask)
    assert all(n <= m for n, m in zip(roi.size, full.size)) and math.prod(roi.size) < math.prod(full.size)
    np.testing.assert_allclose(roi.spacing, full.spacing)
    # The ROI grid is a sub-grid of the full HR grid: its origin falls on a full-grid voxel centre ...
    start = full.physical_to_index(roi.origin)
    np.testing.assert_allclose(start, np.round(start), atol=1e-6)
    # ... it contains the whole box (given in RAS, so x and y flip sign) ...
    corners_lps = np.array([[x, y, z] for x in box[0:2] for y in box[2:4] for z in box[4:6]]) * [-1, -1, 1]
    inside = np.array([roi.physical_to_index(p) for p in corners_lps])
    assert np.all(inside >= -0.5) and np.all(inside <= np.asarray(roi.size) - 0.5)
    # ... and the mask there is the full mask's (the ROI gets context, so its faces are not extrapolated).
    i0 = np.round(start).astype(int)
    crop = sitk.GetArrayFromImage(full_mask)[tuple(slice(a, a + n) for a, n in zip(i0[::-1], roi.size[::-1]))]
    assert np.mean(crop != sitk.GetArrayFromImage(mask)) < 0.01
    with pytest.raises(UserError, match="does not overlap"):
        pipeline.segment_image(image, Interpolator(), _card(3), CPU, roi=[500, 510, 500, 510, 500, 510])


def _mri_card(**plausibility) -> dict:
    card = _card(3)
    card["preprocessing"]["normalization"] = {"kind": "mri"}
    card["plausibility"] = plausibility
    return card


def _head_with_lesion() -> sitk.Image:
    """A 2 mm "head" (tissue 100 with a gradient) holding a bright ball, on a dark background."""
    grid = Grid((40, 44, 36), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    head = sitk.GetArrayFromImage(ball_image(grid, grid.index_to_physical([20, 22, 18]), 30.0, sub=2))
    z = np.arange(36, dtype=np.float32)[:, None, None]
    lesion = sitk.GetArrayFromImage(ball_image(grid, grid.index_to_physical([26, 25, 20]), 7.0, sub=2))
    return grid.image_from_array(head * (1 + z / 70) + 2.0 * lesion)


def test_an_roi_is_normalised_with_the_whole_volume_levels():
    image = _head_with_lesion()
    card = _mri_card()
    full_mask, _ = pipeline.segment_image(image, Interpolator(), card, CPU)
    lesion = np.asarray([26, 25, 20]) * 2.0
    ras = lesion * [-1, -1, 1]
    box = [v for c in ras for v in (c - 12.0, c + 12.0)]
    mask, _ = pipeline.segment_image(image, Interpolator(), card, CPU, roi=box)
    full, roi = Grid.from_image(full_mask), Grid.from_image(mask)
    i0 = np.round(full.physical_to_index(roi.origin)).astype(int)
    crop = sitk.GetArrayFromImage(full_mask)[tuple(slice(a, a + n) for a, n in zip(i0[::-1], roi.size[::-1]))]
    # The pointwise network thresholds z-scores: with the crop's own statistics (a crop that is mostly
    # lesion) the mask would shrink; with the whole volume's it is the same mask.
    assert sitk.GetArrayFromImage(mask).sum() > 1000
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), crop)


def test_a_1mm_scan_reaches_a_2mm_model_by_block_averaging():
    rng = np.random.default_rng(0)
    grid = Grid((21, 20, 13), (1.0, 1.0, 1.0), (3.0, -4.0, 7.0), tuple(_rotation(0.3, 0.2).ravel()))
    image = grid.image_from_array(rng.uniform(0, 100, grid.size[::-1]).astype(np.float32))
    work = geometry.working_lr_grid(grid, _card(3)["preprocessing"])
    assert work.size == (11, 10, 7)  # overshoots the odd axes by half an LR voxel
    got = inputs.to_working_grid(image, work)
    padded = np.pad(sitk.GetArrayFromImage(image), [(0, 1), (0, 0), (0, 1)], mode="edge")
    expected = geometry.downsample_block(padded, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # 1.5 mm does not tile 2 mm: the input is resampled (antialiased linear) instead.
    coarse = Grid((14, 14, 9), (1.5, 1.5, 1.5), grid.origin, grid.direction)
    other = coarse.image_from_array(rng.uniform(0, 100, coarse.size[::-1]).astype(np.float32))
    work = geometry.working_lr_grid(coarse, _card(3)["preprocessing"])
    assert geometry.block_factors(coarse, work) is None
    np.testing.assert_allclose(
        inputs.to_working_grid(other, work),
        sitk.GetArrayFromImage(geometry.resample(other, work)),
        rtol=1e-6,
    )


def test_a_mask_covering_too_much_of_the_tissue_is_flagged():
    image = _head_with_lesion()
    warnings = []
    pipeline.segment_image(
        image, Interpolator(), _mri_card(max_tissue_fraction=0.01), CPU, warn=warnings.append
    )
    assert len(warnings) == 1 and "% of the tissue" in warnings[0] and "more than any lesion" in warnings[0]
    warnings.clear()
    pipeline.segment_image(
        image, Interpolator(), _mri_card(max_tissue_fraction=0.9), CPU, warn=warnings.append
    )
    assert warnings == []


def test_thick_slices_and_too_much_tissue_are_said_in_one_line():
    image = _head_with_lesion()  # 2 mm, about 113 mL of "tissue"
    grid = Grid((40, 44, 12), (2.0, 2.0, 6.0), (0.0, 0.0, 2.0), image.GetDirection())
    thick = geometry.resample(image, grid)
    warnings = []
    card = _mri_card(max_tissue_ml=50, tissue_hint="strip the skull first")
    pipeline.segment_image(thick, Interpolator(), card, CPU, warn=warnings.append)
    assert len(warnings) == 2
    assert "6 mm along axis z, 3.0x the model's 2 mm" in warnings[0]
    assert "mL of tissue, more than any training image (50 mL): strip the skull first" in warnings[1]
    warnings.clear()
    pipeline.segment_image(image, Interpolator(), _mri_card(max_tissue_ml=500), CPU, warn=warnings.append)
    assert warnings == []
    # Reordered for the network, the thick axis is still named as the file stores it.
    card = _mri_card(max_tissue_ml=500)
    card["preprocessing"]["orientation"] = "LPS"
    sideways = sitk.PermuteAxes(thick, [2, 0, 1])
    pipeline.segment_image(sideways, Interpolator(), card, CPU, warn=warnings.append)
    assert len(warnings) == 1 and "6 mm along axis x, 3.0x the model's 2 mm" in warnings[0]


def test_a_small_2d_image_is_said_to_be_small_in_pixels():
    """A tight crop (107 px; the ultrasound model works at 160) had been warned of as voxels of "1 mm along
    axis x, 1.6x the model's 0.62 mm" with "slices" between them: a PNG has neither."""
    grey = np.random.default_rng(4).integers(0, 100, (16, 20)).astype(np.float32)
    for image in (sitk.GetImageFromArray(grey), sitk.GetImageFromArray(grey[None])):  # as Slicer holds it
        warnings = []
        pipeline.segment_image(image, Interpolator(), _card(2), CPU, warn=warnings.append)
        assert warnings == [
            "the image is 20 px on its longer side, fewer than the 40 the model works at: it is enlarged, so "
            "expect a less accurate mask; a crop tight around a lesion also hides the tissue around it (give "
            "the whole image, and --roi for a region)"
        ]
    warnings = []
    pipeline.segment_image(
        sitk.GetImageFromArray(np.tile(grey, (2, 2))), Interpolator(), _card(2), CPU, warn=warnings.append
    )
    assert warnings == []
    # Pixels that are not square are coarse along one axis, not small: said in mm, as before.
    wide = sitk.GetImageFromArray(np.tile(grey, (1, 3)))  # 60 px wide
    wide.SetSpacing((0.1, 0.5))
    pipeline.segment_image(wide, Interpolator(), _card(2), CPU, warn=warnings.append)
    assert len(warnings) == 1 and "0.5 mm along axis y" in warnings[0], warnings


def test_constant_image_gives_an_empty_mask_and_a_warning(tiny_bundle_3d):
    card, net = load_bundle(tiny_bundle_3d)
    image = sitk.Image(12, 10, 8, sitk.sitkInt16) + 7
    warnings = []
    mask, probabilities = pipeline.segment_image(image, net, card, CPU, warn=warnings.append)
    assert mask.GetSize() == (24, 20, 16) and not sitk.GetArrayFromImage(mask).any()
    assert warnings and "constant" in warnings[0]
    # An ROI in the background of an image that is not constant had been called a constant image.
    array = np.zeros((16, 40, 40), np.int16)
    array[:, :, 30:] = np.random.default_rng(0).integers(400, 600, (16, 40, 10))
    warnings.clear()
    pipeline.segment_image(
        sitk.GetImageFromArray(array), net, card, CPU, roi=[-5, -1, -5, -1, 0, 10], warn=warnings.append
    )
    assert [w for w in warnings if "constant" in w or "one value" in w] == [
        "--roi covers one value only (background?): the mask is empty"
    ]


def test_image_smaller_than_a_window_is_padded_not_refused(tiny_bundle_3d):
    card, net = load_bundle(tiny_bundle_3d)
    image = sitk.GetImageFromArray(np.random.default_rng(1).random((2, 3, 3)).astype(np.float32))
    image.SetSpacing((2.0, 2.0, 2.0))
    mask, probabilities = pipeline.segment_image(image, net, card, CPU)
    assert mask.GetSize() == (6, 6, 4)
    values = sitk.GetArrayFromImage(probabilities)
    assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1


def test_bad_images_are_user_errors(tiny_bundle_3d, tiny_bundle_2d):
    card3, net3 = load_bundle(tiny_bundle_3d)
    card2, net2 = load_bundle(tiny_bundle_2d)
    volume = np.random.default_rng(2).random((6, 8, 8)).astype(np.float32)
    bad = volume.copy()
    bad[1, 2, 3] = np.nan
    bad[2, 2, 3] = bad[3, 2, 3] = -np.inf
    with pytest.raises(
        UserError, match=r"^the input has 2 infinite voxel\(s\); replace them before segmenting$"
    ):
        pipeline.segment_image(sitk.GetImageFromArray(bad), net3, card3, CPU)
    with pytest.raises(UserError, match="every voxel of the input is NaN"):
        pipeline.segment_image(sitk.GetImageFromArray(volume * np.nan), net3, card3, CPU)
    channels = np.stack([volume, volume * np.nan], -1)
    with pytest.raises(UserError, match=r"NaN \(in a channel, or in all\)"):
        pipeline.segment_image(sitk.GetImageFromArray(channels, isVector=True), net3, card3, CPU)
    with pytest.raises(UserError, match="2D image but .* 3D model"):
        pipeline.segment_image(sitk.GetImageFromArray(volume[0]), net3, card3, CPU)
    with pytest.raises(UserError, match="3D volume but .* 2D model"):
        pipeline.segment_image(sitk.GetImageFromArray(volume), net2, card2, CPU)
    with pytest.raises(UserError, match=r"one slice stored across its x axis \(size \(1, 8, 6\)\)"):
        pipeline.segment_image(sitk.GetImageFromArray(volume[:, :, :1]), net2, card2, CPU)
    four_d = sitk.JoinSeries([sitk.GetImageFromArray(volume)] * 2)
    with pytest.raises(UserError, match="4D"):
        pipeline.segment_image(four_d, net3, card3, CPU)
    mask, _ = pipeline.segment_image(sitk.JoinSeries([sitk.GetImageFromArray(volume)]), net3, card3, CPU)
    assert mask.GetSize() == (16, 16, 12)
    with pytest.raises(UserError, match="about .* GB .*--roi"):
        pipeline.segment_image(sitk.GetImageFromArray(volume), net3, card3, CPU, memory_limit=10_000)
    # A header in metres read as mm: 7.8 GB to an empty mask, or (1e-6 mm) a traceback past memory.
    metres = sitk.GetImageFromArray(volume)
    metres.SetSpacing((2.0, 2.0, 1e-6))
    with pytest.raises(UserError, match=r"voxels are 1e-06 mm along axis z, far finer than the 2 mm model"):
        pipeline.segment_image(metres, net3, card3, CPU)


def test_a_stack_of_pictures_is_refused_in_one_line(tiny_bundle_3d, tmp_path, capsys):
    # A multi-page TIFF of ultrasound frames went to the 3D brain model, which "found" a lesion in it.
    pages = sitk.GetImageFromArray(np.random.default_rng(3).integers(0, 255, (5, 40, 30), dtype=np.uint8))
    sitk.WriteImage(pages, str(tmp_path / "stack.tif"))
    out = tmp_path / "m.nrrd"
    args = ["segment", str(tmp_path / "stack.tif"), "-o", str(out), "--model", str(tiny_bundle_3d), "--quiet"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "stack.tif is a stack of 5 TIF pictures, not a scan" in err and len(err.splitlines()) == 1
    assert not out.exists()
    sitk.WriteImage(pages[:, :, :1], str(tmp_path / "page.tif"))  # one page is one picture
    assert cli.main([*args[:1], str(tmp_path / "page.tif"), *args[2:]]) == 2
    assert "is a 2D image but model" in capsys.readouterr().err


def test_rgb_input_for_a_greyscale_model(tiny_bundle_2d):
    card, net = load_bundle(tiny_bundle_2d)
    grey = np.random.default_rng(3).integers(0, 255, (20, 24)).astype(np.uint8)
    rgb = sitk.GetImageFromArray(np.stack([grey] * 3, -1), isVector=True)
    from_rgb, _ = pipeline.segment_image(rgb, net, card, CPU)
    from_grey, _ = pipeline.segment_image(sitk.GetImageFromArray(grey), net, card, CPU)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(from_rgb), sitk.GetArrayFromImage(from_grey))
    colour = np.stack([grey, grey[::-1], grey], -1)
    with pytest.raises(UserError, match="colour image"):
        pipeline.segment_image(sitk.GetImageFromArray(colour, isVector=True), net, card, CPU)
    # A yellow caliper mark burned into a greyscale export: read as the brightness a greyscale export has.
    marked = np.stack([grey] * 3, -1)
    marked[10, 4:16] = marked[4:16, 10] = (255, 220, 0)
    warnings = []
    from_marked, _ = pipeline.segment_image(
        sitk.GetImageFromArray(marked, isVector=True), net, card, CPU, warn=warnings.append
    )
    luma = np.rint(marked @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    from_luma, _ = pipeline.segment_image(sitk.GetImageFromArray(luma), net, card, CPU)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(from_marked), sitk.GetArrayFromImage(from_luma))
    assert warnings == [
        "4.9 % of the image's non-black pixels are coloured (annotations?): it is read as its brightness "
        "(luminance)"
    ]
    # JPEG smears a mark's colour faintly around it: not counted, and grey with rounding noise is grey.
    smeared = marked.astype(int)
    smeared[2:18, 2:18] += np.array([12, 0, -12])
    warnings.clear()
    pipeline.segment_image(
        sitk.GetImageFromArray(smeared.clip(0, 255).astype(np.uint8), isVector=True),
        net,
        card,
        CPU,
        warn=warnings.append,
    )
    assert len(warnings) == 1 and "coloured (annotations?)" in warnings[0]  # the smear is over half of it
    # A colour overlay is refused whatever black frame surrounds it.
    doppler = np.stack([grey] * 3, -1)
    doppler[4:12, 6:14] = (200, 40, 40)  # 13 % of the image
    framed = np.zeros((60, 72, 3), np.uint8)
    framed[20:40, 24:48] = doppler
    with pytest.raises(
        UserError,
        match=r"1\d\.\d % of its non-black pixels coloured: over the 5 % burned-in annotations take",
    ):
        pipeline.segment_image(sitk.GetImageFromArray(framed, isVector=True), net, card, CPU)
    # One grey shown in a tint (sepia; a scanner's chroma map) was refused as colour: it is read as its
    # luminance too.
    sepia = np.rint(np.stack([grey, 0.9 * grey, 0.75 * grey], -1)).astype(np.uint8)
    warnings.clear()
    from_sepia, _ = pipeline.segment_image(
        sitk.GetImageFromArray(sepia, isVector=True), net, card, CPU, warn=warnings.append
    )
    luma = np.rint(sepia @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    from_luma, _ = pipeline.segment_image(sitk.GetImageFromArray(luma), net, card, CPU)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(from_sepia), sitk.GetArrayFromImage(from_luma))
    assert len(warnings) == 1 and warnings[0].startswith("the image is tinted")
    # ... with a few marks burned in over the tint too (a yellow line on 1.7 % of the pixels).
    sepia[7] = (255, 255, 0)
    pipeline.segment_image(sitk.GetImageFromArray(sepia, isVector=True), net, card, CPU)
    # A dim tint, whose channels never differ by the 48 levels colour marks do, is said to be one too
    # (it was read without a word), and a grey stored as RGB with JPEG's noise is not.
    dim = np.rint(np.stack([0.7 * grey, 0.63 * grey, 0.52 * grey], -1)).astype(np.uint8)
    noisy = np.clip(
        np.stack([grey] * 3, -1) + np.random.default_rng(2).normal(0, 2, (*grey.shape, 3)), 0, 255
    )
    for rgb, tinted in ((dim, True), (noisy.astype(np.uint8), False)):
        warnings.clear()
        pipeline.segment_image(
            sitk.GetImageFromArray(rgb, isVector=True), net, card, CPU, warn=warnings.append
        )
        assert any(w.startswith("the image is tinted") for w in warnings) == tinted, warnings


def grid_like(image: sitk.Image, array: np.ndarray) -> sitk.Image:
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def test_nan_outside_the_scan_is_its_background():
    """Some tools fill what lies outside a mask or a field of view with NaN (no data). That was refused;
    it is now read as the image's lowest value, the background, with a warning: the same mask as the
    scan with that value as its background."""
    head = _head_with_lesion()
    array = sitk.GetArrayFromImage(head)
    background = array == array.min()
    with_nan = np.where(background, np.nan, array).astype(np.float32)
    image = grid_like(head, with_nan)
    card = _mri_card()
    warnings = []
    mask, probs = pipeline.segment_image(image, Interpolator(), card, CPU, warn=warnings.append)
    lowest = float(np.nanmin(with_nan))  # the background's own value is unknown where it is NaN
    plain = grid_like(head, np.where(background, lowest, array).astype(np.float32))
    plain_mask, plain_probs = pipeline.segment_image(plain, Interpolator(), card, CPU)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(plain_mask))
    np.testing.assert_allclose(sitk.GetArrayFromImage(probs), sitk.GetArrayFromImage(plain_probs), atol=1e-6)
    share = 100 * background.mean()
    assert warnings == [
        f"{int(background.sum())} voxel(s) ({share:.1f} %) are NaN (no data): read as the image's lowest value "
        f"({lowest:g})"
    ]
    assert sitk.GetArrayFromImage(mask).any()


def test_noise_is_measured_against_the_tissues_range_whatever_its_units():
    rng = np.random.default_rng(4)
    z, y, x = np.mgrid[:40, :48, :44].astype(np.float32)
    tissue = (z - 20) ** 2 + (y - 24) ** 2 + (x - 22) ** 2 < 18**2
    smooth = np.where(tissue, 100 + 2.5 * x, 0).astype(np.float32)  # tissue 100..210
    for sd in (1.0, 5.0, 10.0):
        noisy = smooth + rng.normal(0, sd, smooth.shape).astype(np.float32)
        spread = np.subtract(*np.percentile(noisy[tissue], [99, 1]))
        assert noise.relative_noise(noisy, tissue) == pytest.approx(sd / spread, rel=0.1), sd
        assert noise.relative_noise(3 * noisy - 50, tissue) == pytest.approx(
            noise.relative_noise(noisy, tissue), rel=1e-4
        )
    assert noise.relative_noise(smooth, tissue) < 0.01


def test_a_scan_noisier_than_training_is_smoothed_first_and_says_so():
    """Rician noise of 5 / 8 / 10 % of the range took the brain model's validation Dice from 0.818 to
    0.776 / 0.617 / 0.558; smoothed by 0.7 voxel first, 0.824 / 0.817 / 0.789. A clean scan is not
    touched: its mask is the one it had."""
    head = _head_with_lesion()
    array = sitk.GetArrayFromImage(head)
    card = _mri_card()
    clean_warnings = []
    pipeline.segment_image(head, Interpolator(), card, CPU, warn=clean_warnings.append)
    assert not any("noisy" in w for w in clean_warnings)
    noisy = array + np.random.default_rng(6).normal(0, 25, array.shape).astype(np.float32) * (array > 0)
    warnings = []
    _, got = pipeline.segment_image(grid_like(head, noisy), Interpolator(), card, CPU, warn=warnings.append)
    (said,) = [w for w in warnings if "noisy" in w]
    assert said.startswith("the scan is noisy (noise about ") and "smoothed by 0.7 voxel" in said
    # An ROI around the lesion is smoothed as the whole scan is, and normalised as it is: the same mask.
    lesion = np.asarray([26, 25, 20]) * 2.0 * [-1, -1, 1]
    box = [v for c in lesion for v in (c - 12.0, c + 12.0)]
    roi_mask, _ = pipeline.segment_image(grid_like(head, noisy), Interpolator(), card, CPU, roi=box)
    full_mask, _ = pipeline.segment_image(grid_like(head, noisy), Interpolator(), card, CPU)
    full, roi = Grid.from_image(full_mask), Grid.from_image(roi_mask)
    i0 = np.round(full.physical_to_index(roi.origin)).astype(int)
    crop = sitk.GetArrayFromImage(full_mask)[tuple(slice(a, a + n) for a, n in zip(i0[::-1], roi.size[::-1]))]
    assert sitk.GetArrayFromImage(roi_mask).sum() > 1000
    np.testing.assert_array_equal(sitk.GetArrayFromImage(roi_mask), crop)
    # The same as smoothing it by hand first (the smoothed scan is no longer noisy enough to be again).
    smoothed = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(noisy), 0.7))
    by_hand = []
    _, want = pipeline.segment_image(
        grid_like(head, smoothed), Interpolator(), card, CPU, warn=by_hand.append
    )
    assert not any("noisy" in w for w in by_hand)
    np.testing.assert_allclose(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(want), atol=1e-6)


def test_an_8_bit_model_reads_the_same_pixels_stored_in_any_type_alike():
    """An ultrasound image stored as 16 bits (PNG's x 257), 12 bits, or floats in 0..1 was read as 0..255:
    BUSI validation 0.748 / 0.655 instead of 0.769, without a word. Each is now brought to 0..255 (and
    says so); 8-bit values in a wider type, or a resampling's overshoot, are taken as they are."""
    card = _card(2)
    card["preprocessing"]["normalization"] = {"kind": "uint8"}
    grey = np.random.default_rng(8).integers(0, 256, (30, 36)).astype(np.uint8)
    grey[0, 0] = 255  # the 16-bit PNG's maximum is then 65535

    def probabilities(array, isVector=False):
        warnings = []
        image = sitk.GetImageFromArray(array, isVector=isVector)
        _, probs = pipeline.segment_image(image, Interpolator(), card, CPU, warn=warnings.append)
        return sitk.GetArrayFromImage(probs), warnings

    reference, none = probabilities(grey)
    assert none == []
    same = {
        "16 bits": grey.astype(np.uint16) * 257,
        "12 bits": np.rint(grey * (4095 / 255)).astype(np.uint16),  # 0..4095
        "0..1": grey.astype(np.float32) / 255,
        "standardised": (grey.astype(np.float32) - 120) / 70,  # 0..255 -> -1.71..1.93
        "centred": grey.astype(np.float32) - 127.5,  # -127.5..127.5
    }
    for name, array in same.items():
        got, warnings = probabilities(array)
        # 12 bits hold each 8-bit value to within 1/32 of a level; this stand-in's slope is 40 per unit.
        np.testing.assert_allclose(got, reference, atol=2e-3 if name == "12 bits" else 1e-4, err_msg=name)
        assert len(warnings) == 1 and "takes 8-bit images (0..255)" in warnings[0], (name, warnings)
    assert "(0..65535) are read as 16-bit values (divided by 257)" in probabilities(same["16 bits"])[1][0]
    # A dark 16-bit image stays as dark: its bit depth, not its maximum, sets the scale.
    dark, _ = probabilities((grey // 2).astype(np.uint16) * 257)
    np.testing.assert_allclose(dark, probabilities(grey // 2)[0], atol=1e-4)
    assert "(0..1) are multiplied by 255" in probabilities(same["0..1"])[1][0]
    assert (
        "(-1.71429..1.92857) are mapped from -1.71429..1.92857 to 0..255"
        in probabilities(same["standardised"])[1][0]
    )
    negative = grey.astype(np.int16) * 8 - 1000  # -1000..1040: no 8-bit units
    assert "mapped from -1000..1040 to 0..255" in probabilities(negative)[1][0]
    np.testing.assert_allclose(probabilities(negative)[0], reference, atol=1e-4)
    # A constant image below zero says so, as any constant image does (it divided by zero).
    assert probabilities(np.full((30, 36), -5.0, np.float32))[1] == [
        "the input image is constant (no contrast): the mask is empty"
    ]
    # K-space truncation's ringing: -97..294 on BUSI images, below 0 on at most 3.9 % of an image.
    overshoot = grey.astype(np.float32)
    overshoot.ravel()[::30] -= 90  # 3.3 % of the pixels, 90 lower
    overshoot[0, 1] = 290
    assert overshoot.min() < -16 and probabilities(overshoot)[1] == []
    image = sitk.GetImageFromArray(overshoot)
    assert pixels.in_8_bit_range(image, print) is image  # taken as it is
    assert probabilities(grey.astype(np.uint16))[1] == []
    # Grey + transparency (a PNG's LA mode, two components in Slicer): the grey is segmented.
    got, warnings = probabilities(np.stack([grey, np.full_like(grey, 255)], -1), isVector=True)
    np.testing.assert_array_equal(got, reference)
    assert warnings == [
        "the image has 2 components per pixel, read as grey and transparency: the grey one is segmented"
    ]
    # Of an MRI, two components are two contrasts: which one the model wants is not guessed.
    mri = _card(3)
    volume = sitk.GetImageFromArray(np.zeros((8, 10, 12, 2), np.float32), isVector=True)
    with pytest.raises(UserError, match="2 component"):
        pipeline.segment_image(volume, Interpolator(), mri, CPU)
    # Three, even grey ones: frames or screenshots stacked, which a scan's model had segmented as a scan.
    frames = sitk.GetImageFromArray(np.repeat(np.ones((8, 10, 12, 1), np.uint8) * 90, 3, -1), isVector=True)
    with pytest.raises(
        UserError,
        match=r"^the input is a volume of 3 channels per voxel \(colour: screenshots or frames stacked\?\) but the model takes one channel, the scan's own values \(CT\)",
    ):
        pipeline.segment_image(frames, Interpolator(), mri, CPU)
    # A 2D picture of grey stored as RGB goes on to a 2D model of that kind: its grey was trained on.
    flat = sitk.GetImageFromArray(np.repeat(grey[..., None], 3, -1).astype(np.uint8), isVector=True)
    assert pipeline.segment_image(flat, Interpolator(), _card(2), CPU)[0].GetSize() == (72, 60)


def test_a_png_of_grey_and_transparency_is_read_as_slicer_reads_it(tmp_path):
    """SimpleITK reads no greyscale PNG with an alpha channel (its error named its own source file): an
    8-bit one is read as grey + alpha, two components, as Slicer reads it; another is refused in words."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    def png(bits: int, pixel: bytes):
        rows = b"".join(b"\0" + pixel * 8 for _ in range(6))  # filter 0, 8 pixels a row
        data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 6, bits, 4, 0, 0, 0))
        data += chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
        path = tmp_path / f"grey-alpha-{bits}.png"
        path.write_bytes(data)
        return path

    image = imageio.read_image(png(8, bytes([100, 255])))
    assert image.GetSize() == (8, 6) and image.GetNumberOfComponentsPerPixel() == 2
    assert image.GetSpacing() == (1.0, 1.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image)[2, 3], [100, 255])
    path = png(16, bytes([1, 0, 255, 255]))
    with pytest.raises(UserError) as error:
        imageio.read_image(path)
    assert str(error.value) == (
        f"cannot read {path}: its pixel type is one this tool cannot read (a greyscale PNG with "
        "transparency?); save it as plain greyscale or RGB"
    )


def test_threshold_and_tta_change_the_result(tiny_bundle_3d):
    card, net = load_bundle(tiny_bundle_3d)
    image = sitk.GetImageFromArray(np.random.default_rng(4).random((6, 10, 10)).astype(np.float32))
    mask, probabilities = pipeline.segment_image(image, net, card, CPU, threshold=0.52)
    p = sitk.GetArrayFromImage(probabilities)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), p >= 0.52)
    _, with_tta = pipeline.segment_image(image, net, card, CPU, tta=True)
    assert np.abs(sitk.GetArrayFromImage(with_tta) - p).max() > 1e-4  # an untrained net is not flip-invariant


def test_memory_check_prices_what_is_kept():
    grid = Grid((64, 64, 40), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    image = ball_image(grid, grid.index_to_physical([30, 30, 20]), 12.0)
    card = _card(3)
    hr = geometry.hr_grid(grid, 2)
    need = {
        kind: memory.estimate_bytes(grid, hr, hr, (24, 24, 24), card, 1, kind)
        for kind in memory.PROBABILITY_KINDS
    }
    assert need["none"] < need["uint8"] < need["float32"]
    # Each extra byte per HR voxel shows: 2 for 8-bit probabilities, 8 for float32 ones.
    assert need["float32"] - need["uint8"] == 6 * math.prod(hr.size)
    # An input reordered to the model's axis order has each output copied back, the largest at a time.
    for kind, extra in (("none", 1), ("uint8", 1), ("float32", 4)):
        reordered = memory.estimate_bytes(grid, hr, hr, (24, 24, 24), card, 1, kind, reordered=True)
        assert reordered - need[kind] == extra * math.prod(hr.size)
    limit = (need["none"] + need["uint8"]) // 2  # enough for the mask alone, not for a lesion table
    mask, _ = pipeline.segment_image(
        image, Interpolator(), card, CPU, memory_limit=limit, probabilities="none"
    )
    assert sitk.GetArrayFromImage(mask).any()
    with pytest.raises(UserError, match="--roi"):
        pipeline.segment_image(image, Interpolator(), card, CPU, memory_limit=limit, probabilities="uint8")


def test_segments_where_the_system_does_not_say_how_much_memory_is_free(monkeypatch):
    # Slicer's Python has no psutil, and Windows' has no os.sysconf (the old fallback's crash on every run
    # there); here the Windows call fails too.
    monkeypatch.setitem(sys.modules, "psutil", None)
    monkeypatch.delattr(os, "sysconf")
    monkeypatch.setattr(sys, "platform", "win32")
    grid = Grid((32, 32, 20), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    image = ball_image(grid, grid.index_to_physical([15, 15, 10]), 6.0)
    mask, _ = pipeline.segment_image(image, Interpolator(), _card(3), CPU)
    assert sitk.GetArrayFromImage(mask).any()


class _WindowRecorder(Interpolator):
    """Records the shape of every window the network is given."""

    def __init__(self):
        super().__init__()
        self.windows = []

    def forward(self, x):
        self.windows.append(tuple(x.shape[2:]))
        return super().forward(x)


def test_a_batch_normalised_model_predicts_the_whole_image_in_one_window():
    grid = Grid((40, 36, 20), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    image = ball_image(grid, grid.index_to_physical([20, 18, 10]), 8.0)
    per_window = {}
    for norm in ("instance", "batch"):
        card = _card(3)
        card["network"]["norm"] = norm
        net = _WindowRecorder()
        mask, _ = pipeline.segment_image(image, net, card, CPU)
        per_window[norm] = (net.windows, sitk.GetArrayFromImage(mask))
    windows, mask = per_window["batch"]
    assert windows == [(20, 36, 40)]  # array order (z, y, x), the whole working grid
    # Instance norm: the training patch (12^3), overlapping by half.
    assert len(per_window["instance"][0]) == 6 * 5 * 3 and set(per_window["instance"][0]) == {(12, 12, 12)}
    np.testing.assert_array_equal(mask, per_window["instance"][1])  # this network is window-invariant


def test_an_mri_is_predicted_on_its_tissue_box_only_with_the_same_mask(monkeypatch):
    """A skull-stripped brain fills a third of its volume's box: the network sees the tissue's box and a
    margin of background, and the rest of the HR volume is probability 0."""
    grid = Grid((40, 36, 20), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    ball = ball_image(grid, grid.index_to_physical([12, 20, 10]), 8.0)
    ramp = sitk.GetArrayFromImage(ball) * (1.0 + np.linspace(0.0, 1.0, 40))  # contrast inside the "tissue"
    image = grid.image_from_array(ramp.astype(np.float32))
    card = _card(3)
    card["network"]["norm"] = "batch"
    card["preprocessing"]["normalization"] = {"kind": "mri"}
    masks, windows, support_box = [], [], inputs.support_box
    for box in (support_box, lambda tissue, margin=None, align=1: None):
        monkeypatch.setattr(inputs, "support_box", box)
        net = _WindowRecorder()
        masks.append(sitk.GetArrayFromImage(pipeline.segment_image(image, net, card, CPU)[0]))
        windows.append(net.windows)
    margin = inputs.SUPPORT_MARGIN_LR
    # The ball spans x 8..16, y 16..24, z 6..14 (partial voxels included); array order (z, y, x).
    assert windows == [[(20, 9 + 2 * margin, min(40, 17 + margin))], [(20, 36, 40)]]
    assert masks[0].any()
    np.testing.assert_array_equal(masks[0], masks[1])
    tissue = np.zeros((20, 36, 40), bool)
    tissue[9:11, 2:5, 30:33] = True
    assert support_box(tissue, 2) == (slice(7, 13), slice(0, 7), slice(28, 35))
    # Faces a multiple of the network's stride from the array's: its pooling grid stays the whole
    # volume's, from either end (flipped test-time passes pool from the far end).
    assert support_box(tissue, 2, align=4) == (slice(4, 16), slice(0, 8), slice(28, 36))
    assert support_box(np.ones((4, 4), bool)) is None and support_box(None) is None
    monkeypatch.setattr(inputs, "support_box", support_box)
    deep = dict(card, network={**card["network"], "features": [4, 8, 16, 32]})  # stride 8
    prepared = inputs.prepare_input(image, deep, None, "hr", 1, 64 << 30, lambda m: None, "none")
    shape = tuple(prepared.lr.shape[1:])
    assert prepared.support != tuple(slice(0, n) for n in shape)
    assert all(b.start % 8 == 0 and (n - b.stop) % 8 == 0 for b, n in zip(prepared.support, shape))
    # An instance-normalised network runs on its training patches: no box that would shrink them.
    instance = dict(card, network={**card["network"], "norm": "instance"})
    assert (
        inputs.prepare_input(image, instance, None, "hr", 1, 64 << 30, lambda m: None, "none").support is None
    )


def test_the_tissue_box_holds_every_channels_tissue_whatever_channel_is_blank():
    """Two channels with tissue at opposite ends and a blank one (a missing modality stored as zeros),
    in any order: the box covers both tissues."""
    grid = Grid((64, 24, 20), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    ramp = 1.0 + np.linspace(0.0, 1.0, 64, dtype=np.float32)
    left, right = (
        sitk.GetArrayFromImage(ball_image(grid, grid.index_to_physical([x, 12, 10]), 8.0)) * ramp
        for x in (8, 56)
    )
    card = _card(3)
    card["network"]["norm"] = "batch"
    card["network"]["in_channels"] = 3
    card["preprocessing"]["normalization"] = {"kind": "mri"}
    blank = np.zeros_like(left)
    for channels in ((left, blank, right), (blank, left, right), (left, right, blank)):
        image = sitk.GetImageFromArray(np.stack(channels, axis=-1).astype(np.float32), isVector=True)
        image.CopyInformation(grid.image_from_array(blank))
        prepared = inputs.prepare_input(image, card, None, "hr", 1, 64 << 30, lambda m: None, "none")
        nonzero = np.argwhere(prepared.lr.numpy().any(axis=0))
        box = prepared.support or tuple(slice(0, n) for n in prepared.lr.shape[1:])
        assert all(b.start <= lo and hi < b.stop for b, lo, hi in zip(box, nonzero.min(0), nonzero.max(0)))


def test_windows_shrink_to_the_fewest_tiles_that_fit_and_never_below_the_training_patch(monkeypatch):
    card = _card(3)
    card["network"]["norm"] = "batch"
    spatial = (80, 120, 120)
    assert memory.choose_window(card, spatial, 0.25, lambda w: True) == spatial
    # Activations grow with the window: a budget for about half the volume splits the longest axis in two.
    per_lr_voxel = memory.activation_bytes(card, (2, 2, 2), 1)
    budget = 0.6 * per_lr_voxel * math.prod(spatial)
    half = memory.choose_window(card, spatial, 0.25, lambda w: math.prod(w) * per_lr_voxel <= budget)
    assert half == (80, 69, 120)  # 2 windows of 69 overlapping by a quarter cover 120 (ties: the first axis)
    assert [len(window_starts(n, w, 0.25)) for n, w in zip(spatial, half)] == [1, 2, 1]
    assert memory.choose_window(card, spatial, 0.25, lambda w: False) == (12, 12, 12)
    card["network"]["norm"] = "instance"
    assert memory.choose_window(card, spatial, 0.25, lambda w: True) == (12, 12, 12)
    assert memory.choose_window(card, (6, 40, 40), 0.25, lambda w: True) == (6, 12, 12)
    # However much memory is free, a volume's windows add at most LARGE_WINDOW_EXTRA_BYTES (made small
    # here, so that a small volume is tiled).
    card["network"]["norm"] = "batch"
    monkeypatch.setattr(inputs, "LARGE_WINDOW_EXTRA_BYTES", 4 << 20)
    grid = Grid((64, 64, 40), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    image = ball_image(grid, grid.index_to_physical([30, 30, 20]), 12.0)
    hr = geometry.hr_grid(grid, 2)
    prepared = inputs.prepare_input(image, card, None, "hr", 1, 64 << 30, lambda m: None, "none", 0.25)
    assert all(12 <= w for w in prepared.window) and prepared.window != (40, 64, 64)

    def need(window):
        return memory.estimate_bytes(grid, hr, hr, tuple(2 * w for w in window), card, 1, "none")

    assert need(prepared.window) <= need((12, 12, 12)) + (4 << 20)


class _FlipRecorder(Interpolator):
    """Records which of the input's rows and columns come first: a flipped input arrives reversed."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def forward(self, x):
        ramp = x[0, 0]
        self.seen.add((bool(ramp[0, 0] > ramp[-1, 0]), bool(ramp[0, 0] > ramp[0, -1])))
        return super().forward(x)


def test_tta_flips_only_the_axes_the_model_was_trained_to_flip():
    y, x = np.mgrid[:20, :30]
    image = sitk.GetImageFromArray((y * 100 + x).astype(np.float32))
    card = _card(2)
    card["preprocessing"]["normalization"] = {"kind": "ct", "window": [0.0, 3000.0]}
    recorder = _FlipRecorder()
    pipeline.segment_image(image, recorder, card, CPU, tta=True)
    assert recorder.seen == {(False, False), (True, False), (False, True), (True, True)}
    card["training"] = {"config": {"flip_axes": [1]}}  # left-right only, like the ultrasound model
    recorder = _FlipRecorder()
    pipeline.segment_image(image, recorder, card, CPU, tta=True)
    assert recorder.seen == {(False, False), (False, True)}


# ------------------------------------------------------------------------------------- command line


def _write_volume(path, seed=0, size=(10, 12, 8)):
    # A smooth scene with a little noise: pure noise is (rightly) flagged as a noisy scan.
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(size[::-1], dtype=np.float32)
    centre = rng.uniform(2, 6, 3)
    blob = np.exp(-((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) / 8)
    array = (4 * x + 3 * y + 2 * z + 60 * blob + rng.normal(0, 0.5, blob.shape)).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.5, 1.5, 2.5))
    image.SetOrigin((-10.0, 20.0, 5.0))
    sitk.WriteImage(image, str(path))
    return image


def test_cli_single_input_with_every_output(tmp_path, tiny_bundle_3d, capsys):
    image = _write_volume(tmp_path / "in.nrrd")
    out = tmp_path / "out"
    args = [
        "segment",
        str(tmp_path / "in.nrrd"),
        "-o",
        str(out / "mask.seg.nrrd"),
        "--model",
        str(tiny_bundle_3d),
    ]
    args += [
        "--probabilities",
        str(out / "p.nii.gz"),
        "--sr-image",
        str(out / "sr.mha"),
        "--lesion-table",
        str(out / "l.json"),
    ]
    args += ["--figure", str(out / "f.png"), "--tta", "--threshold", "0.4", "--quiet", "--device", "cpu"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    mask = sitk.ReadImage(str(out / "mask.seg.nrrd"))
    assert mask.GetPixelID() == sitk.sitkUInt8 and set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}
    _assert_same_extent(mask, image)
    probabilities = sitk.ReadImage(str(out / "p.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(probabilities) >= 0.4)
    sr = sitk.ReadImage(str(out / "sr.mha"))
    assert sr.GetSize() == mask.GetSize() and sr.GetPixelID() == sitk.sitkFloat32
    table = json.loads((out / "l.json").read_text())
    assert table["threshold"] == 0.4 and len(table["lesions"]) == len(lesion_table(mask))
    figure = sitk.ReadImage(str(out / "f.png"))
    assert figure.GetNumberOfComponentsPerPixel() == 3 and figure.GetSize()[0] > figure.GetSize()[1]
    assert sorted(p.name for p in out.iterdir()) == ["f.png", "l.json", "mask.seg.nrrd", "p.nii.gz", "sr.mha"]
    # Run again: refused without --overwrite, replaced with it (and --output-grid input).
    assert cli.main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main([*args, "--overwrite", "--output-grid", "input"]) == 0
    assert Grid.from_image(sitk.ReadImage(str(out / "mask.seg.nrrd"))) == Grid.from_image(image)


def test_a_cancel_at_any_write_leaves_no_output_and_keeps_the_old_ones(
    tmp_path, tiny_bundle_3d, monkeypatch, capsys
):
    from SASSRSegmentLib.io import imageio

    _write_volume(tmp_path / "in.nrrd")
    out = tmp_path / "out"
    names = ["m.nrrd", "p.nii.gz", "sr.mha", "t.csv", "f.png"]
    flags = ["-o", "--probabilities", "--sr-image", "--lesion-table", "--figure"]
    args = ["segment", str(tmp_path / "in.nrrd"), "--model", str(tiny_bundle_3d), "--quiet", "--overwrite"]
    for flag, name in zip(flags, names):
        args += [flag, str(out / name)]
    assert cli.main(args) == 0
    names.append("t.provenance.json")  # the CSV table's sidecar
    before = {name: (out / name).read_bytes() for name in names}
    real_write = imageio.Staging.path
    for fail_at in range(len(names) + 1):  # a Ctrl-C as each output is staged, and just before the commit
        calls = []

        def staged(self, path, fail_at=fail_at, calls=calls):
            calls.append(path)
            if len(calls) == fail_at + 1:
                raise KeyboardInterrupt
            return real_write(self, path)

        monkeypatch.setattr(imageio.Staging, "path", staged)
        if fail_at == len(names):
            monkeypatch.setattr(
                imageio.Staging, "commit", lambda self: (_ for _ in ()).throw(KeyboardInterrupt)
            )
        assert cli.main([*args, "--threshold", "0.3"]) == 130
        assert "cancelled" in capsys.readouterr().err
        monkeypatch.undo()
        assert sorted(p.name for p in out.iterdir()) == sorted(names), fail_at  # no partial files
        assert {name: (out / name).read_bytes() for name in names} == before, fail_at


def test_a_cancelled_batch_keeps_and_lists_the_inputs_that_finished(
    tmp_path, tiny_bundle_3d, monkeypatch, capsys
):
    (tmp_path / "in").mkdir()
    for k in range(3):
        _write_volume(tmp_path / "in" / f"case{k}.nrrd", k)
    finished = []
    real = segment_command._Session.segment

    def stop_at_third(self, job, where, staging):
        if len(finished) == 2:
            raise KeyboardInterrupt
        finished.append(job.item.name)
        return real(self, job, where, staging)

    monkeypatch.setattr(segment_command._Session, "segment", stop_at_third)
    args = ["segment", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(tiny_bundle_3d)]
    assert cli.main([*args, "--lesion-table", str(tmp_path / "t.csv"), "--progress", "quiet"]) == 130
    err = capsys.readouterr().err
    assert "finished and kept: case0.nrrd, case1.nrrd; not done: case2.nrrd" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case0_mask.nrrd", "case1_mask.nrrd"]
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert {r["case"] for r in rows} <= {"case0", "case1"}


def test_the_summary_says_where_each_output_went(tmp_path, tiny_bundle_3d, capsys):
    _write_volume(tmp_path / "in.nrrd")
    out = tmp_path / "out"
    args = ["segment", str(tmp_path / "in.nrrd"), "-o", str(out / "m.nrrd"), "--model", str(tiny_bundle_3d)]
    args += ["--lesion-table", str(out / "t.csv"), "--figure", str(out / "f.png"), "--progress", "bar"]
    assert cli.main(args) == 0
    summary = [line for line in capsys.readouterr().err.splitlines() if "in: " in line]
    assert len(summary) == 1 and " mL in total; wrote " in summary[0]
    assert all(str(out / name) in summary[0] for name in ("m.nrrd", "t.csv", "f.png"))
    # A volume without lesions is still counted in mL (it had read "0.0 mm2", as for an image).
    assert cli.main([*args, "--threshold", "0.9999", "--overwrite"]) == 0
    summary = [line for line in capsys.readouterr().err.splitlines() if "in: " in line]
    assert "in: 0 lesion(s), 0.00 mL in total" in summary[0]


def test_the_table_is_clinical_first_with_provenance_beside_it(tmp_path, tiny_bundle_3d):
    (tmp_path / "patient-smith").mkdir()
    source = tmp_path / "patient-smith" / "in.nrrd"
    _write_volume(source)
    out = tmp_path / "out"
    base = ["segment", str(source), "--model", str(tiny_bundle_3d), "--quiet"]
    assert cli.main([*base, "-o", str(out / "m.nrrd"), "--lesion-table", str(out / "t.csv")]) == 0
    # A threshold no probability reaches: no lesion, the same header.
    assert (
        cli.main(
            [*base, "-o", str(out / "e.nrrd"), "--lesion-table", str(out / "e.csv"), "--threshold", "0.9999"]
        )
        == 0
    )
    header = (out / "t.csv").read_text().splitlines()[0].split(",")
    assert (out / "e.csv").read_text().splitlines() == [",".join(header)]
    assert header[:5] == [
        "id",
        "volume_ml",
        "axial_diameter_mm",
        "perpendicular_diameter_mm",
        "longest_diameter_mm",
    ]
    assert header[5:9] == ["centroid_ras_x_mm", "centroid_ras_y_mm", "centroid_ras_z_mm", "mean_probability"]
    rows = list(csv.DictReader((out / "t.csv").open()))
    assert rows and all(len(r["axial_diameter_mm"].split(".")[-1]) <= 1 for r in rows)
    record = json.loads((out / "t.provenance.json").read_text())
    assert record["input"] == "in.nrrd" and "patient-smith" not in (out / "t.provenance.json").read_text()
    assert (
        record["model"] == "tiny-3d"
        and record["threshold"] == 0.5
        and record["software"].startswith("SASSRSegment")
    )
    assert record["measurement_plane"].startswith("axial")
    header_record = json.loads(sitk.ReadImage(str(out / "m.nrrd")).GetMetaData("SASSRSegment_provenance"))
    assert {k: v for k, v in header_record.items() if k != "created_utc"} == {
        k: v for k, v in record.items() if k != "created_utc"
    }


def test_segment_measures_diameters_only_for_a_lesion_table(tmp_path, monkeypatch, tiny_bundle_3d):
    # Its summary line needs counts and volumes only; the diameters are the table's costly columns.
    from SASSRSegmentLib.inference import lesions

    _write_volume(tmp_path / "in.nrrd")
    calls = []
    original = lesions.lesion_rows  # what the table and the command both measure through
    monkeypatch.setattr(lesions, "lesion_rows", lambda *a, **k: calls.append(k) or original(*a, **k))
    base = ["segment", str(tmp_path / "in.nrrd"), "--model", str(tiny_bundle_3d), "--quiet"]
    assert cli.main([*base, "-o", str(tmp_path / "a.nrrd")]) == 0
    assert cli.main([*base, "-o", str(tmp_path / "b.nrrd"), "--lesion-table", str(tmp_path / "b.csv")]) == 0
    # (the table's header comes from a one-voxel table, measured too)
    assert [k.get("diameters", True) for k in calls] == [False, True, True]


def test_cli_progress_json_lines(tmp_path, tiny_bundle_3d, capsys):
    _write_volume(tmp_path / "in.nii.gz")
    args = [
        "segment",
        str(tmp_path / "in.nii.gz"),
        "-o",
        str(tmp_path / "m.nii.gz"),
        "--model",
        str(tiny_bundle_3d),
    ]
    assert cli.main([*args, "--progress", "json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    progress = [r for r in records if "stage" in r]
    assert {"read", "preprocess", "predict", "resample", "write"} <= {r["stage"] for r in progress}
    assert all(set(r) == {"stage", "fraction", "message", "elapsed"} for r in progress)
    assert progress[-1] == {**progress[-1], "stage": "write", "fraction": 1.0}
    assert any("device: cpu" in r.get("log", "") for r in records)


def test_cli_batch_folder_reports_a_bad_file_and_continues(tmp_path, tiny_bundle_3d, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    _write_volume(inputs / "a.nrrd", 1)
    _write_volume(inputs / "c.nii.gz", 2)
    (inputs / "b.nrrd").write_bytes(b"NRRD0004\nthis is not an image\n")
    out = tmp_path / "out"
    args = ["segment", str(inputs), "-o", str(out), "--model", str(tiny_bundle_3d), "--quiet"]
    args += ["--lesion-table", str(tmp_path / "all.csv"), "--probabilities", str(tmp_path / "probs")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: ") and "b.nrrd" in err[0]
    assert err[-1].startswith("error: 1 of 3 input(s) failed") and len(err) == 2
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.nrrd", "c_mask.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "probs").iterdir()) == [
        "a_probabilities.nrrd",
        "c_probabilities.nii.gz",
    ]
    rows = list(csv.DictReader((tmp_path / "all.csv").open()))
    assert {r["case"] for r in rows} <= {"a", "c"} and rows[0].keys() >= {"case", "id", "volume_mm3"}


def test_a_model_whose_weights_are_not_numbers_is_refused(tmp_path, tiny_bundle_3d, capsys):
    # A diverged training's bundle gave NaN probabilities, thresholded to "0 lesion(s)" without a word.
    from conftest import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "broken", 3)
    state = torch.load(bundle / "model.pt", weights_only=True)
    state = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, bundle / "model.pt")
    card = json.loads((bundle / "model.json").read_text())
    card.pop("weights_sha256")  # a hand-made bundle without a checksum is loaded as it is
    (bundle / "model.json").write_text(json.dumps(card))
    _write_volume(tmp_path / "in.nrrd")
    args = [
        "segment",
        str(tmp_path / "in.nrrd"),
        "-o",
        str(tmp_path / "m.nrrd"),
        "--model",
        str(bundle),
        "--quiet",
    ]
    assert cli.main(args) == 2
    assert "the model's output is not a number: its weights are broken" in capsys.readouterr().err
    assert not (tmp_path / "m.nrrd").exists()


def test_a_batch_skips_the_tools_own_earlier_outputs_beside_their_inputs(tmp_path, tiny_bundle_3d, capsys):
    # `segment scans -o scans` leaves a_mask.nrrd beside a.nrrd; a later run on the folder segmented
    # that mask as a scan, without a word.
    scans = tmp_path / "scans"
    scans.mkdir()
    _write_volume(scans / "a.nrrd", 1)
    _write_volume(scans / "b_mask.nrrd", 2)  # a scan of the user's that only looks like an output
    model = ["--model", str(tiny_bundle_3d), "--quiet"]
    assert cli.main(["segment", str(scans), "-o", str(scans), *model]) == 0
    assert sorted(p.name for p in scans.iterdir()) == [
        "a.nrrd",
        "a_mask.nrrd",
        "b_mask.nrrd",
        "b_mask_mask.nrrd",
    ]
    capsys.readouterr()
    assert cli.main(["segment", str(scans), "-o", str(tmp_path / "out"), *model]) == 0
    err = capsys.readouterr().err.strip()
    assert err == "warning: skipped 2 earlier output(s) of this tool: a_mask.nrrd, b_mask_mask.nrrd"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_mask.nrrd", "b_mask_mask.nrrd"]


def test_cli_several_files_need_a_folder_and_format_applies(tmp_path, tiny_bundle_3d):
    _write_volume(tmp_path / "a.nrrd", 1)
    _write_volume(tmp_path / "b.nrrd", 2)
    files = [str(tmp_path / "a.nrrd"), str(tmp_path / "b.nrrd")]
    assert cli.main(["segment", *files, "-o", str(tmp_path / "x.nrrd"), "--model", str(tiny_bundle_3d)]) == 2
    assert not (tmp_path / "x.nrrd").exists()
    args = [
        "segment",
        *files,
        "-o",
        str(tmp_path / "o"),
        "--format",
        ".nii.gz",
        "--model",
        str(tiny_bundle_3d),
        "--quiet",
    ]
    assert cli.main(args) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a_mask.nii.gz", "b_mask.nii.gz"]


def test_cli_png_in_png_out_keeps_the_pixel_size(tmp_path, tiny_bundle_2d):
    image = sitk.GetImageFromArray(np.random.default_rng(5).integers(0, 255, (30, 44)).astype(np.uint8))
    image.SetSpacing((0.25, 0.25))
    sitk.WriteImage(image, str(tmp_path / "us.png"))
    args = [
        "segment",
        str(tmp_path / "us.png"),
        "-o",
        str(tmp_path / "m.png"),
        "--model",
        str(tiny_bundle_2d),
        "--quiet",
    ]
    assert cli.main([*args, "--probabilities", str(tmp_path / "p.png")]) == 0
    mask = sitk.ReadImage(str(tmp_path / "m.png"))
    assert mask.GetSize() == (88, 60)
    np.testing.assert_allclose(mask.GetSpacing(), (0.125, 0.125))
    p = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p.png")))
    assert p.dtype == np.uint8 and p.max() > 1  # probabilities scaled to 0..255 for PNG


def test_cli_dicom_series_folder(tmp_path, tiny_bundle_3d):
    from test_imageio import _volume, _write_dicom_series

    volume = _volume(size=(10, 8, 6), spacing=(0.9, 0.9, 2.0))
    _write_dicom_series(volume, tmp_path / "series")
    args = [
        "segment",
        str(tmp_path / "series"),
        "-o",
        str(tmp_path / "m.nrrd"),
        "--model",
        str(tiny_bundle_3d),
        "--quiet",
    ]
    assert cli.main(args) == 0
    mask = sitk.ReadImage(str(tmp_path / "m.nrrd"))
    assert mask.GetSize() == (20, 16, 12)
    _assert_same_extent(mask, volume)


def test_cli_roi_on_the_shipped_sample(tmp_path, tiny_bundle_3d):
    if not SAMPLE.is_file():
        pytest.skip(f"the demo sample {SAMPLE} is not in this checkout")
    sample = sitk.ReadImage(str(SAMPLE))
    centre_ras = np.asarray(
        sample.TransformContinuousIndexToPhysicalPoint([n / 2 for n in sample.GetSize()])
    ) * [-1, -1, 1]
    box = [f"{v:.3f}" for c in centre_ras for v in (c - 9.0, c + 9.0)]
    args = [
        "segment",
        str(SAMPLE),
        "-o",
        str(tmp_path / "roi.nrrd"),
        "--model",
        str(tiny_bundle_3d),
        "--roi",
        *box,
        "--quiet",
    ]
    assert cli.main(args) == 0
    mask = sitk.ReadImage(str(tmp_path / "roi.nrrd"))
    np.testing.assert_allclose(mask.GetSpacing(), np.asarray(sample.GetSpacing()) / 2)
    assert all(10 <= n <= 22 for n in mask.GetSize())  # 18 mm at 1 mm, plus the voxels the box edges touch


def test_real_ultrasound_image(shared_data, tmp_path, tiny_bundle_2d):
    folder = shared_data / "Dataset002_BUSI" / "imagesTr"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    source = sorted(folder.glob("*.png"))[0]
    shutil.copy(source, tmp_path / "us.png")
    args = [
        "segment",
        str(tmp_path / "us.png"),
        "-o",
        str(tmp_path / "m.nrrd"),
        "--model",
        str(tiny_bundle_2d),
        "--quiet",
    ]
    assert cli.main([*args, "--lesion-table", str(tmp_path / "t.csv")]) == 0
    image, mask = sitk.ReadImage(str(source)), sitk.ReadImage(str(tmp_path / "m.nrrd"))
    assert mask.GetSize() == tuple(2 * n for n in image.GetSize())
    _assert_same_extent(mask, image)
    assert (tmp_path / "t.csv").read_text().startswith("id")


def test_numbered_lesions_carry_the_lesion_table_numbers(tmp_path, tiny_bundle_3d):
    """--numbered-lesions: each lesion's voxels hold its table id, and a .seg.nrrd names one segment each."""
    _write_volume(tmp_path / "in.nrrd", size=(20, 24, 16))
    base = [
        "segment",
        str(tmp_path / "in.nrrd"),
        "--model",
        str(tiny_bundle_3d),
        "--quiet",
        "--device",
        "cpu",
    ]
    base += ["--threshold", "0.55", "--face-connected"]  # a speckled mask: many lesions
    assert cli.main([*base, "-o", str(tmp_path / "plain.nrrd")]) == 0
    table = tmp_path / "l.json"
    args = [*base, "-o", str(tmp_path / "m.seg.nrrd"), "--numbered-lesions", "--lesion-table", str(table)]
    assert cli.main(args) == 0
    rows = json.loads(table.read_text())["lesions"]
    numbered = sitk.ReadImage(str(tmp_path / "m.seg.nrrd"))
    values = sitk.GetArrayFromImage(numbered)
    assert len(rows) >= 2, "the test needs an input with several lesions"
    assert sorted(np.unique(values)) == list(range(len(rows) + 1))
    assert [int((values == r["id"]).sum()) for r in rows] == [r["voxels"] for r in rows]
    assert [numbered.GetMetaData(f"Segment{k}_Name") for k in range(len(rows))] == [
        f"Lesion {r['id']}" for r in rows
    ]
    assert numbered.GetMetaData(f"Segment{len(rows) - 1}_LabelValue") == str(len(rows))
    # The same voxels as the plain mask, only numbered.
    plain = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "plain.nrrd")))
    np.testing.assert_array_equal(values > 0, plain > 0)


def test_a_low_confidence_mask_is_flagged_in_the_log_and_the_provenance(tmp_path, tiny_bundle_3d, capsys):
    """A card's plausibility.min_mean_probability: a mask that averages less is written with a warning."""
    bundle = tmp_path / "strict"
    shutil.copytree(tiny_bundle_3d, bundle)
    card = json.loads((bundle / "model.json").read_text())
    card["plausibility"] = {"min_mean_probability": 0.99}
    (bundle / "model.json").write_text(json.dumps(card))
    _write_volume(tmp_path / "in.nrrd", size=(20, 24, 16))
    table = tmp_path / "t.json"
    args = ["segment", str(tmp_path / "in.nrrd"), "--model", str(bundle), "--quiet", "--device", "cpu"]
    args += ["--threshold", "0.3", "-o", str(tmp_path / "m.nrrd"), "--lesion-table", str(table)]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "warning: low confidence" in err
    written = json.loads(table.read_text())
    assert any(w.startswith("low confidence") for w in written["warnings"])
    # A card without the check writes the same mask without it.
    args[args.index(str(bundle))] = str(tiny_bundle_3d)
    assert cli.main([*args, "--overwrite"]) == 0
    assert "low confidence" not in capsys.readouterr().err


def _stored(image: sitk.Image, order: list[int], flips: list[bool]) -> sitk.Image:
    """The same voxels in the same places, with the array axes stored in another order and direction."""
    return sitk.Flip(sitk.PermuteAxes(image, order), flips, flipAboutOrigin=False)


class SlowAxisEdge(Interpolator):
    """The interpolator, plus how much brighter each voxel is than the one 3 voxels before it along
    the array's slowest axis: a network that, like a trained one, is not blind to the axis order."""

    def forward(self, x):
        up = self._up(x)
        before = F.pad(up, (0, 0, 0, 0, 3, 0))[:, :, :-3]
        return (up + 2 * (up - before) - 0.5) * 40


@pytest.mark.parametrize("direction", ["axis-aligned", "oblique"])
def test_a_volume_is_segmented_in_the_models_axis_order_whatever_order_it_is_stored_in(direction):
    """A sagittal 3D acquisition is stored with the patient's left-right along its slowest axis; the
    network sees every storage order of one volume as the array it was trained on, and each result
    lies on its own input's HR grid, voxel for voxel the same physical mask and lesions."""
    card = _card(3)
    card["preprocessing"]["orientation"] = "LPS"
    matrix = np.eye(3) if direction == "axis-aligned" else _rotation(0.3, 0.2)
    grid = Grid((20, 18, 14), (2.0, 2.0, 2.0), (-17.0, 4.0, 30.0), tuple(matrix.ravel()))
    axial = ball_image(grid, grid.index_to_physical([8.3, 9.1, 6.2]), 9.0)
    reference = pipeline.segment_lesions(axial, SlowAxisEdge(), card, CPU, number_lesions=True)
    rows = lesion_rows(reference.numbered)
    assert len(rows) == 1
    for order, flips in [
        ([1, 2, 0], [False, True, False]),
        ([0, 2, 1], [True, False, True]),
        ([2, 0, 1], [False] * 3),
    ]:
        stored = _stored(axial, order, flips)
        result = pipeline.segment_lesions(stored, SlowAxisEdge(), card, CPU, number_lesions=True)
        expected = geometry.hr_grid(Grid.from_image(stored), 2)
        assert same_grid(Grid.from_image(result.mask), expected)
        np.testing.assert_allclose(result.mask.GetDirection(), expected.direction, atol=1e-12)
        for got, want in [(result.mask, reference.mask), (result.probabilities, reference.probabilities)]:
            back = sitk.Resample(got, want, sitk.Transform(), sitk.sitkNearestNeighbor)
            np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(want))
        labels, _ = lesions.numbered_mask(result.mask, result.numbered)
        np.testing.assert_array_equal(
            sitk.GetArrayViewFromImage(labels), sitk.GetArrayViewFromImage(result.mask)
        )
        (row,) = lesion_rows(result.numbered)
        assert row["voxels"] == rows[0]["voxels"]
        np.testing.assert_allclose(row["centroid_lps_mm"], rows[0]["centroid_lps_mm"], atol=1e-6)


def test_equal_lesions_of_a_reordered_input_are_numbered_in_its_own_scan_order():
    """Two lesions of one voxel: the table's numbers (and the numbered mask's) are those the figure
    and `numbered_lesions` give the output mask, not the order the network's frame scans them in."""
    stored = sitk.PermuteAxes(sitk.Image([10, 10, 10], sitk.sitkUInt8), [1, 2, 0])
    frame = geometry.reorient(stored, "LPS")
    array = np.zeros((10, 10, 10), np.uint8)
    array[1, 1, 8] = array[8, 1, 1] = 1  # first in the frame's scan order, then in the stored one's
    mask = sitk.GetImageFromArray(array)
    mask.CopyInformation(frame)
    grid = Grid.from_image(frame)
    prepared = inputs.PreparedInput(grid, grid, grid, None, (10,) * 3, 0.0, None, stored_as="PSL")
    assert geometry.orientation(stored) == "PSL"
    result = pipeline._postprocess(mask, None, prepared, {}, True, True, lambda m: None)
    assert Grid.from_image(result.mask) == Grid.from_image(stored)
    got, count = lesions.numbered_mask(result.mask, result.numbered)
    want, _ = lesions.numbered_mask(result.mask, lesions.numbered_lesions(result.mask))
    assert count == 2
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(got), sitk.GetArrayViewFromImage(want))


def test_a_single_slice_stored_slice_axis_first_is_one_slice_whatever_the_model(
    tiny_bundle_3d, tiny_bundle_2d
):
    """One slice stored across x is a 2D image, not a volume one voxel thick: a 3D model refuses it as it
    refuses any 2D image, the default model for it is the 2D one, and that one says how to store it (a
    2D model sees the image in the order it was trained on, and across x that order is not known)."""
    card, net = load_bundle(tiny_bundle_3d)
    volume = _head_with_lesion()
    one = sitk.RegionOfInterest(sitk.PermuteAxes(volume, [2, 1, 0]), [1, 44, 40], [5, 0, 0])
    assert inputs.effective_dims(one) == 2
    with pytest.raises(UserError, match="2D image but .* 3D model"):
        pipeline.segment_image(one, net, card, CPU)
    card2, net2 = load_bundle(tiny_bundle_2d)
    with pytest.raises(UserError, match=r"one slice stored across its x axis \(size \(1, 44, 40\)\)"):
        pipeline.segment_image(one, net2, card2, CPU)


def test_a_figure_of_a_one_volume_4d_file(tmp_path, tiny_bundle_3d):
    four_d = sitk.JoinSeries([_head_with_lesion()])
    sitk.WriteImage(four_d, str(tmp_path / "one.nrrd"))
    status = cli.main(
        ["segment", str(tmp_path / "one.nrrd"), "-o", str(tmp_path / "one.seg.nrrd"), "--model", str(tiny_bundle_3d),
         "--figure", str(tmp_path / "one.png"), "--quiet"]
    )  # fmt: skip
    assert status == 0 and (tmp_path / "one.png").stat().st_size > 0


def test_a_scan_framed_in_black_is_segmented_as_the_scan_alone():
    """A scanner's export puts the scan in a black frame with text in it. The whole-image working grid
    covered the frame too, so the scan got fewer working pixels than in training: BUSI validation
    images in a frame a quarter of their size wide scored 0.668 against 0.769 unframed (now 0.769)."""
    # 61 rows: the working grid (2 px) overshoots the scan's bottom by a pixel, where its "lesion" lies.
    scan = np.random.default_rng(5).integers(30, 200, (61, 80)).astype(np.uint8)
    scan[45:, 30:50] = 250  # the bright "lesion", at the scan's bottom edge
    framed = np.zeros((100, 120), np.uint8)
    framed[25:86, 15:95] = scan
    framed[5:9, 20:40] = 255  # a line of text in the frame
    assert inputs.content_box(framed) == ([15, 25], [80, 61])
    assert inputs.content_box(scan) is None and inputs.content_box(np.zeros_like(scan)) is None
    # A frame of another grey (padding to a size), of any width: white frames an eighth of BUSI images'
    # size wide scored 0.519, 2 white pixels 0.736, a mid-grey frame 0.712, against 0.769 (now 0.769).
    white = np.full_like(framed, 255)
    white[25:86, 15:95] = scan
    assert inputs.content_box(white) == ([15, 25], [80, 61])
    assert inputs.content_box(np.pad(scan, 2, constant_values=255)) == ([2, 2], [80, 61])
    assert inputs.content_box(np.pad(scan, 2, constant_values=128)) == ([2, 2], [80, 61])
    assert inputs.content_box(np.pad(scan, 2)) is None  # a thin black band, as training images have
    card = _card(2)
    card["preprocessing"]["normalization"] = {"kind": "uint8"}
    _, whole = pipeline.segment_image(sitk.GetImageFromArray(framed), Interpolator(), card, CPU)
    alone_image = sitk.GetImageFromArray(scan)
    alone_image.SetOrigin((15.0, 25.0))  # where the scan lies in the framed image
    _, alone = pipeline.segment_image(alone_image, Interpolator(), card, CPU)
    probabilities = sitk.GetArrayFromImage(whole)
    inside = (slice(50, 172), slice(30, 190))  # the scan's pixels on the HR grid
    np.testing.assert_allclose(probabilities[inside], sitk.GetArrayFromImage(alone), atol=1e-6)
    probabilities[inside] = 0
    assert probabilities.max() == 0  # nothing predicted in the frame, nothing smeared into it


def test_a_table_of_a_picture_says_its_mm_are_not_measured(tmp_path, tiny_bundle_2d, capsys):
    """A BUSI PNG's lesion read 4135 mm^2 (1 px read as 1 mm), the same image as a 96 dpi JPEG 289 mm^2,
    as an ultrasound DICOM calibrated in its regions 4135 mm^2 again; the truth was 26 mm^2. Not a word."""
    grey = np.random.default_rng(5).integers(0, 255, (30, 40)).astype(np.uint8)
    picture = sitk.GetImageFromArray(grey)
    dicom = sitk.GetImageFromArray(grey)
    dicom.SetMetaData("0008|0060", "US")
    measured = sitk.GetImageFromArray(grey)
    measured.SetSpacing((0.08, 0.08))
    # Imager Pixel Spacing that ITK did not read the image with: its mm are 1 px each all the same.
    unread = sitk.GetImageFromArray(grey)
    unread.SetMetaData("0008|0060", "US")
    unread.SetMetaData("0018|1164", "0.1\\0.1")
    cases = (("scan.png", picture), ("scan.dcm", dicom), ("unread.dcm", unread), ("scan.nrrd", measured))
    for name, image in cases:
        sitk.WriteImage(image, str(tmp_path / name))
        out = tmp_path / name.replace(".", "_")
        argv = [
            "segment",
            str(tmp_path / name),
            "-o",
            str(out / "m.nrrd"),
            "--lesion-table",
            str(out / "t.csv"),
        ]
        assert cli.main([*argv, "--model", str(tiny_bundle_2d), "--threshold", "0.001"]) == 0
        assert next(csv.DictReader(open(out / "t.csv")))  # a lesion
        said = [line for line in capsys.readouterr().err.splitlines() if "not measured ones" in line]
        reason = {
            "scan.png": "a PNG file stores no measured pixel size",
            "scan.dcm": "this DICOM image states no pixel spacing that it was read with",
            "unread.dcm": "this DICOM image states no pixel spacing that it was read with",
        }
        if name in reason:
            assert len(said) == 1 and reason[name] in said[0] and "read as 1 x 1 mm" in said[0], said
        else:
            assert said == []


def test_damaged_weights_without_a_checksum_are_one_line(tmp_path):
    """A hand-made bundle (no checksum in its card) whose model.pt is a training checkpoint, random bytes
    or empty had ended in AttributeError, UnpicklingError or EOFError tracebacks, exit 1."""
    from conftest import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "hand", 3)
    card = json.loads((bundle / "model.json").read_text())
    card.pop("weights_sha256")
    (bundle / "model.json").write_text(json.dumps(card))
    weights = torch.load(bundle / "model.pt", weights_only=True)
    for kind, write in (
        ("checkpoint", lambda p: torch.save({"model": weights, "step": 3}, p)),
        ("random bytes", lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000))),
        ("empty", lambda p: p.write_bytes(b"")),
    ):
        write(bundle / "model.pt")
        with pytest.raises(UserError, match=r"^cannot load model weights .*model\.pt: \S") as info:
            load_bundle(bundle)
        assert "\n" not in str(info.value), kind
    torch.save({"model": weights, "step": 3}, bundle / "model.pt")
    with pytest.raises(UserError, match="holds no network weights \\(a training checkpoint"):
        load_bundle(bundle)
