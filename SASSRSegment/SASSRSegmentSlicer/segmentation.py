"""The lesion segmentation: the Lesion segment and its terminology, the HR grid as the segmentation's
reference geometry, and what a failed import puts back in an existing segmentation."""

from .geometry import matrixRows, superResolvedGrid
from .naming import uniqueName
from .scene import placeLikeInput, removeNodeWithHelpers
from .slicerapi import _, slicer, vtk

LESION_SEGMENT_NAME = "Lesion"
LESION_COLOR = (0.95, 0.45, 0.15)
# Neoplasm is a type of the DICOM master list (CID 7159), not of Slicer's General Anatomy list: naming the
# context that holds it lets the terminology selector find the entry.
LESION_TERMINOLOGY = (
    "Segmentation category and type - DICOM master list"
    "~SCT^49755003^Morphologically Altered Structure~SCT^108369006^Neoplasm~^^"
    "~Anatomic codes - DICOM master list~^^~^^"
)
# Marks a segmentation that received a volume's lesions, with that volume (a node reference, so it
# follows the volume through scene save and load).
INPUT_VOLUME_REFERENCE_ROLE = "sassrSegmentInputVolume"


def segmentIdByName(segmentationNode, name):
    """The id of the segment called `name`, or "" when there is none."""
    return segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(name) or ""


def segmentationInputVolume(segmentationNode):
    """The volume whose lesions this module put into a segmentation; None for any other segmentation."""
    return segmentationNode.GetNodeReference(INPUT_VOLUME_REFERENCE_ROLE)


def createSegmentation(volumeNode, name):
    """A new segmentation for the lesions of `volumeNode`, beside it (same transform and study)."""
    segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentationNode.CreateDefaultDisplayNodes()
    placeLikeInput(segmentationNode, volumeNode)
    return segmentationNode


class SegmentationRestorePoint:
    """What a run changes in an existing segmentation, put back by restore() when the import fails."""

    def __init__(self, segmentationNode):
        self.node = segmentationNode
        segmentation = segmentationNode.GetSegmentation()
        self.geometry = segmentation.GetConversionParameter(_geometryParameterName())
        self.references = {
            role: segmentationNode.GetNodeReferenceID(role)
            for role in (
                segmentationNode.GetReferenceImageGeometryReferenceRole(),
                INPUT_VOLUME_REFERENCE_ROLE,
            )
        }
        self.segmentIds = _segmentIds(segmentation)
        self.replaced = {}

    def keepSegment(self, segmentId):
        """Remember a segment's content before it is replaced."""
        copy = slicer.vtkSegment()
        copy.DeepCopy(self.node.GetSegmentation().GetSegment(segmentId))
        self.replaced[segmentId] = copy

    def restore(self):
        segmentation = self.node.GetSegmentation()
        for segmentId in _segmentIds(segmentation):
            if segmentId not in self.segmentIds or segmentId in self.replaced:
                segmentation.RemoveSegment(segmentId)
        for segmentId, copy in self.replaced.items():
            following = self.segmentIds[self.segmentIds.index(segmentId) + 1 :]
            segmentation.AddSegment(copy, segmentId, next(iter(following), ""))
        segmentation.SetConversionParameter(_geometryParameterName(), self.geometry)
        for role, nodeId in self.references.items():
            self.node.SetNodeReferenceID(role, nodeId)


def _segmentIds(segmentation):
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def _geometryParameterName():
    return slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()


