"""Connected lesions and the lesion table, on constructed masks whose answers are known analytically."""

import csv
import io
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from SASSRSegmentLib.inference import lesions
from SASSRSegmentLib.inference.lesions import (
    connected_lesions,
    format_table,
    lesion_table,
    write_lesion_table,
)
from SASSRSegmentLib.io.geometry import Grid
from SASSRSegmentLib.runtime.errors import UserError

# An oblique (rotated about z by 30 degrees), anisotropic, off-origin grid.
_C, _S = math.cos(math.pi / 6), math.sin(math.pi / 6)
GRID = Grid((60, 50, 24), (0.5, 0.6, 1.25), (-12.0, 40.0, 7.5), (_C, -_S, 0.0, _S, _C, 0.0, 0.0, 0.0, 1.0))


def _spheres(centres_lps, radii):
    """A uint8 mask of balls given in physical LPS millimetres, on GRID."""
    zyx = np.stack(np.meshgrid(*[np.arange(n) for n in GRID.size[::-1]], indexing="ij"), -1).reshape(-1, 3)
    points = np.asarray(GRID.origin) + (GRID.matrix @ (zyx[:, ::-1] * np.asarray(GRID.spacing)).T).T
    mask = np.zeros(len(points), bool)
    for centre, radius in zip(centres_lps, radii):
        mask |= np.linalg.norm(points - np.asarray(centre), axis=1) <= radius
    return GRID.image_from_array(mask.reshape(GRID.size[::-1]).astype(np.uint8))


def test_table_of_two_balls_on_an_oblique_anisotropic_grid():
    big_c, small_c = GRID.index_to_physical([30, 25, 12]), GRID.index_to_physical([8, 8, 4])
    mask = _spheres([big_c, small_c], [5.0, 2.0])
    probabilities = sitk.Cast(mask, sitk.sitkFloat32) * 0.75
    rows = lesion_table(mask, probabilities)
    assert [r["id"] for r in rows] == [1, 2]  # largest first
    big, small = rows
    voxel = float(np.prod(GRID.spacing))
    assert big["voxels"] > small["voxels"]
    assert big["volume_mm3"] == pytest.approx(big["voxels"] * voxel)
    assert big["volume_mm3"] == pytest.approx(4 / 3 * math.pi * 5.0**3, rel=0.05)
    np.testing.assert_allclose(big["centroid_lps_mm"], big_c, atol=0.15)
    np.testing.assert_allclose(small["centroid_lps_mm"], small_c, atol=0.15)
    ras = np.asarray(big["centroid_lps_mm"]) * [-1, -1, 1]
    np.testing.assert_allclose(big["centroid_ras_mm"], ras)
    # Feret diameter runs between voxel centres: within one voxel diagonal below the true diameter.
    assert 10.0 - math.dist((0, 0, 0), GRID.spacing) <= big["longest_diameter_mm"] <= 10.0
    lo, hi = np.asarray(big["bbox_ras_min_mm"]), np.asarray(big["bbox_ras_max_mm"])
    centre_ras = np.asarray(big_c) * [-1, -1, 1]
    assert np.all(lo < centre_ras - 4.5) and np.all(hi > centre_ras + 4.5)
    # The index box (diameter plus at most a voxel per side) rotated by 30 degrees about z.
    in_plane = (10.0 + 2 * 0.6) * (_C + _S)
    assert np.all(hi - lo <= [in_plane, in_plane, 10.0 + 2 * 1.25])
    start, size = big["bbox_index_start"], big["bbox_index_size"]
    array = sitk.GetArrayFromImage(connected_lesions(mask))
    zyx = np.argwhere(array == 1)
    assert start == zyx.min(0)[::-1].tolist() and size == (zyx.max(0) - zyx.min(0) + 1)[::-1].tolist()
    assert big["mean_probability"] == pytest.approx(0.75)


def test_connectivity_option():
    array = np.zeros((1, 4, 4), np.uint8)
    array[0, 0, 0] = array[0, 1, 1] = 1  # diagonal neighbours
    mask = sitk.GetImageFromArray(array)
    assert len(lesion_table(mask, fully_connected=True)) == 1
    assert len(lesion_table(mask, fully_connected=False)) == 2


