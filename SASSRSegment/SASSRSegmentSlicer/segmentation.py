"""The lesion segmentation: one segment per lesion ("Lesion 1", ...) and their terminology, the HR grid as
the segmentation's reference geometry, and what a failed import puts back in an existing segmentation."""

from .geometry import matrixRows, superResolvedGrid
from .scene import placeLikeInput, readEngineVolume, removeNodeWithHelpers
from .slicerapi import _, slicer, vtk

LESION_SEGMENT_NAME = "Lesion"
LESION_COLOR = (0.95, 0.45, 0.15)
# Lesion 1 (the largest) keeps LESION_COLOR; the others cycle through these distinct colours.
LESION_COLORS = (
    LESION_COLOR,
    (0.25, 0.55, 0.95),
    (0.30, 0.75, 0.35),
    (0.85, 0.25, 0.60),
    (0.95, 0.85, 0.20),
    (0.55, 0.40, 0.85),
    (0.20, 0.80, 0.80),
    (0.65, 0.40, 0.25),
)
# Marks the segments a run made (value: the lesion-table id, 0 for an empty result's): replacing removes
# those and never a segment the user drew, whatever its name. Slicer saves tags with the segmentation.
LESION_SEGMENT_TAG = "SASSRSegment.Lesion"
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


def isLesionSegment(segment):
    """Whether a segment is one the module made (the rule replacing follows)."""
    return bool(segment.HasTag(LESION_SEGMENT_TAG))


def lesionSegmentIds(segmentationNode):
    """The ids of the module's lesion segments in a segmentation, in segment order."""
    return _lesionSegmentIds(segmentationNode.GetSegmentation())


def _lesionSegmentIds(segmentation):
    return [
        segmentId
        for segmentId in _segmentIds(segmentation)
        if isLesionSegment(segmentation.GetSegment(segmentId))
    ]


def lesionSegmentName(number):
    """The segment name of lesion `number` (its table id): "Lesion 3"; "Lesion" for 0 (an empty result)."""
    return f"{LESION_SEGMENT_NAME} {number}" if number else LESION_SEGMENT_NAME


def lesionColor(number):
    """The colour of lesion `number` (1 = the largest; 0 for the empty result's segment)."""
    return LESION_COLORS[(max(int(number), 1) - 1) % len(LESION_COLORS)]


def segmentationInputVolume(segmentationNode):
    """The volume whose lesions this module put into a segmentation; None for any other segmentation."""
    return segmentationNode.GetNodeReference(INPUT_VOLUME_REFERENCE_ROLE)


def storesLabelmaps(segmentationNode):
    """Whether the segmentation's source representation is the binary label map, the only one Slicer
    imports a label map into (a segmentation loaded from STL or OBJ has closed surfaces)."""
    source = segmentationNode.GetSegmentation().GetSourceRepresentationName()
    return source == slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()


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
        # From the last one back, so that the segment each goes before is in place already.
        for segmentId in reversed([i for i in self.segmentIds if i in self.replaced]):
            following = self.segmentIds[self.segmentIds.index(segmentId) + 1 :]
            segmentation.AddSegment(self.replaced[segmentId], segmentId, next(iter(following), ""))
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
    """Import the HR label map of numbered lesions (value k: the lesion table's id k) as the segments
    "Lesion 1".."Lesion N", or one empty "Lesion" segment when it holds none; the HR grid becomes the
    reference geometry. Returns the segment ids, lesion 1's first."""
    labelNode = readEngineVolume(labelPath, "SASSRSegment lesions", labelMap=True)
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
        # The engine numbers the lesions 1..N without gaps, the table's ids.
        count = int(round(labelNode.GetImageData().GetScalarRange()[1]))
        numbers = list(range(1, count + 1)) or [0]
        segmentIds = _emptyLesionSegments(segmentation, numbers, replaceSegment, restorePoint)
        idArray = vtk.vtkStringArray()
        for segmentId in segmentIds:
            idArray.InsertNextValue(segmentId)
        # Label value k goes into idArray's k-th segment (Slicer maps value index + 1 to the index-th id);
        # importing into named segments keeps an empty result as an empty segment (no lesion found).
        if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(
            labelNode, segmentationNode, idArray
        ):
            raise RuntimeError(_("Could not import the label map into the segmentation."))
        for number, segmentId in zip(numbers, segmentIds):
            segment = segmentation.GetSegment(segmentId)
            segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), LESION_TERMINOLOGY)
            segment.SetColor(lesionColor(number))
        segmentationNode.CreateClosedSurfaceRepresentation()
        return segmentIds
    finally:
        removeNodeWithHelpers(labelNode)


def _emptyLesionSegments(segmentation, numbers, replaceSegment, restorePoint):
    """New empty segments for the lesion `numbers`: in place of the module's earlier lesion segments with
    replaceSegment (each kept in the restore point), else after the others under names not yet taken."""
    position = segmentation.GetNumberOfSegments()
    if replaceSegment:
        old = _lesionSegmentIds(segmentation)
        position = segmentation.GetSegmentIndex(old[0]) if old else position
        for segmentId in old:
            if restorePoint:
                restorePoint.keepSegment(segmentId)
            segmentation.RemoveSegment(segmentId)
    existing = [segmentation.GetSegment(i).GetName() for i in _segmentIds(segmentation)]
    names = _untakenNames([lesionSegmentName(number) for number in numbers], existing)
    segmentIds = []
    for offset, (number, name) in enumerate(zip(numbers, names)):
        segmentId = segmentation.AddEmptySegment("", name, lesionColor(number))
        segmentation.GetSegment(segmentId).SetTag(LESION_SEGMENT_TAG, str(number))
        segmentation.SetSegmentIndex(segmentId, position + offset)
        segmentIds.append(segmentId)
    return segmentIds


def _untakenNames(names, existingNames):
    """`names`, or all of them with the same number added ("Lesion 1 2", "Lesion 2 2", ...), the first that
    takes none of existingNames: one run's segments keep one suffix (never replace silently)."""
    existing = set(existingNames)
    suffix = ""
    index = 1
    while any(f"{name}{suffix}" in existing for name in names):
        index += 1
        suffix = f" {index}"
    return [f"{name}{suffix}" for name in names]


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
