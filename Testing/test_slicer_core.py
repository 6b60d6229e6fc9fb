"""The module's Logic on Slicer's real core libraries, with the real engine process.

Slicer's MRML, Segmentations, Volumes and Markups libraries come from the slicer-core wheel; what the
wheel lacks (Qt, slicer.app, slicer.modules, the scripted-module bases) is stood in for by
slicer_standins.py. The widgets, the .ui and the dialogs are not exercised here (docs/slicer.md).
Most runs use tiny untrained bundles built here; the bundled brain model runs once, in the module's
own self-test.
"""

import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip(
    "slicer",
    reason="Slicer's core libraries are not installed: pip install slicer-core (Python >= 3.10)",
)
import slicer_standins  # noqa: E402
import vtk  # noqa: E402
from conftest import make_tiny_bundle  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "SASSRSegment"
MODULE_FILE = MODULE_DIR / "SASSRSegment.py"
PACKAGE = "SASSRSegmentSlicer"

# name -> (spatial dims, modality, image-SR decoder). Sorted by name, the CT model is the first 3D one.
TINY_MODELS = {
    "tiny-ct-3d": (3, "CT", True),
    "tiny-mr-3d": (3, "MRI FLAIR", False),
    "tiny-us-2d": (2, "ultrasound (B-mode)", True),
}


def _make_tiny_bundle(folder, dims, modality, image_sr):
    make_tiny_bundle(folder, dims, image_sr)
    # The card is not covered by the weights' checksum: name it and give it a modality. A threshold below
    # the untrained network's output keeps the masks non-empty.
    card = json.loads((folder / "model.json").read_text())
    card.update(name=folder.name, modality=modality, threshold=0.3)
    (folder / "model.json").write_text(json.dumps(card))