def importLesionSegmentation(
    labelPath, volumeNode, segmentationNode, scales, replaceSegment, restorePoint=None
):
    """Import the HR label map as the "Lesion" segment; the HR grid becomes the reference geometry."""
    labelNode = slicer.util.loadLabelVolume(str(labelPath), {"show": False})
    try:
        labelNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        # The segmentation now holds this volume's lesions: no other volume's may join them.
        segmentationNode.SetNodeReferenceID(INPUT_VOLUME_REFERENCE_ROLE, volumeNode.GetID())
        # The input stays the source volume that Segment Editor proposes (and DICOM export refers to) ...
        segmentationNode.SetNodeReferenceID(
            segmentationNode.GetReferenceImageGeometryReferenceRole(), volumeNode.GetID()
        )
        # ... but editing happens at the reference geometry: the input's whole HR grid (not the LR grid,
        # and not just the ROI that the label map may cover).
        setReferenceGeometry(segmentationNode, *hrGeometryInFrameOf(segmentationNode, volumeNode, scales))
        segmentation = segmentationNode.GetSegmentation()
        segmentId = segmentIdByName(segmentationNode, LESION_SEGMENT_NAME) if replaceSegment else ""
        if segmentId and restorePoint:
            restorePoint.keepSegment(segmentId)
        if not segmentId:
            existing = [
                segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())
            ]
            segmentId = segmentation.AddEmptySegment(
                "", uniqueName(LESION_SEGMENT_NAME, existing), LESION_COLOR
            )
        segmentIds = vtk.vtkStringArray()
        segmentIds.InsertNextValue(segmentId)
        # Importing into a named segment keeps an empty result as an empty segment (no lesion found).
        if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(
            labelNode, segmentationNode, segmentIds
        ):
            raise RuntimeError(_("Could not import the label map into the segmentation."))
        segment = segmentation.GetSegment(segmentId)
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), LESION_TERMINOLOGY)
        segment.SetColor(LESION_COLOR)
        segmentationNode.CreateClosedSurfaceRepresentation()
        return segmentId
    finally:
        removeNodeWithHelpers(labelNode)


def hrGeometryInFrameOf(segmentationNode, volumeNode, scales):
    """The input's HR grid as (image-to-world 4x4 rows, dimensions) in the segmentation's own coordinates.

    A segmentation's reference geometry is in its local frame: when it is not under the volume's
    transform, the grid is carried from the volume's frame into the segmentation's.
    """
    inputMatrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(inputMatrix)
    rows, dimensions = superResolvedGrid(
        matrixRows(inputMatrix), volumeNode.GetImageData().GetDimensions(), scales
    )
    volumeToSegmentation = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
        volumeNode.GetParentTransformNode(), segmentationNode.GetParentTransformNode(), volumeToSegmentation
    ):
        raise RuntimeError(
            _("The input volume and the segmentation are related by a non-linear transform: harden it first.")
        )
    transform = matrixRows(volumeToSegmentation)
    rows = [[sum(transform[r][k] * rows[k][c] for k in range(4)) for c in range(4)] for r in range(4)]
    return rows, dimensions


def referenceGeometry(segmentationNode):
    """The segmentation's reference geometry as (image-to-world rows of index 0, dimensions), or None."""
    text = segmentationNode.GetSegmentation().GetConversionParameter(_geometryParameterName())
    if not text:
        return None
    geometry = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(text, geometry, False)
    matrix = vtk.vtkMatrix4x4()
    geometry.GetImageToWorldMatrix(matrix)
    extent = geometry.GetExtent()
    dimensions = [extent[2 * k + 1] - extent[2 * k] + 1 for k in range(3)]
    return _shiftedRows(matrix, [extent[0], extent[2], extent[4]]), dimensions


def hasReferenceGeometry(segmentationNode, rows, dimensions):
    """Whether the segmentation has no reference geometry yet or already this one (to 1e-4 mm)."""
    current = referenceGeometry(segmentationNode)
    if current is None:
        return True
    currentRows, currentDimensions = current
    return list(currentDimensions) == list(dimensions) and all(
        abs(currentRows[r][c] - rows[r][c]) <= 1e-4 for r in range(3) for c in range(4)
    )


def setReferenceGeometry(segmentationNode, rows, dimensions):
    """Make the segmentation's reference geometry the grid (image-to-world rows, dimensions)."""
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, rows[r][c])
    geometry = slicer.vtkOrientedImageData()
    geometry.SetImageToWorldMatrix(matrix)
    geometry.SetExtent(0, dimensions[0] - 1, 0, dimensions[1] - 1, 0, dimensions[2] - 1)
    segmentationNode.GetSegmentation().SetConversionParameter(
        _geometryParameterName(), slicer.vtkSegmentationConverter.SerializeImageGeometry(geometry)
    )


def _shiftedRows(matrix, offset):
    """A vtkMatrix4x4 as nested rows, with the grid's first index moved to 0 (extents need not start at 0)."""
    rows = matrixRows(matrix)
    for r in range(3):
        rows[r][3] += sum(rows[r][c] * offset[c] for c in range(3))
    return rows