def test_2d_table_reports_area():
    array = np.zeros((20, 30), np.uint8)
    array[5:9, 10:20] = 1
    mask = sitk.GetImageFromArray(array)
    mask.SetSpacing((0.5, 0.25))
    mask.SetOrigin((100.0, 50.0))
    (row,) = lesion_table(mask)
    assert "volume_mm3" not in row
    assert row["area_mm2"] == pytest.approx(40 * 0.5 * 0.25)
    np.testing.assert_allclose(row["centroid_lps_mm"], [100 + 14.5 * 0.5, 50 + 6.5 * 0.25])
    np.testing.assert_allclose(row["centroid_ras_mm"], [-(100 + 14.5 * 0.5), -(50 + 6.5 * 0.25)])
    assert row["longest_diameter_mm"] == pytest.approx(math.hypot(9 * 0.5, 3 * 0.25))


def test_a_single_slice_volume_reports_area_under_its_header():
    # A DICOM ultrasound frame reads as a one-slice volume: its table gave a blank area_mm2 and a
    # "volume" of area x slice thickness, and its figure failed on the missing area.
    array = np.zeros((1, 20, 30), np.uint8)
    array[0, 5:9, 10:20] = 1
    mask = sitk.GetImageFromArray(array)
    mask.SetSpacing((0.5, 0.25, 3.0))
    (row,) = lesion_table(mask)
    assert row["area_mm2"] == pytest.approx(40 * 0.5 * 0.25)
    assert not {"volume_ml", "volume_mm3"} & set(row)
    header = lesions.table_columns(2, planar=True)
    assert format_table([row], ".csv", columns=header).splitlines()[0] == ",".join(header)
    assert header[:2] == ["id", "area_mm2"] and "centroid_ras_z_mm" in header


def test_diameters_are_computed_only_when_asked():
    mask = _spheres([GRID.index_to_physical([30, 25, 12]), GRID.index_to_physical([10, 12, 8])], [3.0, 2.0])
    full, light = lesion_table(mask), lesion_table(mask, diameters=False)
    diameter_keys = {"axial_diameter_mm", "perpendicular_diameter_mm", "longest_diameter_mm"}
    assert all(diameter_keys <= set(r) for r in full) and not any(diameter_keys & set(r) for r in light)
    assert [{k: v for k, v in r.items() if k not in diameter_keys} for r in full] == light


def test_empty_mask_gives_an_empty_table():
    assert lesion_table(sitk.Image(5, 5, 5, sitk.sitkUInt8)) == []
    assert format_table([], ".csv") == "id\n"


def test_csv_and_json_writers(tmp_path):
    mask = _spheres([GRID.index_to_physical([30, 25, 12])], [3.0])
    rows = lesion_table(mask)
    write_lesion_table(rows, tmp_path / "t.csv")
    parsed = list(csv.DictReader(io.StringIO((tmp_path / "t.csv").read_text())))
    assert len(parsed) == 1
    assert float(parsed[0]["centroid_ras_z_mm"]) == pytest.approx(rows[0]["centroid_ras_mm"][2], abs=1e-3)
    assert int(parsed[0]["bbox_index_size_x"]) == rows[0]["bbox_index_size"][0]
    write_lesion_table(rows, tmp_path / "t.json", meta={"model": "m"})
    document = json.loads((tmp_path / "t.json").read_text())
    assert document["model"] == "m" and document["lesions"][0]["voxels"] == rows[0]["voxels"]
    with pytest.raises(UserError, match="already exists"):
        write_lesion_table(rows, tmp_path / "t.csv")
    with pytest.raises(UserError, match=r"\.csv or \.json"):
        write_lesion_table(rows, tmp_path / "t.txt")


