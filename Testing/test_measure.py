"""Lesion diameters: exact on shapes whose answer is known, ITK's Feret diameter on irregular ones, and
the measurement plane chosen from the image's orientation."""

import math

import numpy as np
import pytest
import SimpleITK as sitk

from SASSRSegmentLib.inference import measure
from SASSRSegmentLib.io.geometry import Grid


def _grid(shape_zyx, spacing, direction=None):
    d = len(shape_zyx)
    direction = np.eye(d) if direction is None else np.asarray(direction, dtype=float)
    return Grid(tuple(shape_zyx[::-1]), tuple(spacing), (3.0, -7.0, 11.0)[:d], tuple(direction.ravel()))


def test_a_box_measures_its_diagonals_and_the_width_across_them():
    mask = np.zeros((6, 10, 14), bool)
    mask[1:5, 2:8, 2:12] = True  # 4 slices of 2 mm; 6 x 10 voxels of 1 mm in plane
    result = measure.diameters(mask, _grid(mask.shape, (1.0, 1.0, 2.0)))
    a, b, c = 9.0, 5.0, 3 * 2.0  # centre-to-centre extents in mm
    assert result.longest_mm == pytest.approx(math.sqrt(a * a + b * b + c * c), rel=1e-9)
    assert result.axial_mm == pytest.approx(math.hypot(a, b), rel=1e-9)
    # Across the diagonal of an a x b rectangle: 2ab / sqrt(a^2 + b^2).
    assert result.perpendicular_mm == pytest.approx(2 * a * b / math.hypot(a, b), rel=1e-9)


def test_one_voxel_measures_zero_and_2d_uses_the_image_plane():
    one = np.zeros((3, 3, 3), bool)
    one[1, 1, 1] = True
    assert measure.diameters(one, _grid(one.shape, (1.0, 1.0, 1.0))) == measure.Diameters(0.0, 0.0, 0.0)
    flat = np.zeros((20, 30), bool)
    flat[5:8, 4:24] = True  # 20 x 3 pixels of 0.5 x 0.25 mm
    result = measure.diameters(flat, _grid(flat.shape, (0.5, 0.25)))
    assert result.longest_mm == result.axial_mm == pytest.approx(math.hypot(19 * 0.5, 2 * 0.25))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_irregular_lesions_match_itk_feret_diameter(seed):
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:30, :34, :38]
    blob = np.zeros((30, 34, 38), bool)
    for _ in range(4):
        centre, radius = rng.uniform(8, 26, 3), rng.uniform(3, 7)
        blob |= (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 < radius**2
    direction = sitk.VersorTransform((0.3, 0.5, 0.8), 0.6).GetMatrix()
    grid = _grid(blob.shape, (0.9, 1.1, 1.7), np.reshape(direction, (3, 3)))
    image = grid.image_from_array(blob.astype(np.uint8))
    labels = sitk.ConnectedComponent(image)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.ComputeFeretDiameterOn()
    stats.Execute(labels)
    label = max(stats.GetLabels(), key=stats.GetNumberOfPixels)
    own = sitk.GetArrayFromImage(labels) == label
    expected = stats.GetFeretDiameter(label)
    got = measure.diameters(own, grid).longest_mm
    assert expected * (1 - 2e-3) <= got <= expected * (1 + 1e-9)


def test_the_measurement_plane_is_the_image_plane_closest_to_axial():
    # A sagittal acquisition: index z runs along patient x (L), index y along S, index x along P.
    sagittal = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert measure.measurement_axis(_grid((4, 4, 4), (1.0, 1.0, 1.0), sagittal)) == 1
    assert measure.measurement_axis(_grid((4, 4, 4), (1.0, 1.0, 1.0))) == 2
    mask = np.zeros((12, 12, 12), bool)
    mask[2:10, 5:6, 1:11] = True  # one index-y layer: an axial plane of the sagittal grid
    result = measure.diameters(mask, _grid(mask.shape, (1.0, 1.0, 1.0), sagittal))
    assert result.axial_mm == pytest.approx(math.hypot(7, 9)) == result.longest_mm
