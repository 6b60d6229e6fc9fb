"""The module's self-test ("Reload and Test" in Slicer, or ctest: py_SASSRSegment).

The module file registers it as SASSRSegmentTest, the name Slicer looks for. It segments the shipped
sample with the panel's default options, and starts and cancels a run.
"""

import math
import time

from .geometry import matrixRows, voxelCornerBounds
from .logic import SASSRSegmentLogic
from .paths import SAMPLE_PATH
from .segmentation import LESION_TERMINOLOGY, lesionSegmentIds, referenceGeometry
from .slicerapi import ScriptedLoadableModuleTest, slicer, vtk


class SelfTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segmentSampleWithThePanelDefaults()
        self.setUp()
        self.test_cancelLeavesSceneClean()

    def _loadSample(self):
        self.assertTrue(SAMPLE_PATH.is_file(), f"sample missing: {SAMPLE_PATH}")
        return slicer.util.loadVolume(str(SAMPLE_PATH))

    def test_segmentSampleWithThePanelDefaults(self):
        self.delayDisplay("Segmenting the shipped sample on the CPU, with the panel's default options")
        volume = self._loadSample()
        results = []
        segmentationNode = SASSRSegmentLogic().segmentVolume(
            volume, device="cpu", wait=True, onFinished=results.append
        )
        self.assertIsNotNone(segmentationNode)
        result = results[0]
        self.assertEqual(result.status, "completed", result.message)
        self.assertEqual(segmentationNode.GetName(), f"{volume.GetName()} lesions")

        # The lesion table is on by default: one row per lesion, numbered 1.. from the largest.
        self.assertIsNotNone(result.tableNode, "no lesion table")
        self.assertGreater(result.tableNode.GetNumberOfRows(), 0)
        self.assertEqual(result.lesionCount, result.tableNode.GetNumberOfRows())
        ids = [int(v) for v in slicer.util.arrayFromTableColumn(result.tableNode, "id")]
        voxels = [int(v) for v in slicer.util.arrayFromTableColumn(result.tableNode, "voxels")]
        self.assertEqual(ids, list(range(1, len(ids) + 1)))

        # One segment per lesion, "Lesion <id>", each with the table's voxel count for its id.
        segmentIds = lesionSegmentIds(segmentationNode)
        segmentation = segmentationNode.GetSegmentation()
        names = [segmentation.GetSegment(segmentId).GetName() for segmentId in segmentIds]
        self.assertEqual(names, [f"Lesion {k}" for k in ids])
        for segmentId, tableVoxels in zip(segmentIds, voxels):
            segment = segmentation.GetSegment(segmentId)
            terminology = vtk.reference("")
            self.assertTrue(segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology))
            self.assertEqual(terminology.get(), LESION_TERMINOLOGY)
            # The segment is held at HR: its own labelmap, not one resampled to the input's grid.
            labelmap = slicer.util.arrayFromSegmentInternalBinaryLabelmap(segmentationNode, segmentId)
            self.assertEqual(int((labelmap == segment.GetLabelValue()).sum()), tableVoxels, segment.GetName())

        rows, hrDimensions = referenceGeometry(segmentationNode)
        self.assertEqual(hrDimensions, [2 * n for n in volume.GetImageData().GetDimensions()])
        lrMatrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(lrMatrix)
        for axis in range(3):
            hrSpacing = math.sqrt(sum(rows[r][axis] ** 2 for r in range(3)))
            self.assertAlmostEqual(hrSpacing, volume.GetSpacing()[axis] / 2, places=5)
        # Same physical extent (voxel corners), so the HR segmentation overlays the input exactly.
        hrBounds = voxelCornerBounds(rows, hrDimensions)
        lrBounds = voxelCornerBounds(matrixRows(lrMatrix), volume.GetImageData().GetDimensions())
        for index in range(6):
            self.assertAlmostEqual(hrBounds[index], lrBounds[index], places=3)
        self.delayDisplay("Sample segmented at x2 resolution, aligned with the input, lesion table made")

    def test_cancelLeavesSceneClean(self):
        self.delayDisplay("Starting and cancelling a segmentation")
        volume = self._loadSample()
        nodesBefore = _sceneNodeIds()
        results = []
        job = SASSRSegmentLogic().segmentVolume(volume, device="cpu", wait=False, onFinished=results.append)
        self.delayDisplay("Running; cancelling in a second")
        # Not delayDisplay's own wait: under Reload and Test it waits the application's message delay
        # instead, which can cancel before the engine has started and leave cancelling a run untested.
        _processEvents(1.0)
        job.cancel()
        _processEvents(60, until=lambda: results)
        self.assertEqual(len(results), 1, "the cancelled job did not finish")
        self.assertEqual(results[0].status, "cancelled")
        self.assertEqual(_sceneNodeIds(), nodesBefore)
        self.assertFalse(job.tempDir.exists(), "temporary files left behind")
        self.delayDisplay("Cancel left the scene and the disk clean")


def _processEvents(seconds, until=lambda: False):
    """Keep the application (and the job's output readers) running for `seconds`, or until `until()`."""
    deadline = time.monotonic() + seconds
    while not until() and time.monotonic() < deadline:
        slicer.app.processEvents()
        time.sleep(0.05)


def _sceneNodeIds():
    scene = slicer.mrmlScene
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