def test_drop_small_components_keeps_the_main_masses():
    from SASSRSegmentLib.inference.lesions import drop_small_components

    arr = np.zeros((1, 40, 40), np.uint8)
    arr[0, 2:22, 2:22] = 1  # 400 voxels
    arr[0, 30:38, 30:38] = 1  # 64 voxels: 16% of the largest
    arr[0, 30:33, 2:5] = 1  # 9 voxels: 2%
    mask = sitk.GetImageFromArray(arr)
    mask.SetSpacing((0.5, 0.5, 2.0))
    kept = drop_small_components(mask, 0.1)
    out = sitk.GetArrayFromImage(kept)
    assert out.sum() == 464 and out[0, 31, 3] == 0 and out[0, 31, 31] == 1
    assert kept.GetSpacing() == mask.GetSpacing()
    assert sitk.GetArrayFromImage(drop_small_components(mask, 0.0)).sum() == 473


def test_lesion_region_is_the_box_around_the_voxels():
    from SASSRSegmentLib.inference.lesions import lesion_region

    arr = np.zeros((20, 30, 40), np.uint8)
    assert lesion_region(sitk.GetImageFromArray(arr)) is None
    arr[3, 5:9, 30:33] = 1
    arr[17, 20, 2] = 1
    start, size = lesion_region(sitk.GetImageFromArray(arr))  # x, y, z order, like SimpleITK indices
    assert start == [2, 5, 3] and size == [31, 16, 15]
    flat = sitk.GetImageFromArray(arr[3])
    assert lesion_region(flat) == ([30, 5], [3, 4])


@pytest.mark.parametrize("shape", [(9, 23, 31), (37, 41)])
@pytest.mark.parametrize("fully_connected", [True, False])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.6])
@pytest.mark.parametrize("keep_labels", [True, False], ids=["labels kept", "labelled twice"])
def test_slab_wise_components_agree_with_whole_volume_labelling(
    shape, fully_connected, density, keep_labels, monkeypatch
):
    from SASSRSegmentLib.inference.lesions import keep_large_components

    if not keep_labels:
        monkeypatch.setattr(lesions, "_KEPT_LABEL_BYTES", 0)

    rng = np.random.default_rng(len(shape) * 100 + int(density * 10))
    array = (rng.random(shape) < density).astype(np.uint8)
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(array), fully_connected))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    expected = (sizes >= 0.1 * sizes.max())[labels] & (labels > 0)
    for rows in (1, 2, 4, 100):  # one row per slab up to the whole array in one slab
        out = np.full(shape, 7, np.uint8)
        keep_large_components(array, 0.1, out, fully_connected, rows)
        np.testing.assert_array_equal(out, expected.astype(np.uint8))


def _numbered_full(mask: sitk.Image, numbered) -> np.ndarray:
    return sitk.GetArrayFromImage(lesions.numbered_mask(mask, numbered)[0]).astype(np.int64)


@pytest.mark.parametrize("shape", [(9, 23, 31), (37, 41)])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.6])
@pytest.mark.parametrize("fully_connected", [True, False])
@pytest.mark.parametrize("keep_labels", [True, False], ids=["labels kept", "labelled twice"])
def test_one_labelling_drops_and_numbers_as_two_do(shape, density, fully_connected, keep_labels, monkeypatch):
    if not keep_labels:
        monkeypatch.setattr(lesions, "_KEPT_LABEL_BYTES", 0)
    rng = np.random.default_rng(len(shape) * 100 + int(density * 10))
    array = np.zeros(shape, np.uint8)
    array[(slice(1, -1),) * len(shape)] = rng.random(tuple(n - 2 for n in shape)) < density
    mask = sitk.GetImageFromArray(array)
    dropped = lesions.drop_small_components(mask, 0.01)
    expected = _numbered_full(dropped, lesions.numbered_lesions(dropped, fully_connected))
    kept, numbered = lesions.drop_small_and_number(mask, 0.01, fully_connected)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(kept), sitk.GetArrayFromImage(dropped))
    np.testing.assert_array_equal(_numbered_full(kept, numbered), expected)
    if fully_connected and keep_labels:  # numbered by the one labelling, in the smallest type
        smallest = np.uint8 if expected.max() < 256 else np.uint16
        assert sitk.GetArrayViewFromImage(numbered[0]).dtype == smallest
    if density < 0.1:  # several lesions and ties: the numbering is tested, not just the mask
        assert expected.max() > 10
    if not fully_connected:
        return  # small components are dropped by 26-connectivity, whatever numbers the lesions
    for rows in (1, 3, 100):  # the slab-wise numbering agrees too
        numbers = np.zeros(shape, np.uint32)
        lesions.keep_large_components(array, 0.01, numbers, fully_connected, rows, numbered=True)
        np.testing.assert_array_equal(numbers, expected)


