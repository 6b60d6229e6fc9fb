"""A breast-ultrasound image as Slicer loads it: an RGB(A) vector volume, one slice thick, on the Logic.

A B-mode PNG saved as RGB becomes a vtkMRMLVectorVolumeNode with R = G = B. The slicer-core wheel's ITK
reads no PNG, so the image is written as an RGB-color NRRD, which Slicer loads into the same node class;
its geometry is a rotated, anisotropic one, so that none of it can be lost unseen. The fixtures and
helpers are test_slicer_core.py's (its tiny untrained bundles, the stand-ins, the real scene).
"""

import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip(
    "slicer",
    reason="Slicer's core libraries are not installed: pip install slicer-core (Python >= 3.10)",
)
import test_slicer_core as core  # noqa: E402
import vtk  # noqa: E402
from test_slicer_core import (  # noqa: E402
    _assert_hr_reference_geometry,
    _lesion_segments,
    _lr_rows,
    _node_ids,
    _one_line,
    _run,
    _table_column,
)
from vtk.util import numpy_support  # noqa: E402

# test_slicer_core's fixtures, taken by name below: the real scene with the stand-ins, its tiny bundles.
env, mod, pkg, logic = core.env, core.mod, core.pkg, core.logic

SIZE_XY = (40, 30)
SPACING = (0.3, 0.4, 1.0)
ORIGIN = (5.0, -7.0, 2.0)
ANGLE = 0.5  # radians, in the image plane


def _b_mode():
    """A dark, round mass in speckled tissue, (1, y, x) uint8."""
    y, x = np.indices(SIZE_XY[::-1])
    mass = np.exp(-((x - 22) ** 2 + (y - 14) ** 2) / 40.0)
    speckle = np.random.default_rng(0).normal(0, 12, mass.shape)
    return (150 - 110 * mass + speckle).clip(0, 255).astype(np.uint8)[np.newaxis]


def _write(path, array, vector):
    image = sitk.GetImageFromArray(array, isVector=vector)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    c, s = np.cos(ANGLE), np.sin(ANGLE)
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path))
    return path


def _load(tmp_path, name, array, vector=True):
    node = slicer.util.loadVolume(str(_write(tmp_path / f"{name}.nrrd", array, vector)), {"name": name})
    assert node.IsA("vtkMRMLVectorVolumeNode") == vector, node.GetClassName()
    if vector:
        assert node.GetImageData().GetNumberOfScalarComponents() == array.shape[-1]
    return node


def _as_rgb(grey, alpha=False):
    channels = [grey] * 3 + ([np.full_like(grey, 255)] if alpha else [])
    return np.stack(channels, axis=-1)


def _hr_labelmaps(segmentation, segmentIds):
    """Each segment's internal label map: (its image-to-world rows, extent, voxels in the segment)."""
    found = []
    for segmentId in segmentIds:
        segment = segmentation.GetSegmentation().GetSegment(segmentId)
        labelmap = segment.GetRepresentation("Binary labelmap")
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        rows = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        voxels = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()) == segment.GetLabelValue()
        found.append((rows, tuple(labelmap.GetExtent()), voxels))
    return found


def test_the_engine_gets_the_rgb_image_on_its_own_grid(pkg, mod, logic, tmp_path):
    image = _load(tmp_path, "Breast US", _as_rgb(_b_mode()))
    # An RGB image one slice thick is a 2D image: the ultrasound model is the default.
    assert logic.defaultModelName(image) == "tiny-us-2d"
    assert mod.SASSRSegmentLogic().defaultModelName(image) == "breast-ultrasound-2d"

    pkg.scene.writeVolumeToFile(image, tmp_path / "copy.nrrd")

    original, copy = (sitk.ReadImage(str(tmp_path / name)) for name in ("Breast US.nrrd", "copy.nrrd"))
    assert copy.GetNumberOfComponentsPerPixel() == 3 and copy.GetSize() == original.GetSize()
    assert np.allclose(copy.GetOrigin(), original.GetOrigin(), atol=1e-9)
    assert np.allclose(copy.GetSpacing(), original.GetSpacing(), atol=1e-9)
    assert np.allclose(copy.GetDirection(), original.GetDirection(), atol=1e-9)
    assert np.array_equal(sitk.GetArrayFromImage(copy), sitk.GetArrayFromImage(original))


