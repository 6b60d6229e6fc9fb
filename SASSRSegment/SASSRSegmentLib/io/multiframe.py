"""A multi-frame DICOM file (Enhanced MR or CT: one file holds the whole volume) against its own frames'
positions.

ITK (GDCM) takes such a file's geometry from its functional groups, but where the frames' positions fail
its strict evenness test (positions written with two decimals on a tilted stack) it falls back to
1 x 1 x 1 mm, in plane too, without a word; and it stacks the frames as stored, in acquisition order
if that is how they were written. Either way the mask came back hundreds of millimetres off its scan,
with exit status 0. The positions are in per-frame sequences that ITK's metadata does not show, so the
few tags needed are read here from the file's bytes.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..runtime.errors import UserError
from .headers import check_heights

_POSITION, _ORIENTATION, _PIXEL_SPACING = b"\x20\x00\x32\x00", b"\x20\x00\x37\x00", b"\x28\x00\x30\x00"
_PIXEL_DATA = b"\xe0\x7f\x10\x00"
# Differences a correct reading still shows: positions written with few decimals.
_SPACING_TOLERANCE, _ORIGIN_TOLERANCE = 0.01, 0.5


def _values(header: bytes, tag: bytes, count: int) -> list[np.ndarray]:
    """Every decimal-string value of `tag` with `count` numbers, explicit or implicit VR little endian;
    a match that does not parse so (the tag's bytes by chance elsewhere) is skipped."""
    found, start = [], header.find(tag)
    while start >= 0:
        if header[start + 4 : start + 6] == b"DS":
            (length,), offset = struct.unpack_from("<H", header, start + 6), start + 8
        else:
            (length,), offset = struct.unpack_from("<I", header, start + 4), start + 8
        text = header[offset : offset + length].decode("ascii", "replace").strip("\x00 ")
        try:
            numbers = np.array([float(v) for v in text.split("\\")])
        except ValueError:
            numbers = np.empty(0)
        if numbers.size == count and np.isfinite(numbers).all():
            found.append(numbers)
        start = header.find(tag, start + 4)
    return found


def _header(path: Path) -> bytes:
    """The file's bytes before its pixel data (where every functional group lies)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        end = data.find(_PIXEL_DATA, 132)
        return data[: end if end > 0 else len(data)]


def _in_order(image: sitk.Image, order: np.ndarray) -> sitk.Image:
    """`image`'s frames in `order`, its metadata (the modality) kept; its geometry is set by the caller."""
    ordered = sitk.GetImageFromArray(
        sitk.GetArrayViewFromImage(image)[order], image.GetNumberOfComponentsPerPixel() > 1
    )
    for key in image.GetMetaDataKeys():
        ordered.SetMetaData(key, image.GetMetaData(key))
    return ordered


def check_multiframe(image: sitk.Image, path: Path, name: str, warn: Callable[[str], None]) -> sitk.Image:
    """`image`, read by ITK from the one DICOM file `path`, on the grid its frames' positions give (said
    in `warn` where ITK's differed); UserError where the frames cannot make one even stack."""
    frames = image.GetSize()[2] if image.GetDimension() == 3 else 1
    if frames < 2:
        return image
    header = _header(path)
    positions = _values(header, _POSITION, 3)
    orientations = _values(header, _ORIENTATION, 6)
    spacings = _values(header, _PIXEL_SPACING, 2)
    if len(positions) != frames or not orientations or not spacings:
        return image  # not a stack this check can follow (a cine, a secondary capture)
    if np.abs(np.array(orientations) - orientations[0]).max() > 1e-3:
        raise UserError(f"{name}: its frames have several orientations (a localiser?); give one acquisition")
    rows, columns = orientations[0][:3], orientations[0][3:]
    normal = np.cross(rows, columns)
    heights = np.array(positions) @ normal
    check_heights(np.sort(heights), frames, name, "frames")
    steps = np.diff(heights)
    read = np.array(image.GetSpacing())
    if not ((steps > 0).all() or (steps < 0).all()):
        warn(
            f"{name}: its frames are stored out of slice order (in acquisition order?); they are put in order"
        )
        order = np.argsort(heights, kind="stable")
        image = _in_order(image, order)
        positions, steps = [positions[k] for k in order], np.diff(heights[order])
    step = float(np.median(steps))
    spacing = np.array([spacings[0][1], spacings[0][0], abs(step)])
    direction = np.column_stack([rows, columns, np.sign(step) * normal])
    origin = positions[0]
    if (
        np.allclose(image.GetSpacing(), spacing, rtol=_SPACING_TOLERANCE)
        and (np.abs(np.array(image.GetOrigin()) - origin) / spacing).max() < _ORIGIN_TOLERANCE
        and np.allclose(np.array(image.GetDirection()).reshape(3, 3), direction, atol=1e-3)
    ):
        return image
    if not np.allclose(read, spacing, rtol=_SPACING_TOLERANCE):
        warn(
            f"{name}: ITK read this multi-frame file's voxels as {' x '.join(f'{v:.3g}' for v in read)} mm; "
            f"its frames' positions give {' x '.join(f'{v:.3g}' for v in spacing)} mm, which are used"
        )
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(origin.tolist())
    image.SetDirection(direction.ravel().tolist())
    return image
