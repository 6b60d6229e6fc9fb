"""The Region (ROI): its box in the input volume's own coordinates, refused in the panel's words when
the engine could not use it (never placed, flat, beside the volume)."""

from .command import roiBoundsArguments
from .geometry import boundsOfPoints, boxCorners, gridSpatialDims, matrixRows, voxelCornerBounds
from .slicerapi import _, vtk


def roiOverlapsGrid(bounds, rasToIjk, dimensions):
    """Whether a box (RAS bounds in the grid's own frame) touches a voxel of the grid.

    The same test as the engine's: the box's corners in continuous index must overlap the voxels'
    extent [-1/2, n - 1/2] along every axis.
    """
    indices = [
        [sum(rasToIjk[r][c] * v for c, v in enumerate((*corner, 1.0))) for r in range(3)]
        for corner in boxCorners(bounds)
    ]
    box = boundsOfPoints(indices)
    return all(box[2 * k + 1] > -0.5 and box[2 * k] < dimensions[k] - 0.5 for k in range(3))


def sliceAxisBounds(bounds, ijkToRas, dimensions):
    """For a 2D image (one slice), the box with its extent along the slice normal set to the slice's.

    An ROI drawn on a 2D image may be flat across it; the engine still needs a box with a thickness.
    """
    axis = max(range(3), key=lambda r: abs(ijkToRas[r][2]))
    sliceBounds = voxelCornerBounds(ijkToRas, dimensions)
    bounds = list(bounds)
    bounds[2 * axis : 2 * axis + 2] = sliceBounds[2 * axis : 2 * axis + 2]
    return bounds


def roiBoundsForVolume(roiNode, volumeNode):
    """The ROI's bounding box in the input volume's own coordinates (those of the file the engine reads).

    Refuses, naming the panel's Region control, an ROI the engine could not use: never placed, flat, or
    beside the volume.
    """
    name = roiNode.GetName()
    if roiNode.GetNumberOfDefinedControlPoints() == 0:
        raise RuntimeError(
            _(
                "The Region (ROI) '{name}' is not placed: place it over the lesions, or choose Whole volume."
            ).format(name=name)
        )
    bounds = [0.0] * 6
    roiNode.GetRASBounds(bounds)
    transformNode = volumeNode.GetParentTransformNode()
    if transformNode is not None:
        if not transformNode.IsTransformToWorldLinear():
            raise RuntimeError(
                _("The input volume is under a non-linear transform: harden it before using a Region (ROI).")
            )
        worldToVolume = vtk.vtkMatrix4x4()
        transformNode.GetMatrixTransformFromWorld(worldToVolume)
        bounds = boundsOfPoints(
            worldToVolume.MultiplyPoint([*corner, 1.0])[:3] for corner in boxCorners(bounds)
        )
    ijkToRas = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRas)
    dimensions = volumeNode.GetImageData().GetDimensions()
    if gridSpatialDims(dimensions) == 2:
        bounds = sliceAxisBounds(bounds, matrixRows(ijkToRas), dimensions)
    try:
        roiBoundsArguments(bounds)
    except ValueError:
        raise RuntimeError(
            _("The Region (ROI) '{name}' is flat: give it a size along every axis.").format(name=name)
        ) from None
    rasToIjk = vtk.vtkMatrix4x4()
    volumeNode.GetRASToIJKMatrix(rasToIjk)
    if not roiOverlapsGrid(bounds, matrixRows(rasToIjk), dimensions):
        raise RuntimeError(
            _("The Region (ROI) '{name}' does not overlap the input volume: move it over the image.").format(
                name=name
            )
        )
    return bounds