def test_lesion_numbers_take_the_smallest_type_and_never_wrap():
    array = np.zeros((3, 40, 40), np.uint8)
    array[1, ::2, ::2] = 1  # 400 single-voxel lesions, apart under any connectivity
    numbers = lesions.keep_large_components(array, 0.0, numbered=True)
    assert numbers.dtype == np.uint16 and numbers.max() == 400
    with pytest.raises(ValueError, match="400 lesions do not fit in uint8"):
        lesions.keep_large_components(array, 0.0, np.zeros(array.shape, np.uint8), numbered=True)


def test_numbering_an_empty_mask_or_keeping_every_lesion():
    empty = sitk.Image([6, 7, 8], sitk.sitkUInt8)
    assert lesions.drop_small_and_number(empty, 0.1) == (empty, None)
    array = np.zeros((6, 7, 8), np.uint8)
    array[1, 1, 1] = array[4, 4:6, 4:7] = 1
    mask = sitk.GetImageFromArray(array)
    kept, numbered = lesions.drop_small_and_number(mask, 0.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(kept), array)
    assert _numbered_full(kept, numbered)[1, 1, 1] == 2 and _numbered_full(kept, numbered)[4, 4, 4] == 1


@pytest.mark.parametrize("density", [0.02, 0.3, 0.6])
def test_lesions_are_numbered_by_size_with_ties_in_scan_order(density):
    from SASSRSegmentLib.inference.lesions import numbered_lesions

    rng = np.random.default_rng(int(density * 100))
    array = np.zeros((14, 25, 33), np.uint8)
    array[1:13, 2:24, 1:32] = rng.random((12, 22, 31)) < density  # a margin: the box is cropped
    mask = sitk.GetImageFromArray(array)
    labels, offset = numbered_lesions(mask)
    assert offset == [1, 2, 1]
    cropped = sitk.RegionOfInterest(mask, labels.GetSize(), offset)
    # ITK's own relabelling by size (ties keep the scan order of the first labelling).
    expected = sitk.RelabelComponent(sitk.ConnectedComponent(cropped, True), sortByObjectSize=True)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(expected))
    assert Grid.from_image(labels) == Grid.from_image(cropped)


def test_low_confidence_is_flagged_by_the_voxel_weighted_mean_probability():
    rows = [{"voxels": 900, "mean_probability": 0.95}, {"voxels": 100, "mean_probability": 0.55}]
    assert lesions.low_confidence(rows, 0.75) is None  # 0.91 over the mask's voxels
    weak = [{"voxels": 100, "mean_probability": 0.95}, {"voxels": 900, "mean_probability": 0.55}]
    message = lesions.low_confidence(weak, 0.75)
    assert message.startswith("low confidence") and "0.59" in message and "0.75" in message
    assert lesions.low_confidence(weak, None) is None  # the card asks for no check
    assert lesions.low_confidence([{"voxels": 10}], 0.75) is None  # no probabilities were computed
    assert lesions.low_confidence([], 0.75) is None


def test_a_batch_provenance_keeps_per_input_what_its_inputs_do_not_share():
    from SASSRSegmentLib.inference import provenance

    base = {"software": "s", "threshold": 0.5, "created_utc": "t", "warnings": []}
    records = [
        {**base, "input": "brain.nrrd", "model": "brain-3d", "spatial_dims": 3},
        {**base, "input": "us.png", "model": "breast-2d", "spatial_dims": 2, "warnings": ["w"]},
    ]
    meta = provenance.shared(records)
    assert meta["threshold"] == 0.5 and "model" not in meta
    assert meta["per_input"] == {
        "brain.nrrd": {"model": "brain-3d", "spatial_dims": 3},
        "us.png": {"model": "breast-2d", "spatial_dims": 2},
    }
    assert meta["warnings"] == {"us.png": ["w"]}
    assert "per_input" not in provenance.shared(records[:1])
