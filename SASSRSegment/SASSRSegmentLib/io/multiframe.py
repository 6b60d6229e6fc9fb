"""A multi-frame DICOM file (Enhanced MR or CT: one file holds the whole volume) against its own frames'
positions.

ITK (GDCM) takes such a file's geometry from its functional groups, but where the frames' positions fail
its strict evenness test (positions written with two decimals on a tilted stack) it falls back to
1 x 1 x 1 mm, in plane too, without a word; and it stacks the frames as stored, in acquisition order
if that is how they were written. Either way the mask came back hundreds of millimetres off its scan,
with exit status 0. ITK's metadata does not show the per-frame sequences, so the few values needed are
read here by walking the data set (`dicomwalk.py`) to where the standard puts them: each frame's Plane
Position, and the Plane Orientation and Pixel Measures, per frame or shared. A vendor's private copy of
a position, an icon's pixel data or a source image's position are not mistaken for them. A series
split over several such files is read file by file and joined by its frames' positions (the series
reader stacked the files along a fourth axis).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..runtime.errors import UserError
from .dicomwalk import functional_groups
from .headers import check_heights

FRAMES_TAG = "0028|0008"
# Differences a correct reading still shows: positions written with few decimals.
_SPACING_TOLERANCE, _VOXEL_TOLERANCE = 0.01, 0.5


def _in_order(image: sitk.Image, order: np.ndarray) -> sitk.Image:
    """`image`'s frames in `order`, its metadata (the modality) kept; its geometry is set by the caller."""
    array = sitk.GetArrayViewFromImage(image)[order]
    ordered = sitk.GetImageFromArray(array, image.GetNumberOfComponentsPerPixel() > 1)
    for key in image.GetMetaDataKeys():
        ordered.SetMetaData(key, image.GetMetaData(key))
    return ordered


def _plane(orientations: np.ndarray, spacings: np.ndarray, name: str) -> tuple[np.ndarray, ...]:
    """(row direction, column direction, normal, in-plane spacing x, y) shared by every frame;
    directions written with few decimals are made orthonormal again."""
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        raise UserError(f"{name}: its frames have several orientations (a localiser?); give one acquisition")
    if np.abs(spacings - spacings[0]).max() > 1e-3 * spacings[0].max():
        raise UserError(f"{name}: its frames have several pixel spacings; give one acquisition")
    first = orientations[0]
    if (
        abs(np.linalg.norm(first[:3]) - 1) > 0.01
        or abs(np.linalg.norm(first[3:]) - 1) > 0.01
        or abs(first[:3] @ first[3:]) > 0.01
    ):
        raise UserError(
            f"{name}: its image orientation (0020,0037) is damaged (not two perpendicular unit vectors)"
        )
    rows = first[:3] / np.linalg.norm(first[:3])
    columns = first[3:] - (first[3:] @ rows) * rows
    columns /= np.linalg.norm(columns)
    return rows, columns, np.cross(rows, columns), np.array([spacings[0][1], spacings[0][0]])


def check_multiframe(image: sitk.Image, path: Path, name: str, warn: Callable[[str], None]) -> sitk.Image:
    """`image`, read by ITK from the one DICOM file `path`, on the grid its frames' positions give (said
    in `warn` where ITK's differed); UserError where the frames cannot make one even stack."""
    frames = image.GetSize()[2] if image.GetDimension() == 3 else 1
    groups = functional_groups(path, frames) if frames > 1 else {}
    if groups == {}:
        return image  # no functional groups to follow (a classic multi-frame file: an ultrasound cine)
    if groups and groups["position"] is None and groups["shared position"]:
        raise UserError(
            f"{name}: its {frames} frames lie at one position (a cine or time series?); give a volume"
        )
    if not groups or any(groups[key] is None for key in ("position", "orientation", "spacing")):
        if image.GetSpacing() == (1.0, 1.0, 1.0):  # ITK's fallback where it found no spacing it trusts
            raise UserError(
                f"{name}: the geometry of this multi-frame DICOM file cannot be read (ITK falls back to "
                "1 x 1 x 1 mm): convert it to a series or NIfTI (e.g. with dcm2niix), or load it in Slicer"
            )
        return image
    rows, columns, normal, in_plane = _plane(groups["orientation"], groups["spacing"], name)
    positions = groups["position"]
    heights = positions @ normal
    check_heights(np.sort(heights), frames, name, "frames")
    if not ((np.diff(heights) > 0).all() or (np.diff(heights) < 0).all()):
        warn(
            f"{name}: its frames are stored out of slice order (in acquisition order?); they are put in order"
        )
        order = np.argsort(heights, kind="stable")
        image, positions, heights = _in_order(image, order), positions[order], heights[order]
    return _with_geometry(
        image, *_grid(positions, heights, rows, columns, normal, in_plane, name), name, warn
    )


