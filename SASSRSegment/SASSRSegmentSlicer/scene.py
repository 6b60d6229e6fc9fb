"""Scene nodes: unique node names, a volume's DICOM modality, writing the input for the engine, placing
new nodes like the input, reading the engine's files, and removing what a run added."""

from pathlib import Path

from SASSRSegmentLib.io.files import PICTURE_FORMATS

from .naming import uniqueName
from .slicerapi import _, slicer

# vtkSlicerVolumesLogic::AddArchetypeVolume's loading options.
LABEL_MAP, SINGLE_FILE, AUTO_WINDOW_LEVEL = 1, 4, 8


def uniqueNodeName(base):
    """`base`, or `base 2`, ...: no two runs' nodes share a name, whatever failed in between."""
    scene = slicer.mrmlScene
    return uniqueName(base, (scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes())))


def dicomModality(volumeNode):
    """The DICOM modality (MR, US, CT, ...) of a volume loaded from DICOM, else ""."""
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    item = shNode.GetItemByDataNode(volumeNode)
    if not item:
        return ""
    attribute = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName()
    return shNode.GetItemAttribute(item, attribute) or ""


def pictureFormat(volumeNode):
    """The suffix (".png", ...) of the picture file a volume was loaded from; "" for any other volume."""
    storage = volumeNode.GetStorageNode()
    suffix = Path((storage.GetFileName() if storage else "") or "").suffix.lower()
    return suffix if suffix in PICTURE_FORMATS else ""


# Where a DICOM image states its pixel size: Pixel Spacing, Imager Pixel Spacing (rows\columns apart).
_SPACING_TAGS = ("0028,0030", "0018,1164")


def _dicomSpacingUnstated(volumeNode):
    """Whether an ultrasound image loaded from DICOM has the 1 x 1 mm a reader gives where no element
    states a pixel size: it keeps its calibration in its regions, which Slicer's image sequence loader
    reads only where there is one region."""
    if dicomModality(volumeNode) != "US":
        # An enhanced MR or CT file states its pixel size inside functional groups, which a
        # top-level look-up misses; an ultrasound image is the one read without a stated size.
        return False
    uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
    database = getattr(slicer, "dicomDatabase", None)
    path = database.fileForInstance(uids[0]) if uids and database is not None else ""
    spacing = tuple(volumeNode.GetSpacing()[:2])
    if not path or spacing != (1.0, 1.0):
        return False
    for tag in _SPACING_TAGS:
        try:
            rows, columns = (float(v) for v in database.fileValue(path, tag).split("\\"))
        except ValueError:  # absent, or not two numbers
            continue
        if (columns, rows) == spacing:
            return False
    return True


def unmeasuredPixelsNote(volumeNode):
    """The engine's warning that a lesion table's mm are not measured, for a volume loaded from a picture
    (PNG, JPEG, ...) or from DICOM that states no pixel size: the engine reads the NRRD the panel writes,
    which keeps no trace of either; "" else."""
    spacing = " x ".join(f"{v:g}" for v in volumeNode.GetSpacing()[:2])
    suffix = pictureFormat(volumeNode)
    if suffix:
        source = _("a {format} file stores no measured pixel size").format(format=suffix[1:].upper())
    elif _dicomSpacingUnstated(volumeNode):
        source = _("this DICOM image states no pixel spacing")
    else:
        return ""
    return _(
        "The lesion table's sizes in mm are not measured ones: {source} (its pixels are read as {spacing} mm); "
        "calibrate them, or read them as pixels."
    ).format(source=source, spacing=spacing)


def writeVolumeToFile(volumeNode, path):
    """Write a volume without touching its own storage node (the scene keeps pointing at the user's file)."""
    storageNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    try:
        storageNode.SetFileName(str(path))
        storageNode.UseCompressionOff()
        if not storageNode.WriteData(volumeNode):
            raise RuntimeError(_("Could not write the input volume to a temporary file."))
    finally:
        slicer.mrmlScene.RemoveNode(storageNode)


def placeLikeInput(node, volumeNode):
    """Same parent transform (for nodes that can have one) and subject-hierarchy folder as the input volume."""
    if node.IsA("vtkMRMLTransformableNode"):
        node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    inputItem = shNode.GetItemByDataNode(volumeNode)
    if inputItem:
        shNode.SetItemParent(shNode.GetItemByDataNode(node), shNode.GetItemParent(inputItem))


def removeNodeWithHelpers(node):
    """Remove a loaded node together with its display and storage nodes."""
    helpers = []
    if node.IsA("vtkMRMLDisplayableNode"):
        helpers += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if node.IsA("vtkMRMLStorableNode"):
        helpers.append(node.GetStorageNode())
    slicer.mrmlScene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and helper.GetScene():
            slicer.mrmlScene.RemoveNode(helper)


def detachFromTemporaryFile(node):
    """Drop the storage node of a node read from a temporary file, so that saving the scene writes it anew."""
    storageNode = node.GetStorageNode()
    if storageNode is not None:
        node.SetAndObserveStorageNodeID(None)
        slicer.mrmlScene.RemoveNode(storageNode)


def readEngineVolume(path, name, labelMap=False):
    """A volume read from one of the engine's files by the Volumes logic, not the IO manager: that lists
    every file it reads under File > Recent, where a run's temporary files would push out the user's."""
    options = SINGLE_FILE | (LABEL_MAP if labelMap else AUTO_WINDOW_LEVEL)
    node = slicer.modules.volumes.logic().AddArchetypeVolume(str(path), name, options)
    if node is None:
        raise RuntimeError(_("Could not read the engine's result {file}.").format(file=Path(path).name))
    return node


def loadSuperResolvedImage(path, volumeNode, name):
    imageNode = readEngineVolume(path, name)
    detachFromTemporaryFile(imageNode)
    placeLikeInput(imageNode, volumeNode)
    return imageNode