@contextlib.contextmanager
def _package_imported_anew():
    """The module folder on sys.path (as Slicer has it), and the module's SASSRSegmentSlicer package
    imported anew there, with the stand-ins in place; as it was before, on exit.

    Another test file may have imported the package already, in plain Python, where it holds no Slicer.
    """
    ours = [name for name in sys.modules if name.split(".")[0] == PACKAGE]
    saved = {name: sys.modules.pop(name) for name in ours}
    sys.path.insert(0, str(MODULE_DIR))
    try:
        yield
    finally:
        sys.path.remove(str(MODULE_DIR))
        for name in [name for name in sys.modules if name.split(".")[0] == PACKAGE]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    for name, (dims, modality, image_sr) in TINY_MODELS.items():
        _make_tiny_bundle(models / name, dims, modality, image_sr)
    with slicer_standins.installed(tmp_path_factory.mktemp("slicer-temp")) as app, _package_imported_anew():
        spec = importlib.util.spec_from_file_location("SASSRSegmentInSlicer", MODULE_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.slicer is slicer
        yield types.SimpleNamespace(
            mod=module, pkg=sys.modules[PACKAGE], app=app, models=models, temp=Path(app.temporaryPath)
        )


@pytest.fixture
def mod(env):
    slicer.mrmlScene.Clear()
    return env.mod


@pytest.fixture
def pkg(env, mod):
    """The module's SASSRSegmentSlicer package as the module file imported it: pkg.logic, pkg.job, ..."""
    return env.pkg


@pytest.fixture
def logic(env, mod):
    return mod.SASSRSegmentLogic(env.models)


def _volume(
    tmp_path, name="Patient A", size=(12, 10, 8), spacing=(2.0, 2.0, 2.0), value=None, dtype=np.int16
):
    """A scan with a bright blob, written as a file and loaded as Slicer loads one."""
    zyx = size[::-1]
    if value is None:
        grid = np.indices(zyx).astype(float)
        centre = (np.asarray(zyx) - 1) / 2.0
        blob = np.exp(-sum((g - c) ** 2 for g, c in zip(grid, centre)) / 6.0)
        array = (100 + 800 * blob + np.random.default_rng(0).normal(0, 5, zyx)).astype(dtype)
    else:
        array = np.full(zyx, value, dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((-5.0, 7.0, 3.0))
    path = tmp_path / f"{name}.nrrd"
    sitk.WriteImage(image, str(path))
    return slicer.util.loadVolume(str(path), {"name": name})


def _image_2d(tmp_path, name="Ultrasound"):
    return _volume(tmp_path, name, size=(40, 30, 1), spacing=(0.5, 0.5, 1.0), dtype=np.uint8)


def _run(logic, volume, **options):
    results = []
    logic.segmentVolume(volume, device="cpu", wait=True, onFinished=results.append, **options)
    assert len(results) == 1
    return results[0]


def _refused(logic, volume, match, **options):
    """segmentVolume refuses, with one plain line matching `match`; returns the line."""
    with pytest.raises(RuntimeError, match=match) as raised:
        _run(logic, volume, **options)
    _one_line(str(raised.value))
    return str(raised.value)


def _node_ids():
    scene = slicer.mrmlScene
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _rows(matrix):
    return [[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]


def _lr_rows(volume):
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return _rows(matrix)


def _to_world(node, rows):
    """Rows of a grid in a node's local frame, carried to world coordinates by its parent transform."""
    matrix = vtk.vtkMatrix4x4()
    if node.GetParentTransformNode():
        node.GetParentTransformNode().GetMatrixTransformToWorld(matrix)
    transform = _rows(matrix)
    return [[sum(transform[r][k] * rows[k][c] for k in range(4)) for c in range(4)] for r in range(4)]


def _assert_hr_reference_geometry(pkg, segmentation, volume, scales):
    """The segmentation's reference geometry is the input's HR grid, in world terms the input's extent."""
    rows, dimensions = pkg.segmentation.referenceGeometry(segmentation)
    lr = volume.GetImageData().GetDimensions()
    assert dimensions == [n * s for n, s in zip(lr, scales)]
    expected, _ = pkg.geometry.superResolvedGrid(_to_world(volume, _lr_rows(volume)), lr, scales)
    assert np.allclose(_to_world(segmentation, rows), expected, atol=1e-6)
    worldBounds = pkg.geometry.voxelCornerBounds(_to_world(segmentation, rows), dimensions)
    assert worldBounds == pytest.approx(
        pkg.geometry.voxelCornerBounds(_to_world(volume, _lr_rows(volume)), lr), abs=1e-6
    )


def _hr_voxels(segmentation, segmentId):
    """Voxels of a segment in its internal (HR) labelmap, and that labelmap's spacing."""
    segment = segmentation.GetSegmentation().GetSegment(segmentId)
    labelmap = segment.GetRepresentation("Binary labelmap")
    array = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
    return int((array == segment.GetLabelValue()).sum()), labelmap.GetSpacing()


def _table_column(table, name):
    return slicer.util.arrayFromTableColumn(table, name)


def _segment_names(segmentation):
    segments = segmentation.GetSegmentation()
    return [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]


def _lesion_segments(pkg, segmentation, table, voxels=True):
    """The lesion segments are "Lesion 1".."Lesion N" with N the table's rows, in its order, each with
    the Lesion terminology and (with `voxels`) its row's voxels at HR; returns their ids."""
    ids = list(_table_column(table, "id"))
    assert ids == list(range(1, table.GetNumberOfRows() + 1)) and ids
    segmentIds = pkg.segmentation.lesionSegmentIds(segmentation)
    segments = segmentation.GetSegmentation()
    assert [segments.GetSegment(i).GetName() for i in segmentIds] == [f"Lesion {k}" for k in ids]
    colours = [tuple(segments.GetSegment(i).GetColor()) for i in segmentIds]
    assert colours[0] == pytest.approx(pkg.segmentation.LESION_COLOR)
    assert len(set(colours)) == min(len(ids), len(pkg.segmentation.LESION_COLORS))
    for segmentId, count in zip(segmentIds, _table_column(table, "voxels")):
        terminology = vtk.reference("")
        assert segments.GetSegment(segmentId).GetTag(
            slicer.vtkSegment.GetTerminologyEntryTagName(), terminology
        )
        assert terminology.get() == pkg.segmentation.LESION_TERMINOLOGY
        assert not voxels or _hr_voxels(segmentation, segmentId)[0] == int(count) > 0
    return segmentIds


def _one_line(message):
    assert message and "\n" not in message and "--" not in message and "Traceback" not in message, message


def _centre(node):
    bounds = [0.0] * 6
    node.GetRASBounds(bounds)
    return [(bounds[2 * k] + bounds[2 * k + 1]) / 2 for k in range(3)]


def _roi(center, size, name="R"):
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    roi.SetCenter(center)
    roi.SetSize(size)
    return roi


# ------------------------------------------------------------------------------- the panel's defaults


def test_default_options_make_segmentation_and_lesion_table(pkg, logic, tmp_path):
    volume = _volume(tmp_path)
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    study = shNode.CreateFolderItem(shNode.GetSceneItemID(), "Study")
    shNode.SetItemParent(shNode.GetItemByDataNode(volume), study)

    result = _run(logic, volume)

    assert result.status == "completed", result.message
    segmentation, table = result.segmentationNode, result.tableNode
    assert segmentation.GetName() == "Patient A lesions"
    assert table.GetName() == "Patient A lesion table"
    # Both land in the input's study; the table (not transformable) has no transform to follow.
    for node in (segmentation, table):
        assert shNode.GetItemParent(shNode.GetItemByDataNode(node)) == study
    _assert_hr_reference_geometry(pkg, segmentation, volume, [2, 2, 2])
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is volume
    # One segment per lesion, numbered as the table's rows, each with its row's voxels.
    segmentIds = _lesion_segments(pkg, segmentation, table)
    assert _segment_names(segmentation) == [f"Lesion {k}" for k in range(1, len(segmentIds) + 1)]
    assert result.segmentIds == segmentIds and result.segmentId == segmentIds[0]
    assert _hr_voxels(segmentation, segmentIds[0])[1] == pytest.approx((1.0, 1.0, 1.0))
    assert result.lesionCount == table.GetNumberOfRows() > 0
    # The engine's clinical columns, in its order, with their units.
    names = [table.GetTable().GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert names[:5] == [
        "id",
        "volume_ml",
        "axial_diameter_mm",
        "perpendicular_diameter_mm",
        "longest_diameter_mm",
    ]
    assert (
        table.GetColumnUnitLabel("volume_ml") == "mL"
        and table.GetColumnUnitLabel("centroid_ras_x_mm") == "mm"
    )
    assert "RECIST" in table.GetColumnDescription("axial_diameter_mm")
    assert segmentation.GetSegmentation().ContainsRepresentation("Closed surface")


def test_the_engine_reads_and_writes_bare_names_in_its_run_folder_and_recent_files_stay(
    pkg, logic, tmp_path, monkeypatch
):
    """ITK cannot open a non-ASCII path on Windows, and Slicer's temporary folder is in the user's
    profile there ("C:\\Users\\José\\AppData\\Local\\Temp\\Slicer"): the engine is given bare file names
    and runs in the run's folder."""
    temporary = tmp_path / "Temp José"
    temporary.mkdir()
    # Left by a Slicer that crashed mid-run two days ago (a copy of a patient's image), and one of
    # another Slicer's run now: the first is removed, the second left alone.
    stale, current = temporary / "SASSRSegment-crashed", temporary / "SASSRSegment-running"
    for folder in (stale, current):
        folder.mkdir()
        (folder / "input.nrrd").write_bytes(b"patient")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(stale, (two_days_ago, two_days_ago))
    monkeypatch.setattr(slicer.app, "temporaryPath", str(temporary))
    started = []

    class Recording(pkg.runner.SegmentRunner):
        def start(self):
            started.append((list(self.command), self.cwd))
            super().start()

    monkeypatch.setattr(pkg.job, "SegmentRunner", Recording)
    result = _run(logic, _volume(tmp_path))
    assert result.status == "completed", result.message
    ((command, cwd),) = started
    folder = Path(cwd)
    assert folder.parent == temporary and folder.name.startswith("SASSRSegment-")
    given = [
        command[command.index("segment") + 1],
        *(command[command.index(o) + 1] for o in ("-o", "--lesion-table")),
    ]
    assert given == ["input.nrrd", "lesions.nrrd", "lesions.csv"]
    assert list(temporary.iterdir()) == [current]  # and the run's own folder is gone
    # The results are read without the IO manager, so File > Recent keeps the user's own files.
    assert not [f for f in slicer.app.coreIOManager().filesRead if Path(f).parent == folder]


def test_the_users_threshold_stays_while_the_model_does(mod):
    """Choosing a model sets the threshold from its card; another input for the same model keeps the
    threshold the user set."""
    cards = [{"name": "brain", "threshold": 0.5}, {"name": "busi", "threshold": 0.4}]
    panel = types.SimpleNamespace(
        _parameterNode=types.SimpleNamespace(modelName="", threshold=0.5), _cards=cards
    )
    panel._currentCard = lambda: mod.SASSRSegmentWidget._currentCard(panel)
    select = mod.SASSRSegmentWidget._selectModel
    select(panel, "brain")
    panel._parameterNode.threshold = 0.3  # the user's
    select(panel, "brain")
    assert panel._parameterNode.threshold == 0.3
    select(panel, "busi")
    assert panel._parameterNode.threshold == 0.4
    select(panel, "")
    assert panel._parameterNode.threshold == 0.4 and panel._parameterNode.modelName == ""


def test_a_double_click_on_segment_lesions_does_not_cancel_the_run_it_started(mod):
    cancelled = []
    panel = types.SimpleNamespace(
        _job=types.SimpleNamespace(cancel=lambda: cancelled.append(True)),
        _runStartedAt=time.monotonic(),
        _updateRunningStatus=lambda: None,
    )
    mod.SASSRSegmentWidget.onApplyButton(panel)
    assert cancelled == []
    panel._runStartedAt -= mod.DOUBLE_CLICK_S
    mod.SASSRSegmentWidget.onApplyButton(panel)
    assert cancelled == [True]


def test_lesion_terminology_is_the_dicom_master_list_neoplasm(pkg):
    entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(
        pkg.segmentation.LESION_TERMINOLOGY, entry
    )
    # Slicer's SegmentationCategoryTypeModifier-DICOM-Master.json holds Neoplasm in this context and category.
    assert entry.GetTerminologyContextName() == "Segmentation category and type - DICOM master list"
    category, kind = entry.GetCategoryObject(), entry.GetTypeObject()
    assert (category.GetCodingSchemeDesignator(), category.GetCodeValue()) == ("SCT", "49755003")
    assert category.GetCodeMeaning() == "Morphologically Altered Structure"
    assert (kind.GetCodingSchemeDesignator(), kind.GetCodeValue(), kind.GetCodeMeaning()) == (
        "SCT",
        "108369006",
        "Neoplasm",
    )
    assert entry.GetRegionContextName() == "Anatomic codes - DICOM master list"


# ------------------------------------------------------------------------------- models


def test_default_model_follows_the_input(mod, logic, tmp_path):
    volume = _volume(tmp_path)
    image = _image_2d(tmp_path)
    assert logic.defaultModelName(volume) == "tiny-ct-3d"
    assert logic.defaultModelName(image) == "tiny-us-2d"
    # A volume loaded from DICOM carries its modality on its subject-hierarchy item.
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    attribute = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName()
    shNode.SetItemAttribute(shNode.GetItemByDataNode(volume), attribute, "MR")
    assert logic.defaultModelName(volume) == "tiny-mr-3d"
    # The bundled models: brain MRI for volumes, breast ultrasound for 2D images; none for a CT.
    bundled = mod.SASSRSegmentLogic()
    assert bundled.defaultModelName(volume) == "brain-tumour-flair-3d"
    assert bundled.defaultModelName(image) == "breast-ultrasound-2d"
    shNode.SetItemAttribute(shNode.GetItemByDataNode(volume), attribute, "CT")
    assert bundled.defaultModelName(volume) is None
    with pytest.raises(RuntimeError, match="No installed model is made for 3D CT images"):
        bundled.modelCard(None, volume)
    assert bundled.modelCard("brain-tumour-flair-3d", volume)["name"] == "brain-tumour-flair-3d"  # asked for
    # Numbered PNG frames read as one colour stack ("Single file" unticked) had been given the brain model.
    frames = sitk.Compose([sitk.Image([40, 30, 6], sitk.sitkUInt8)] * 3)
    sitk.WriteImage(frames, str(tmp_path / "frames.nrrd"))
    stack = slicer.util.loadVolume(str(tmp_path / "frames.nrrd"))
    assert stack.GetImageData().GetNumberOfScalarComponents() == 3
    assert bundled.defaultModelName(stack) is None
    with pytest.raises(
        RuntimeError, match=r"^This is a 3D colour volume \(image files read as one stack\?\)"
    ):
        bundled.modelCard(None, stack)
    # Grey ones too: Slicer reads numbered names (0001.png, ...) as one volume by itself.
    grey = _volume(tmp_path, "grey")
    grey.GetStorageNode().SetFileName(str(tmp_path / "0001.png"))  # as Slicer loads them
    assert bundled.defaultModelName(grey) is None
    with pytest.raises(RuntimeError, match=r"^This is a 3D stack of PNG pictures \(image files read"):
        bundled.modelCard(None, grey)
    # Nor one chosen by hand: a picture stores no slice spacing (`segment` refuses a multi-page TIFF).
    _refused(logic, grey, r"^This is a 3D stack of PNG pictures", modelName="tiny-mr-3d")


def test_2d_image_is_segmented_with_the_2d_model(pkg, logic, tmp_path):
    image = _image_2d(tmp_path)
    logLines = []
    # An ROI drawn on a 2D image may be flat across it: it is given the slice's thickness.
    flatRoi = _roi(_centre(image), [8.0, 8.0, 0.0])
    result = _run(logic, image, roiNode=flatRoi, onLog=logLines.append)
    assert result.status == "completed", result.message
    assert any("tiny-us-2d" in line for line in logLines if line.startswith("Running"))
    _assert_hr_reference_geometry(pkg, result.segmentationNode, image, [2, 2, 1])
    segmentIds = _lesion_segments(pkg, result.segmentationNode, result.tableNode)
    assert _hr_voxels(result.segmentationNode, segmentIds[0])[1] == pytest.approx((0.25, 0.25, 1.0))


def test_a_table_of_a_picture_says_its_mm_are_not_measured(logic, tmp_path):
    """The engine reads the NRRD the panel writes, which keeps no trace of a PNG: its warning that the
    table's mm are 1 px each had never reached the panel."""
    picture = _image_2d(tmp_path, "picture")
    # As Slicer loads a PNG (this wheel's ITK reads no PNG): the storage node names the file.
    picture.GetStorageNode().SetFileName(str(tmp_path / "scan.png"))
    picture.SetSpacing(1.0, 1.0, 1.0)
    result = _run(logic, picture, threshold=0.001)
    assert result.status == "completed", result.message
    said = [w for w in result.warnings if "not measured ones" in w]
    assert (
        len(said) == 1
        and "a PNG file stores no measured pixel size (its pixels are read as 1 x 1 mm)" in said[0]
    )
    scan = _image_2d(tmp_path)  # an NRRD: its spacing is the file's own
    assert not [w for w in _run(logic, scan, threshold=0.001).warnings if "not measured ones" in w]


class _DicomDatabase:
    """Slicer's DICOM database as the panel asks it (this wheel has none): one instance's file and tags."""

    def __init__(self, tags):
        self.tags = tags

    def fileForInstance(self, uid):
        return "/dicom/us1.dcm" if uid == "1.2.3" else ""

    def fileValue(self, path, tag):
        return self.tags.get(tag, "") if path == "/dicom/us1.dcm" else ""


def test_a_table_of_a_dicom_image_stating_no_pixel_size_says_its_mm_are_not_measured(
    pkg, logic, tmp_path, monkeypatch
):
    # Slicer's image sequence loader (ultrasound) leaves no file the engine could read the tags from.
    image = _image_2d(tmp_path, "us")
    image.SetAttribute("DICOM.instanceUIDs", "1.2.3")
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    attribute = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName()
    # An enhanced MR file states its pixel size inside functional groups, which the look-up misses.
    shNode.SetItemAttribute(shNode.GetItemByDataNode(image), attribute, "MR")
    monkeypatch.setattr(slicer, "dicomDatabase", _DicomDatabase({}), raising=False)
    assert pkg.scene.unmeasuredPixelsNote(image) == ""
    shNode.SetItemAttribute(shNode.GetItemByDataNode(image), attribute, "US")
    for tags, spacing, said in [
        ({"0028,0030": "1\\1"}, 1.0, False),  # 1 mm, and said so
        ({"0018,1164": "0.2\\0.2"}, 1.0, True),  # stated, but not read with it
        ({}, 0.078, False),  # Slicer's loader took its one calibrated region
    ]:
        monkeypatch.setattr(slicer, "dicomDatabase", _DicomDatabase(tags), raising=False)
        image.SetSpacing(spacing, spacing, 1.0)
        assert bool(pkg.scene.unmeasuredPixelsNote(image)) == said, tags
    # An ultrasound image calibrated in its regions only: read as 1 mm pixels.
    monkeypatch.setattr(slicer, "dicomDatabase", _DicomDatabase({}), raising=False)
    image.SetSpacing(1.0, 1.0, 1.0)
    warnings = [w for w in _run(logic, image, threshold=0.001).warnings if "not measured ones" in w]
    assert len(warnings) == 1
    assert "this DICOM image states no pixel spacing (its pixels are read as 1 x 1 mm)" in warnings[0]


def test_engine_errors_speak_of_the_panel(pkg, logic, tmp_path):
    volume = _volume(tmp_path)
    _refused(logic, volume, "choose a 3D model in the Model list", modelName="tiny-us-2d")
    assert pkg.command.panelMessage(
        "this image needs about 9.0 GB at 2x resolution but only 4.0 GB is available; segment a region with "
        "--roi xmin xmax ymin ymax zmin zmax (RAS mm) or use --output-grid input"
    ) == (
        "this image needs about 9.0 GB at 2x resolution but only 4.0 GB is available; draw a Region (ROI) "
        "around the lesions, then retry"
    )
    assert pkg.command.panelMessage(
        "--device cuda was asked for but no CUDA GPU is usable here; use --device cpu or auto"
    ) == ("no CUDA GPU is usable here: choose Auto or CPU as the Device")


def test_super_resolved_image_needs_a_model_with_the_image_sr_decoder(pkg, logic, tmp_path):
    volume = _volume(tmp_path)
    nodes = _node_ids()
    _refused(logic, volume, "no image super-resolution decoder", modelName="tiny-mr-3d", srImage=True)
    assert _node_ids() == nodes
    cards = {card["name"]: card for card in pkg.cards.readModelCards()}
    assert pkg.cards.hasImageSrDecoder(cards["brain-tumour-flair-3d"])
    assert pkg.cards.hasImageSrDecoder(cards["breast-ultrasound-2d"])
    assert not pkg.cards.hasImageSrDecoder({"network": {"image_sr": False}})

    result = _run(logic, volume, modelName="tiny-ct-3d", srImage=True)
    assert result.status == "completed", result.message
    image = result.srImageNode
    assert image.GetName() == "Patient A super-resolved"
    assert image.GetImageData().GetDimensions() == (24, 20, 16)
    assert image.GetSpacing() == pytest.approx((1.0, 1.0, 1.0))
    assert image.GetStorageNode() is None  # saved with the scene, not pointing at a deleted temporary file


# ------------------------------------------------------------------------------- ROI


def test_roi_limits_the_label_but_not_the_reference_geometry(pkg, logic, tmp_path):
    volume = _volume(tmp_path)
    result = _run(logic, volume, roiNode=_roi(_centre(volume), [6.0, 6.0, 6.0]))
    assert result.status == "completed", result.message
    _assert_hr_reference_geometry(pkg, result.segmentationNode, volume, [2, 2, 2])
    segmentIds = _lesion_segments(pkg, result.segmentationNode, result.tableNode)
    voxels = sum(_hr_voxels(result.segmentationNode, segmentId)[0] for segmentId in segmentIds)
    assert 0 < voxels <= 8 * 8 * 8  # the ROI touches 4 LR voxels a side: 8 HR voxels


def test_unusable_roi_is_refused_in_the_panels_words(mod, logic, tmp_path):
    volume = _volume(tmp_path)
    unplaced = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Unplaced")
    flat = _roi([0.0, 10.0, 10.0], [6.0, 6.0, 0.0], "Flat")
    outside = _roi([500.0, 0.0, 0.0], [6.0, 6.0, 6.0], "Outside")
    nodes = _node_ids()
    for roi, words in ((unplaced, "not placed"), (flat, "flat"), (outside, "does not overlap")):
        assert roi.GetName() in _refused(logic, volume, words, roiNode=roi)
    assert _node_ids() == nodes
    assert not list(Path(slicer.app.temporaryPath).iterdir())


# ------------------------------------------------------------------------------- frames


def _translation(name, offset):
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        matrix.SetElement(r, 3, offset[r])
    transform.SetMatrixTransformToParent(matrix)
    return transform


def test_transformed_input(pkg, logic, tmp_path):
    volume = _volume(tmp_path)
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Rotated")
    rotation = vtk.vtkTransform()
    rotation.Translate(30.0, -12.0, 4.0)
    rotation.RotateWXYZ(25.0, 0.3, 1.0, 0.2)
    transform.SetMatrixTransformToParent(rotation.GetMatrix())
    volume.SetAndObserveTransformNodeID(transform.GetID())

    result = _run(logic, volume)

    assert result.status == "completed", result.message
    segmentation = result.segmentationNode
    assert segmentation.GetTransformNodeID() == transform.GetID()
    assert result.tableNode is not None
    _assert_hr_reference_geometry(pkg, segmentation, volume, [2, 2, 2])
    _lesion_segments(pkg, segmentation, result.tableNode)


def test_existing_segmentation_in_another_frame_gets_the_grid_in_its_own_frame(pkg, logic, tmp_path):
    volume = _volume(tmp_path)
    volume.SetAndObserveTransformNodeID(_translation("Volume shift", [10.0, -4.0, 2.5]).GetID())
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Mine")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetAndObserveTransformNodeID(_translation("Segmentation shift", [-3.0, 8.0, 1.0]).GetID())
    segmentation.GetSegmentation().AddEmptySegment("", "Brain", (0.2, 0.4, 0.9))

    assert logic.outputSegmentationStatus(segmentation, volume) == "ready"  # no grid to change yet
    result = _run(logic, volume, outputSegmentation=segmentation)

    assert result.status == "completed", result.message
    assert result.segmentationNode is segmentation
    # Slicer resamples the label map into the segmentation's frame (here by 1.5 HR voxels along z), so
    # voxel counts differ from the table's.
    lesions = _lesion_segments(pkg, segmentation, result.tableNode, voxels=False)
    assert _segment_names(segmentation) == ["Brain"] + [f"Lesion {k}" for k in range(1, len(lesions) + 1)]
    _assert_hr_reference_geometry(pkg, segmentation, volume, [2, 2, 2])
    # It now holds this volume's lesions: another volume's are refused.
    assert pkg.segmentation.segmentationInputVolume(segmentation).GetID() == volume.GetID()
    assert logic.outputSegmentationStatus(segmentation, _volume(tmp_path, "Patient B")) == "otherVolume"


def test_users_segmentation_on_another_grid_is_switched_only_when_allowed(pkg, logic, tmp_path):
    volume = _volume(tmp_path)
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Mine")
    segmentation.CreateDefaultDisplayNodes()
    pkg.segmentation.setReferenceGeometry(
        segmentation, _lr_rows(volume), volume.GetImageData().GetDimensions()
    )
    before = pkg.segmentation.referenceGeometry(segmentation)

    assert logic.outputSegmentationStatus(segmentation, volume) == "changeGrid"
    _refused(logic, volume, "on another grid", outputSegmentation=segmentation)
    assert pkg.segmentation.referenceGeometry(segmentation) == before

    result = _run(logic, volume, outputSegmentation=segmentation, changeGrid=True)
    assert result.status == "completed", result.message
    _assert_hr_reference_geometry(pkg, segmentation, volume, [2, 2, 2])
    assert logic.outputSegmentationStatus(segmentation, volume) == "ready"


def test_segmentation_of_closed_surfaces_is_refused_before_the_run(pkg, logic, tmp_path):
    """Slicer imports a label map only into a segmentation whose source is the binary label map; one
    loaded from STL or OBJ would fail only after the whole run."""
    volume = _volume(tmp_path)
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Surfaces")
    segmentation.CreateDefaultDisplayNodes()
    surfaces = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    segmentation.GetSegmentation().SetSourceRepresentationName(surfaces)
    segmentation.GetSegmentation().AddEmptySegment("", "Skull", (0.9, 0.9, 0.8))
    before = _node_ids()

    assert logic.outputSegmentationStatus(segmentation, volume) == "notLabelmap"
    _refused(logic, volume, "keeps closed surfaces", outputSegmentation=segmentation)
    assert _node_ids() == before and logic.activeJob is None
    assert segmentation.GetSegmentation().GetSourceRepresentationName() == surfaces
    assert _segment_names(segmentation) == ["Skull"]


def test_second_volume_never_goes_into_the_first_volumes_segmentation(pkg, mod, logic, tmp_path):
    first = _volume(tmp_path, "Patient A")
    second = _volume(tmp_path, "Patient B", size=(10, 12, 6), spacing=(1.5, 1.5, 3.0))
    firstResult = _run(logic, first)
    segmentation = firstResult.segmentationNode
    geometry = pkg.segmentation.referenceGeometry(segmentation)

    assert logic.outputSegmentationStatus(segmentation, second) == "otherVolume"
    _refused(logic, second, "holds the lesions of 'Patient A'", outputSegmentation=segmentation)
    # The panel asks nothing first (a Replace/Add question would be followed by this refusal anyway).
    panel = types.SimpleNamespace(logic=logic, _askReplaceSegment=lambda s: pytest.fail("asked"))
    parameters = types.SimpleNamespace(outputSegmentation=segmentation, inputVolume=second, modelName="")
    output = mod.SASSRSegmentWidget._chooseOutput(panel, parameters)
    _refused(logic, second, "holds the lesions of 'Patient A'", **output)
    assert pkg.segmentation.referenceGeometry(segmentation) == geometry
    lesionCount = firstResult.tableNode.GetNumberOfRows()
    assert segmentation.GetSegmentation().GetNumberOfSegments() == lesionCount

    secondResult = _run(logic, second)
    assert secondResult.segmentationNode.GetName() == "Patient B lesions"
    _assert_hr_reference_geometry(pkg, secondResult.segmentationNode, second, [2, 2, 2])
    # The same volume again: its own segmentation is reused (new lesion segments beside the old, or
    # replacing all of them).
    assert logic.outputSegmentationStatus(segmentation, first) == "ready"
    segmentation.GetSegmentation().AddEmptySegment("", "Brain", (0.2, 0.4, 0.9))
    beside = _run(logic, first, outputSegmentation=segmentation)
    newCount = beside.tableNode.GetNumberOfRows()
    old, new = (
        [f"Lesion {k}" for k in range(1, lesionCount + 1)],
        [f"Lesion {k}" for k in range(1, newCount + 1)],
    )
    # A run's segments keep one suffix, so that its numbers stay the table's.
    assert _segment_names(segmentation) == old + ["Brain"] + [f"{name} 2" for name in new]
    again = _run(logic, first, outputSegmentation=segmentation, replaceSegment=True)
    assert again.segmentationNode is segmentation
    # Every earlier lesion segment is replaced; the new ones take the first one's place.
    _lesion_segments(pkg, segmentation, again.tableNode)
    assert _segment_names(segmentation) == [
        f"Lesion {k}" for k in range(1, again.tableNode.GetNumberOfRows() + 1)
    ] + ["Brain"]
    assert again.tableNode.GetName() == "Patient A lesion table 3"


# ------------------------------------------------------------------------------- numbered lesions


def _numbered_label_map(path, boxes):
    """The engine's numbered mask (and lesion table rows) of boxes (z, y, x slices) on Patient A's HR grid."""
    from SASSRSegmentLib.inference import lesions

    mask = np.zeros((16, 20, 24), np.uint8)
    for box in boxes:
        mask[box] = 1
    image = sitk.GetImageFromArray(mask)
    image.SetOrigin((-5.5, 6.5, 2.5))  # the LR grid's first voxel corner, as _volume writes it
    numbered, count = lesions.numbered_mask(image, lesions.numbered_lesions(image))
    sitk.WriteImage(numbered, str(path))
    rows = lesions.lesion_table(image, diameters=False)
    assert count == len(rows) == len(boxes)
    return [row["voxels"] for row in rows]


def _segments_state(segmentation):
    segments = segmentation.GetSegmentation()
    ids = [segments.GetNthSegmentID(i) for i in range(segments.GetNumberOfSegments())]
    return [(i, segments.GetSegment(i).GetName(), _hr_voxels(segmentation, i)[0]) for i in ids]


def test_numbered_label_map_becomes_one_segment_per_lesion(pkg, tmp_path):
    """Slicer's import puts label value k into the k-th segment id given; the engine numbers the lesions
    1..N as the table, so segment "Lesion k" holds the table's lesion k."""
    volume = _volume(tmp_path)
    seg = pkg.segmentation
    segmentation = seg.createSegmentation(volume, "Lesions")
    boxes = [np.s_[10, 2, 2], np.s_[2:5, 2:5, 2:5], np.s_[8:14, 10:18, 12:20]]  # 1, 27 and 384 voxels
    voxels = _numbered_label_map(tmp_path / "three.nrrd", boxes)
    assert voxels == [384, 27, 1]

    ids = seg.importLesionSegmentation(tmp_path / "three.nrrd", volume, segmentation, [2, 2, 2], False)

    assert _segments_state(segmentation) == [
        (i, f"Lesion {k}", n) for k, (i, n) in enumerate(zip(ids, voxels), start=1)
    ]
    segments = segmentation.GetSegmentation()
    colours = [tuple(segments.GetSegment(i).GetColor()) for i in ids]
    assert colours[0] == pytest.approx(seg.LESION_COLOR) and len(set(colours)) == 3
    # Replacing: every segment the module made goes, the new ones take the first one's place; a segment the
    # user drew stays whatever its name; restoring puts all of them back, with their ids, voxels and places
    # among the user's segments.
    segments.AddEmptySegment("", "Brain", (0.2, 0.4, 0.9))
    segments.AddEmptySegment("", "Lesion 5", (0.2, 0.9, 0.9))
    assert [seg.isLesionSegment(segments.GetSegment(i)) for i in ids] == [True] * 3
    assert not seg.isLesionSegment(segments.GetSegment(segments.GetSegmentIdBySegmentName("Lesion 5")))
    before = _segments_state(segmentation)
    restorePoint = seg.SegmentationRestorePoint(segmentation)
    voxels = _numbered_label_map(tmp_path / "two.nrrd", boxes[1:])
    seg.importLesionSegmentation(tmp_path / "two.nrrd", volume, segmentation, [2, 2, 2], True, restorePoint)
    assert [(name, n) for _, name, n in _segments_state(segmentation)] == [
        ("Lesion 1", 384),
        ("Lesion 2", 27),
        ("Brain", 0),
        ("Lesion 5", 0),
    ]
    restorePoint.restore()
    assert _segments_state(segmentation) == before
    # Without replacing, the new ones get one suffix; an empty result is one empty "Lesion" segment.
    seg.importLesionSegmentation(tmp_path / "two.nrrd", volume, segmentation, [2, 2, 2], False)
    _numbered_label_map(tmp_path / "none.nrrd", [])
    seg.importLesionSegmentation(tmp_path / "none.nrrd", volume, segmentation, [2, 2, 2], False)
    assert [name for _, name, _ in _segments_state(segmentation)] == [
        *(name for _, name, _ in before),
        "Lesion 1 2",
        "Lesion 2 2",
        "Lesion",
    ]
    # The tag holds the lesion-table id; the empty result's segment has 0.
    tags = []
    for i in seg.lesionSegmentIds(segmentation):
        value = vtk.reference("")
        segments.GetSegment(i).GetTag(seg.LESION_SEGMENT_TAG, value)
        tags.append(str(value))
    assert tags == ["1", "2", "3", "1", "2", "0"]


# ------------------------------------------------------------------------------- failures and cancel


def test_failed_imports_roll_back_and_names_stay_unique(pkg, logic, tmp_path, monkeypatch):
    volume = _volume(tmp_path)
    original = pkg.job.loadLesionTable

    def failing(*args):
        raise OSError("No space left on device:\n/tmp/x")

    monkeypatch.setattr(pkg.job, "loadLesionTable", failing)
    nodes = _node_ids()
    for _ in range(2):
        with pytest.raises(RuntimeError, match="Importing the results failed") as raised:
            _run(logic, volume)
        assert "\n" not in str(raised.value)
        assert _node_ids() == nodes

    # A failure while replacing the lesion segments of an existing segmentation puts them all back, in
    # their places among the user's segments.
    monkeypatch.setattr(pkg.job, "loadLesionTable", original)
    keptResult = _run(logic, volume)
    kept = keptResult.segmentationNode
    assert kept.GetName() == "Patient A lesions"  # the failed runs left no name taken
    segments = kept.GetSegmentation()
    segments.AddEmptySegment("", "Brain", (0.2, 0.4, 0.9))
    segments.AddEmptySegment("", "Lesion 7", (0.2, 0.9, 0.9))  # the user's, under a module-like name: kept
    segments.SetSegmentIndex(segments.GetSegmentIdBySegmentName("Brain"), 0)
    before = [
        (
            segments.GetNthSegmentID(i),
            segments.GetNthSegment(i).GetName(),
            _hr_voxels(kept, segments.GetNthSegmentID(i))[0],
        )
        for i in range(segments.GetNumberOfSegments())
    ]
    assert len(pkg.segmentation.lesionSegmentIds(kept)) == keptResult.tableNode.GetNumberOfRows()
    monkeypatch.setattr(pkg.job, "loadLesionTable", failing)
    nodes = _node_ids()
    with pytest.raises(RuntimeError, match="Importing the results failed"):
        _run(logic, volume, outputSegmentation=kept, replaceSegment=True, threshold=0.9)
    assert _node_ids() == nodes
    after = [
        (
            segments.GetNthSegmentID(i),
            segments.GetNthSegment(i).GetName(),
            _hr_voxels(kept, segments.GetNthSegmentID(i))[0],
        )
        for i in range(segments.GetNumberOfSegments())
    ]
    assert after == before


def test_cancel_leaves_the_scene_as_it_was(mod, logic, tmp_path):
    volume = _volume(tmp_path)
    nodes = _node_ids()
    results = []
    job = logic.segmentVolume(volume, device="cpu", wait=False, onFinished=results.append)
    assert not job.cancelling
    job.cancel()
    assert job.cancelling  # the panel says "Cancelling..." until the engine has stopped
    deadline = time.monotonic() + 30
    while not results and time.monotonic() < deadline:
        slicer.app.processEvents()
        time.sleep(0.02)
    assert [r.status for r in results] == ["cancelled"]
    assert not job.cancelling
    assert _node_ids() == nodes
    assert not job.tempDir.exists()


def _deleted_during_the_run(logic, volume, deleted, **options):
    results = []
    logic.segmentVolume(volume, device="cpu", wait=False, onFinished=results.append, **options)
    slicer.mrmlScene.RemoveNode(deleted)
    nodes = _node_ids()
    deadline = time.monotonic() + 60
    while not results and time.monotonic() < deadline:
        slicer.app.processEvents()
        time.sleep(0.02)
    assert _node_ids() == nodes
    return results[0]


def test_a_node_deleted_during_the_run_gets_nothing_and_nothing_is_added(pkg, logic, tmp_path):
    # Results had gone beside a deleted volume (a segmentation of no image), or into a deleted
    # segmentation: lost, the panel saying "Done".
    volume = _volume(tmp_path)
    result = _deleted_during_the_run(logic, volume, volume)
    assert result.status == "failed" and "input volume was deleted during the run" in result.message
    volume = _volume(tmp_path)
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Mine")
    result = _deleted_during_the_run(logic, volume, segmentation, outputSegmentation=segmentation)
    assert result.status == "failed" and "output segmentation was deleted" in result.message
    _one_line(result.message)


def test_cleanup_stops_the_engine_and_deletes_the_patient_copy(mod, logic, tmp_path):
    volume = _volume(tmp_path)
    nodes = _node_ids()
    results = []
    job = logic.segmentVolume(volume, device="cpu", wait=False, onFinished=results.append)
    assert (job.tempDir / "input.nrrd").is_file()
    logic.cleanup()
    assert job.runner._process.poll() is not None
    assert not job.tempDir.exists()
    assert job.done and results == []  # no import into a module that is going away
    slicer.app.processEvents()
    assert _node_ids() == nodes


def test_engine_warnings_reach_the_result(mod, logic, tmp_path):
    volume = _volume(tmp_path, value=300)
    result = _run(logic, volume)
    assert result.status == "completed", result.message
    assert result.warnings == ["the input image is constant (no contrast): the mask is empty"]
    # No lesion: the table's columns are numbers still (they had all been strings).
    table = result.tableNode.GetTable()
    assert table.GetNumberOfRows() == 0 and table.GetNumberOfColumns() > 10
    kinds = {
        table.GetColumn(i).GetName(): table.GetColumn(i).GetClassName()
        for i in range(table.GetNumberOfColumns())
    }
    assert (
        kinds["id"] == "vtkIntArray"
        and kinds["voxels"] == "vtkIntArray"
        and kinds["volume_ml"] == "vtkDoubleArray"
    )
    assert result.lesionCount == 0


# ------------------------------------------------------------------------------- PyTorch


class _FakeTorchUtils:
    def __init__(self, install):
        self.calls = 0
        self._install = install

    def module(self):
        utils = self

        class PyTorchUtilsLogic:
            @staticmethod
            def torchInstalled():
                return False

            def installTorch(self, askConfirmation=False, torchVersionRequirement=None):
                utils.calls += 1
                return utils._install()

        return types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic)


def _without_torch(monkeypatch, utils):
    findSpec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else findSpec(name, *a)
    )
    monkeypatch.setitem(sys.modules, "PyTorchUtils", utils.module())


def test_failed_pytorch_install_is_one_line_and_a_second_click_waits(mod, logic, monkeypatch):
    def failingInstall():
        # A second click while the installer runs (it processes events) must not start another one.
        with pytest.raises(RuntimeError, match="being installed"):
            logic.ensureTorch()
        raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip"], output="network unreachable")

    utils = _FakeTorchUtils(failingInstall)
    _without_torch(monkeypatch, utils)
    with pytest.raises(RuntimeError, match="Installing PyTorch failed") as raised:
        logic.ensureTorch()
    _one_line(str(raised.value))
    assert utils.calls == 1 and not logic.installingTorch


def test_successful_pytorch_install_is_reported(mod, logic, monkeypatch):
    utils = _FakeTorchUtils(lambda: types.SimpleNamespace(__version__="2.5.0"))
    _without_torch(monkeypatch, utils)
    assert logic.ensureTorch() is True  # the panel then detects the devices again
    monkeypatch.undo()
    assert logic.ensureTorch() is False


def test_an_older_pytorch_another_extension_installed_is_named_in_one_line(mod, logic, monkeypatch):
    """The engine needs torch 2.1 or newer; an older one already in Slicer's Python is said, not run."""
    import importlib.metadata

    versions = {"torch": "2.0.1+cu118"}
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions.get(name) or real(name))
    with pytest.raises(RuntimeError) as raised:
        logic.ensureTorch()
    assert str(raised.value) == (
        "PyTorch 2.0 is installed, but this module needs 2.1 or newer: update it in the PyTorch Utils module, "
        "restart Slicer, then retry."
    )
    versions["torch"] = "2.13.0"
    assert logic.ensureTorch() is False


# ------------------------------------------------------------------------------- console batch use


def test_segment_files_for_console_batch_use(pkg, logic, tmp_path):
    image = sitk.GetImageFromArray(np.random.default_rng(1).normal(100, 30, (8, 10, 12)).astype(np.float32))
    image.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(image, str(tmp_path / "case1.nii.gz"))
    (tmp_path / "broken.nrrd").write_text("not an image")

    good, broken = logic.segmentFiles(
        [tmp_path / "case1.nii.gz", tmp_path / "broken.nrrd"],
        tmp_path / "out",
        modelName="tiny-ct-3d",
        device="cpu",
        lesionTable=True,
        numberedLesions=True,
    )

    assert Path(good.outputPath) == tmp_path / "out" / "case1_lesions.nrrd" and not good.error
    mask = sitk.GetArrayFromImage(sitk.ReadImage(good.outputPath))
    assert mask.shape == (16, 20, 24)
    columns = dict(pkg.tables.readCsvColumns(tmp_path / "out" / "case1_lesions.csv"))
    # numberedLesions: each lesion's voxels hold its table id.
    assert columns["id"] == list(range(1, int(mask.max()) + 1))
    assert [int((mask == k).sum()) for k in columns["id"]] == [int(v) for v in columns["voxels"]]
    assert broken.outputPath == "" and broken.error and "\n" not in broken.error
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_console_arguments_of_the_wrong_kind_are_one_line(pkg, logic, tmp_path, monkeypatch):
    # One path as a string had been read a character at a time ("/" first, walked for images); a
    # relative one against the engine's working folder, its mask written into the module's.
    image = sitk.GetImageFromArray(np.random.default_rng(1).normal(100, 30, (8, 10, 12)).astype(np.float32))
    sitk.WriteImage(image, str(tmp_path / "case1.nrrd"))
    monkeypatch.chdir(tmp_path)
    (result,) = logic.segmentFiles("case1.nrrd", "out", modelName="tiny-ct-3d", device="cpu")
    assert Path(result.outputPath) == tmp_path / "out" / "case1_lesions.nrrd" and not result.error
    assert Path(result.outputPath).is_file()
    # A re-run into the same folder: refused in the Logic's words, done with overwrite=True.
    (again,) = logic.segmentFiles("case1.nrrd", "out", modelName="tiny-ct-3d", device="cpu")
    assert again.error.endswith("already exists; pass overwrite=True to replace it"), again.error
    (again,) = logic.segmentFiles("case1.nrrd", "out", modelName="tiny-ct-3d", device="cpu", overwrite=True)
    assert not again.error
    with pytest.raises(RuntimeError, match="tpu"):
        logic.segmentFiles(["case1.nrrd"], "out", device="tpu")
    with pytest.raises(RuntimeError, match="Cannot make the output folder"):
        logic.segmentFiles(["case1.nrrd"], "case1.nrrd/out")
    # A label map (a mask given as the image had come out as "0 lesions"), nodes of the wrong kind.
    volume = _volume(tmp_path)
    labels = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    labels.SetAndObserveImageData(volume.GetImageData())
    _refused(logic, labels, "not a label map")
    _refused(logic, volume, "The Region must be a markups ROI node", roiNode=volume)
    _refused(logic, volume, "The output segmentation must be a segmentation node", outputSegmentation=volume)


def test_a_callback_that_raises_ends_the_run_and_leaves_nothing(logic, tmp_path):
    # The engine had run on, the patient's copy stayed on disk and every later run was "already running".
    volume = _volume(tmp_path)

    def broken(event):
        raise ValueError("my callback")

    with pytest.raises(ValueError, match="my callback"):
        logic.segmentVolume(volume, device="cpu", onProgress=broken)
    job = logic.activeJob
    assert job.done and not job.tempDir.exists()
    assert job.runner._process.poll() is not None
    assert _run(logic, volume).status == "completed"


# ------------------------------------------------------------------------------- the self-test


@pytest.fixture
def views(mod):
    """Red (axial), Yellow (sagittal) and Green (coronal) slice views as Slicer's layout manager makes
    them: a slice node, its composite node and a real vtkMRMLSliceLogic registered with the application
    logic. Slicer's automatic spacing and its offset stepping are these logics' own."""
    applicationLogic = slicer.app.applicationLogic()
    logics = vtk.vtkCollection()
    made = {}
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        sliceLogic = slicer.vtkMRMLSliceLogic()
        sliceLogic.SetMRMLApplicationLogic(applicationLogic)
        sliceLogic.SetMRMLScene(slicer.mrmlScene)
        sliceNode = sliceLogic.AddSliceNode(name)
        assert sliceNode.SetOrientation(orientation) and sliceLogic.GetSliceCompositeNode() is not None
        logics.AddItem(sliceLogic)
        made[name] = sliceLogic
    applicationLogic.SetSliceLogics(logics)
    yield made
    applicationLogic.SetSliceLogics(None)
    for sliceLogic in made.values():
        for node in (sliceLogic.GetSliceNode(), sliceLogic.GetSliceCompositeNode()):
            if node is not None and node.GetScene():
                slicer.mrmlScene.RemoveNode(node)
        sliceLogic.SetMRMLScene(None)


def _prescribed(sliceLogic):
    """The view's prescribed spacing, or None in Automatic spacing."""
    sliceNode = sliceLogic.GetSliceNode()
    if sliceNode.GetSliceSpacingMode() != slicer.vtkMRMLSliceNode.PrescribedSliceSpacingMode:
        return None
    return tuple(sliceNode.GetPrescribedSliceSpacing())


def _step(sliceLogic):
    """The offset step of the arrow keys (vtkMRMLSliceIntersectionWidget::GetSliceSpacing), which
    Segment Editor's brush also takes as its slice thickness."""
    sliceNode = sliceLogic.GetSliceNode()
    if sliceNode.GetSliceSpacingMode() == slicer.vtkMRMLSliceNode.PrescribedSliceSpacingMode:
        return sliceNode.GetPrescribedSliceSpacing()[2]
    return sliceLogic.GetLowestVolumeSliceSpacing()[2]


def _slider_resolution(sliceLogic):
    """The slice offset slider's step (qMRMLSliceControllerWidget asks the logic for it)."""
    offsetRange, resolution = [0.0, 0.0], vtk.reference(0.0)
    assert sliceLogic.GetSliceOffsetRangeResolution(offsetRange, resolution)
    return resolution.get()


def _hr_slices_stepped_through(sliceLogic, rows, axis):
    """Step the view through the volume with the arrow keys' step, as vtkMRMLSliceIntersectionWidget's
    MoveSlice does (within the slice bounds), from the current offset; returns each plane's continuous
    index along `axis` of the grid `rows` (image-to-world)."""
    inverse = np.linalg.inv(np.array(rows))
    bounds = [0.0] * 6
    sliceLogic.GetSliceBounds(bounds)
    offset, step, indices = sliceLogic.GetSliceOffset(), _step(sliceLogic), []
    while offset - step >= bounds[4]:
        offset -= step
    while offset <= bounds[5]:
        sliceLogic.SetSliceOffset(offset)
        centre = [sliceLogic.GetSliceNode().GetSliceToRAS().GetElement(r, 3) for r in range(3)] + [1.0]
        indices.append((inverse @ centre)[axis])
        offset += step
    return indices


def test_after_a_run_the_views_showing_the_input_step_through_every_hr_slice(
    pkg, mod, logic, views, tmp_path
):
    """The panel's end of a run: the input becomes the views' background and they step at the HR spacing,
    onto the centre of each HR slice of the segmentation, one after the other."""
    volume = _volume(tmp_path)  # 2 mm
    red = views["Red"]
    red.GetSliceCompositeNode().SetBackgroundVolumeID(volume.GetID())
    red.SetSliceOffset(9.0)  # an input slice's centre, where Automatic spacing puts it
    # Slicer's Automatic spacing: the input's 2 mm, every other slice of a 1 mm segmentation.
    assert _step(red) == 2.0 and _slider_resolution(red) == 2.0
    result = _run(logic, volume, modelName="tiny-mr-3d")
    assert result.status == "completed", result.message
    panel = types.SimpleNamespace(
        _job=object(),
        _setRunning=lambda running: None,
        ui=types.SimpleNamespace(statusLabel=types.SimpleNamespace(text="")),
        _parameterNode=types.SimpleNamespace(
            inputVolume=volume, modelName="tiny-mr-3d", outputSegmentation=None
        ),
        _cards=logic.modelCards(),
        _hrSliceSpacing=pkg.sliceviews.HrSliceSpacing(),
    )
    panel._currentCard = lambda: mod.SASSRSegmentWidget._currentCard(panel)
    panel._showResult = lambda volumeNode: mod.SASSRSegmentWidget._showResult(panel, volumeNode)

    mod.SASSRSegmentWidget._onFinished(panel, result)

    assert panel._parameterNode.outputSegmentation is result.segmentationNode
    for sliceLogic in views.values():
        assert sliceLogic.GetSliceCompositeNode().GetBackgroundVolumeID() == volume.GetID()
        assert _prescribed(sliceLogic) == (1.0, 1.0, 1.0)
        # What Slicer's stepping asks for: the arrow keys, the offset slider, GetLowestVolumeSliceSpacing.
        assert _step(sliceLogic) == 1.0 and _slider_resolution(sliceLogic) == 1.0
        assert tuple(sliceLogic.GetLowestVolumeSliceSpacing()) == (1.0, 1.0, 1.0)
    # Red steps through all 16 HR slices (the input's 8, twice as fine), each at its centre.
    rows, dimensions = pkg.segmentation.referenceGeometry(result.segmentationNode)
    indices = _hr_slices_stepped_through(red, rows, 2)
    assert indices == pytest.approx(list(range(dimensions[2])), abs=1e-6)
    panel._hrSliceSpacing.release()


def test_hr_spacing_follows_each_views_orientation(pkg, views, tmp_path):
    """Each view gets Automatic's spacing along its own normal, halved: for an anisotropic input, a
    sagittal view steps at half the input's x spacing, an oblique one at half what Automatic gives it
    (Slicer's rule), and a view turned later gets its new orientation's."""
    volume = _volume(tmp_path, spacing=(1.0, 1.5, 3.0))
    slicer.util.setSliceViewerLayers(background=volume)
    red = views["Red"]
    rotation = vtk.vtkTransform()
    rotation.RotateX(30.0)
    sliceToRas = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Multiply4x4(rotation.GetMatrix(), red.GetSliceNode().GetSliceToRAS(), sliceToRas)
    red.GetSliceNode().GetSliceToRAS().DeepCopy(sliceToRas)
    red.GetSliceNode().UpdateMatrices()
    # Slicer's rule for an oblique view: the spacing of the input axis closest to the normal in index
    # space, projected on the normal. 30 degrees from z, the normal is closer to y there (1.5 mm against
    # 3 mm voxels): y's 1.5 mm, projected.
    automatic = _step(red)
    assert automatic == pytest.approx(1.5 * math.sin(math.radians(30.0)))
    hr = pkg.sliceviews.HrSliceSpacing()

    hr.show(volume, [2, 2, 2])

    assert _step(views["Yellow"]) == pytest.approx(0.5)  # x: 1.0 mm
    assert _step(views["Green"]) == pytest.approx(0.75)  # y: 1.5 mm
    assert _step(red) == pytest.approx(automatic / 2)
    views["Red"].GetSliceNode().SetOrientation("Sagittal")
    assert _step(red) == pytest.approx(0.5)
    views["Red"].GetSliceNode().SetOrientation("Axial")
    assert _step(red) == pytest.approx(1.5) and _prescribed(red) == pytest.approx((0.5, 0.75, 1.5))
    hr.release()


def test_views_showing_another_volume_are_left_alone_and_go_back_to_automatic(pkg, views, tmp_path):
    """Only the views whose background is the input get the HR spacing; a view that stops showing it goes
    back to Automatic, unless the user set its spacing; release() (scene close) gives the rest back."""
    volume = _volume(tmp_path)
    other = _volume(tmp_path, "Other", spacing=(0.7, 0.7, 0.7))
    slicer.util.setSliceViewerLayers(background=volume)
    views["Yellow"].GetSliceCompositeNode().SetBackgroundVolumeID(other.GetID())
    hr = pkg.sliceviews.HrSliceSpacing()

    hr.show(volume, [2, 2, 2])

    assert _prescribed(views["Yellow"]) is None and _step(views["Yellow"]) == pytest.approx(0.7)
    assert _prescribed(views["Red"]) == _prescribed(views["Green"]) == (1.0, 1.0, 1.0)
    # Red now shows another volume: Automatic, which steps through it (a 1 mm spacing would skip slices).
    views["Red"].GetSliceCompositeNode().SetBackgroundVolumeID(other.GetID())
    assert _prescribed(views["Red"]) is None and _step(views["Red"]) == pytest.approx(0.7)
    # Back on the input, Red stays in Automatic: the next run's result sets it again.
    views["Red"].GetSliceCompositeNode().SetBackgroundVolumeID(volume.GetID())
    assert _prescribed(views["Red"]) is None
    # The user's own spacing in Green (the view controller's spacing menu) stays the user's.
    views["Green"].GetSliceNode().SetPrescribedSliceSpacing(3.0, 3.0, 3.0)
    views["Green"].GetSliceCompositeNode().SetBackgroundVolumeID(other.GetID())
    assert _prescribed(views["Green"]) == (3.0, 3.0, 3.0)
    # A scene close (or the input removed) leaves no view in the HR spacing of a volume it no longer shows.
    slicer.util.setSliceViewerLayers(background=volume)
    hr.show(volume, [2, 2, 2])
    assert all(_prescribed(sliceLogic) == (1.0, 1.0, 1.0) for sliceLogic in views.values())
    slicer.mrmlScene.RemoveNode(volume)
    assert all(_prescribed(sliceLogic) is None for sliceLogic in views.values())
    slicer.util.setSliceViewerLayers(background=other)
    hr.show(other, [2, 2, 2])
    assert _prescribed(views["Red"]) == pytest.approx((0.35, 0.35, 0.35))
    hr.release()
    assert all(_prescribed(sliceLogic) is None for sliceLogic in views.values())


def test_2d_images_and_missing_slice_logics_leave_the_views_alone(pkg, views, tmp_path):
    """A 2D image is not refined through-plane ([2, 2, 1]): its views keep Automatic spacing. Without slice
    logics (Slicer without its layout) or for a view without one, nothing changes and nothing fails."""
    image = _image_2d(tmp_path)
    slicer.util.setSliceViewerLayers(background=image)
    hr = pkg.sliceviews.HrSliceSpacing()
    scales = pkg.geometry.hrScales({"preprocessing": {"scale": 2}}, image.GetImageData().GetDimensions())
    assert scales == [2, 2, 1]

    hr.show(image, scales)

    assert all(_prescribed(sliceLogic) is None for sliceLogic in views.values())
    volume = _volume(tmp_path)
    slicer.util.setSliceViewerLayers(background=volume)
    slicer.app.applicationLogic().SetSliceLogics(None)
    hr.show(volume, [2, 2, 2])
    only = vtk.vtkCollection()
    only.AddItem(views["Red"])
    slicer.app.applicationLogic().SetSliceLogics(only)
    hr.show(volume, [2, 2, 2])
    assert _prescribed(views["Red"]) == (1.0, 1.0, 1.0)
    assert _prescribed(views["Yellow"]) is None and _prescribed(views["Green"]) is None
    hr.release()


def test_the_modules_self_test_with_the_bundled_brain_model(mod, pkg):
    if not pkg.cards.readModelCards():
        pytest.skip("no bundled model (Resources/Models is empty)")
    mod.SASSRSegmentTest().runTest()


def test_the_input_selector_offers_no_diffusion_volume_but_keeps_vector_ones():
    """DWI and DTI volumes are scalar volumes in Slicer's class tree, so a selector of scalar volumes
    offers them and the panel would pick one first: both hide the same classes, and RGB (vector)
    volumes, which ultrasound images load as, stay."""
    import ast
    import xml.etree.ElementTree as ET

    tree = ast.parse((MODULE_DIR / "SASSRSegmentSlicer" / "logic.py").read_text(encoding="utf-8"))
    (hidden,) = [
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["NOT_IMAGES"]
    ]
    ui = ET.parse(MODULE_DIR / "Resources" / "UI" / "SASSRSegment.ui").getroot()
    selector = ui.find(".//widget[@name='inputVolumeSelector']")
    assert [s.text for s in selector.find("property[@name='hideChildNodeTypes']/stringlist")] == list(hidden)
    assert [s.text for s in selector.find("property[@name='nodeTypes']/stringlist")] == [
        "vtkMRMLScalarVolumeNode"
    ]
    for kind in ("vtkMRMLDiffusionWeightedVolumeNode", "vtkMRMLDiffusionTensorVolumeNode"):
        node = getattr(slicer, kind)()
        assert node.IsA("vtkMRMLScalarVolumeNode") and any(node.IsA(k) for k in hidden), kind
    for kind in ("vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"):
        assert not any(getattr(slicer, kind)().IsA(k) for k in hidden), kind