@pytest.mark.parametrize("alpha", [False, True], ids=["RGB", "RGBA"])
def test_greyscale_saved_as_rgb_is_segmented_as_its_grey_image(pkg, logic, tmp_path, alpha):
    """The R = G = B vector volume gives the scalar one's segmentation: the same lesions, voxel for voxel,
    on the input's grid refined 2x in plane, over the input's extent."""
    grey = _b_mode()
    image = _load(tmp_path, "Breast US", _as_rgb(grey, alpha))
    twin = _load(tmp_path, "Breast US grey", grey, vector=False)
    assert np.allclose(_lr_rows(image), _lr_rows(twin))

    result, twinResult = (_run(logic, node, modelName="tiny-us-2d") for node in (image, twin))

    assert result.status == twinResult.status == "completed", (result.message, twinResult.message)
    segmentation = result.segmentationNode
    assert segmentation.GetName() == "Breast US lesions"
    _assert_hr_reference_geometry(pkg, segmentation, image, [2, 2, 1])
    segmentIds = _lesion_segments(pkg, segmentation, result.tableNode)
    # Each segment's label map lies on the HR grid itself (its index 0 is the HR grid's first voxel), inside it.
    hrRows, hrDimensions = pkg.geometry.superResolvedGrid(
        _lr_rows(image), image.GetImageData().GetDimensions(), [2, 2, 1]
    )
    labelmaps = _hr_labelmaps(segmentation, segmentIds)
    for rows, extent, voxels in labelmaps:
        assert np.allclose(rows, hrRows, atol=1e-6)
        assert all(0 <= extent[2 * k] <= extent[2 * k + 1] < hrDimensions[k] for k in range(3))
        assert voxels.any()
    twinMaps = _hr_labelmaps(twinResult.segmentationNode, twinResult.segmentIds)
    assert len(labelmaps) == len(twinMaps)
    for (rows, extent, voxels), (twinRows, twinExtent, twinVoxels) in zip(labelmaps, twinMaps):
        assert np.allclose(rows, twinRows, atol=1e-9) and extent == twinExtent
        assert np.array_equal(voxels, twinVoxels)
    # A one-slice image's lesions have areas (its table had an area column left blank and a "volume").
    assert result.tableNode.GetTable().GetColumnByName("volume_ml") is None
    for column in ("voxels", "area_mm2", "centroid_ras_x_mm", "centroid_ras_y_mm", "centroid_ras_z_mm"):
        assert np.allclose(
            _table_column(result.tableNode, column), _table_column(twinResult.tableNode, column)
        ), column


def test_callipers_drawn_in_colour_are_read_as_brightness_with_a_warning(logic, tmp_path):
    """A screenshot with yellow callipers drawn in: R = G != B on a few pixels. It is segmented as
    its luminance, and the panel's result says so."""
    rgb = _as_rgb(_b_mode())
    rgb[0, 5, 8:20] = (255, 255, 0)
    image = _load(tmp_path, "Breast US", rgb)
    result = _run(logic, image, modelName="tiny-us-2d")
    assert result.status == "completed", result.message
    assert result.segmentationNode is not None
    assert any("coloured (annotations?)" in w and "luminance" in w for w in result.warnings), result.warnings


def test_a_colour_image_is_refused_in_one_line_and_leaves_the_scene_as_it_was(logic, tmp_path):
    """A colour overlay (a Doppler box) over a tenth of the image: the Segment button's run (wait=False)
    ends failed with the reason in plain words, and adds no node and leaves no temporary file."""
    rgb = _as_rgb(_b_mode())
    rgb[0, 4:12, 6:26] = (200, 40, 40)
    image = _load(tmp_path, "Breast US", rgb)
    nodes = _node_ids()
    results = []

    job = logic.segmentVolume(
        image, modelName="tiny-us-2d", device="cpu", wait=False, onFinished=results.append
    )
    deadline = time.monotonic() + 60
    while not job.done and time.monotonic() < deadline:
        slicer.app.processEvents()
        time.sleep(0.02)

    (result,) = results
    assert result.status == "failed"
    _one_line(result.message)
    assert "colour" in result.message and "greyscale" in result.message, result.message
    # The panel names the Slicer module that makes the greyscale volume.
    assert "Vector to Scalar Volume module" in result.message, result.message
    assert result.segmentationNode is None and result.tableNode is None
    assert _node_ids() == nodes
    assert not list(Path(slicer.app.temporaryPath).iterdir())