def _grid(positions, heights, rows, columns, normal, in_plane, name) -> tuple[np.ndarray, ...]:
    """(spacing, origin, direction) of frames at `positions` (sorted by `heights` along `normal`)."""
    # The end-to-end step: the median of steps rounded to two decimals drifted by 0.9 mm over 300 frames.
    step = float(heights[-1] - heights[0]) / (len(heights) - 1)
    spacing = np.array([*in_plane, abs(step)])
    along_plane = np.column_stack([rows, columns])
    sideways = np.abs((positions - positions[0] - np.outer(heights - heights[0], normal)) @ along_plane)
    if (sideways / in_plane).max() > _VOXEL_TOLERANCE:
        raise UserError(
            f"{name}: its frames shift sideways from one to the next (a gantry tilt?), by up to "
            f"{(sideways / in_plane).max():.1f} voxels, so no regular grid holds them: resample it onto "
            "one first (dcm2niix corrects a gantry tilt)"
        )
    return spacing, positions[0], np.column_stack([rows, columns, np.sign(step) * normal])


def _with_geometry(image, spacing, origin, direction, name, warn) -> sitk.Image:
    read = np.array(image.GetSpacing())
    if (
        np.allclose(read, spacing, rtol=_SPACING_TOLERANCE)
        and (np.abs(np.array(image.GetOrigin()) - origin) / spacing).max() < _VOXEL_TOLERANCE
        and np.allclose(np.array(image.GetDirection()).reshape(3, 3), direction, atol=1e-3)
    ):
        return image
    if not np.allclose(read, spacing, rtol=_SPACING_TOLERANCE):
        warn(
            f"{name}: ITK read this multi-frame file's voxels as {' x '.join(f'{v:.3g}' for v in read)} mm; "
            f"its frames' positions give {' x '.join(f'{v:.3g}' for v in spacing)} mm, which are used"
        )
    return _placed(image, spacing, origin, direction)


def _placed(image: sitk.Image, spacing, origin, direction) -> sitk.Image:
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(np.asarray(origin, dtype=float).tolist())
    image.SetDirection(direction.ravel().tolist())
    return image


def join_files(paths: list[Path], name: str) -> sitk.Image:
    """One volume from a series whose frames are split over several multi-frame files: the frames of all,
    each placed by its own position (a file of an interleaved series holds every other slice), in slice
    order, on the grid their positions give; UserError where they are not one acquisition's even stack."""
    arrays, positions, orientations, spacings, first = [], [], [], [], None
    for path in paths:
        image = sitk.ReadImage(str(path))
        frames = image.GetSize()[2] if image.GetDimension() == 3 else 1
        groups = functional_groups(path, frames)
        if not groups or any(groups[key] is None for key in ("position", "orientation", "spacing")):
            raise UserError(
                f"{name}: its file {path.name} does not place each of its frames, so the series' {len(paths)} "
                "files cannot be joined: convert the series with dcm2niix, or load it in Slicer"
            )
        first = first or image
        if image.GetSize()[:2] != first.GetSize()[:2]:
            raise UserError(f"{name}: its files hold frames of different sizes; give one acquisition")
        array = sitk.GetArrayFromImage(image)
        arrays.append(array if image.GetDimension() == 3 else array[None])
        positions.append(groups["position"])
        orientations.append(groups["orientation"])
        spacings.append(groups["spacing"])
    positions = np.concatenate(positions)
    rows, columns, normal, in_plane = _plane(np.concatenate(orientations), np.concatenate(spacings), name)
    heights = positions @ normal
    order = np.argsort(heights, kind="stable")
    check_heights(heights[order], len(order), name, "frames")
    image = sitk.GetImageFromArray(np.concatenate(arrays)[order], first.GetNumberOfComponentsPerPixel() > 1)
    for key in first.GetMetaDataKeys():
        image.SetMetaData(key, first.GetMetaData(key))
    return _placed(image, *_grid(positions[order], heights[order], rows, columns, normal, in_plane, name))
