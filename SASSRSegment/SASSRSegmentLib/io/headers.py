"""What a DICOM or NIfTI header says that ITK's reading of the pixels does not check: where a series'
slices really lie, which modality the image is, and a NIfTI's second position (its sform)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..runtime.errors import UserError
from .files import PICTURE_FORMATS

MODALITY_TAG = "0008|0060"
_POSITION_TAG, _ORIENTATION_TAG = "0020|0032", "0020|0037"
_MODALITY_WORDS = {"MR": "MR", "CT": "CT", "US": "ultrasound", "PT": "PET", "NM": "nuclear medicine"}
_CROSS_SECTIONAL = ("MR", "CT", "PT", "NM")
# IPP values are written with a few decimals; a missing slice doubles a gap, a repeated one zeroes it.
_GAP_TOLERANCE = 0.1


def _numbers(text: str) -> np.ndarray:
    return np.array([float(v) for v in text.replace(" ", "").split("\\")])


def check_slice_positions(reader: sitk.ImageSeriesReader, name: str) -> None:
    """Refuse a series whose slices do not lie evenly along one normal. ITK stacks any series as evenly
    spaced with only a warning on stderr: a slice repeated (two echoes, a repeat scan in one series)
    squashed a test volume to half its height, and a missing one shifts every slice beyond it."""
    count = len(reader.GetFileNames())
    keys = (_POSITION_TAG, _ORIENTATION_TAG)
    if count < 2 or not all(reader.HasMetaDataKey(i, k) for i in range(count) for k in keys):
        return
    try:
        positions = np.array([_numbers(reader.GetMetaData(i, _POSITION_TAG)) for i in range(count)])
        orientations = np.array([_numbers(reader.GetMetaData(i, _ORIENTATION_TAG)) for i in range(count)])
    except ValueError:
        return  # a malformed tag: ITK's own reading is all there is
    if positions.shape[1] != 3 or orientations.shape[1] != 6:
        return
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        raise UserError(
            f"{name}: the series holds slices of several orientations (a localiser?); give one acquisition"
        )
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    check_heights(np.sort(positions @ normal), count, name)


def check_heights(heights: np.ndarray, count: int, name: str, what: str = "slices") -> None:
    """Refuse slices (sorted heights along their normal) that repeat a position or leave a gap."""
    gaps = np.diff(heights)
    step = float(np.median(gaps))
    repeated = int(np.count_nonzero(gaps < _GAP_TOLERANCE * max(step, 0.1)))
    if repeated:
        raise UserError(
            f"{name}: {repeated} of its {count} {what} {'lies' if repeated == 1 else 'lie'} where another "
            "slice lies (several echoes, time points or repeats in one series?); give one acquisition's slices"
        )
    worst = int(np.argmax(np.abs(gaps - step)))
    if abs(gaps[worst] - step) > _GAP_TOLERANCE * step:
        raise UserError(
            f"{name}: its {what} are {step:.3g} mm apart, but {gaps[worst]:.3g} mm apart between {what} "
            f"{worst + 1} and {worst + 2} (a slice missing?); read as evenly spaced, the volume would be "
            "distorted: give the complete series"
        )


# Pixel Spacing, Imager Pixel Spacing, Nominal Scanned Pixel Spacing: the sizes ITK may have read.
_SPACING_TAGS = ("0028|0030", "0018|1164", "0018|2010")


def unmeasured_pixels(image: sitk.Image, path: Path) -> str | None:
    """Why a 2D image's pixel size is not a measured one (so sizes in mm computed from it are not), or
    None: a picture format stores none (SimpleITK reads 1 mm, or a screen's dots per inch), and a DICOM
    image without Pixel Spacing (an ultrasound's calibration lies in its regions, which are not read)."""
    if path.suffix.lower() in PICTURE_FORMATS:
        return f"a {path.suffix[1:].upper()} file stores no measured pixel size"
    if modality(image) and not any(_read_as(image, tag) for tag in _SPACING_TAGS):
        return "this DICOM image states no pixel spacing that it was read with"
    return None


def _read_as(image: sitk.Image, tag: str) -> bool:
    """Whether the image's pixel size is the one DICOM element `tag` states (rows apart, columns apart)."""
    try:
        rows, columns = (float(v) for v in image.GetMetaData(tag).split("\\"))
    except (RuntimeError, ValueError):  # absent, or not two numbers
        return False
    return bool(np.allclose(image.GetSpacing()[:2], (columns, rows), rtol=1e-3))


def modality(image: sitk.Image) -> str | None:
    """The DICOM modality code (MR, CT, US, ...) the image was read with, if it came from DICOM."""
    if not image.HasMetaDataKey(MODALITY_TAG):
        return None
    return image.GetMetaData(MODALITY_TAG).strip().upper() or None


def _card_modality(card: dict) -> str | None:
    text = str(card.get("modality") or "").lower()
    if "ultrasound" in text:
        return "US"
    if re.search(r"\bmri?\b", text) or "magnetic resonance" in text:
        return "MR"
    if re.search(r"\bct\b", text) or "computed tomography" in text:
        return "CT"
    return None


def check_modality(image: sitk.Image, card: dict, dims: int) -> None:
    """Refuse a DICOM image of another modality than the model's (e.g. one MR slice given to the 2D
    ultrasound model, or an ultrasound cine given to the 3D MRI model: both ran without a word)."""
    found, wanted = modality(image), _card_modality(card)
    if found is None or wanted is None or found == wanted or found not in _MODALITY_WORDS:
        return
    hint = ""
    if dims == 2 and found in _CROSS_SECTIONAL:
        hint = " (one slice of a series? give the series' folder to segment the volume)"
    elif dims == 3 and found == "US":
        hint = " (a multi-frame cine? save the frame to segment as an image of its own)"
    raise UserError(
        f"the input is a DICOM {_MODALITY_WORDS[found]} image{hint}, but model {card.get('name', '?')!r} "
        f"segments {card.get('modality')}; choose a model for it with --model (see `models`)"
    )


def check_nifti_positions(image: sitk.Image, warn: Callable[[str], None]) -> None:
    """Warn when a NIfTI header's two positions (qform and sform) disagree. ITK, and so Slicer and this
    tool, place the image by one of them; FSL and nibabel-based viewers by the sform, where the mask,
    written with one position, would then sit apart from the scan."""
    keys = ("qform_code", "sform_code", "srow_x", "srow_y", "srow_z")
    if not all(image.HasMetaDataKey(k) for k in keys):
        return
    try:
        if int(image.GetMetaData("qform_code")) == 0 or int(image.GetMetaData("sform_code")) == 0:
            return
        sform = np.array([[float(v) for v in image.GetMetaData(f"srow_{a}").split()] for a in "xyz"])
    except ValueError:
        return
    if sform.shape != (3, 4):
        return
    dims = image.GetDimension()
    if dims < 3:
        return
    apart = 0.0
    for corner in itertools.product(*[(0, n - 1) for n in image.GetSize()[:3]]):
        ras = sform[:, :3] @ np.array(corner, dtype=float) + sform[:, 3]
        lps = np.array(image.TransformIndexToPhysicalPoint(list(corner) + [0] * (dims - 3)))[:3]
        apart = max(apart, float(np.linalg.norm(ras * [-1, -1, 1] - lps)))
    if apart > 0.5 * max(image.GetSpacing()[:3]):
        warn(
            f"its NIfTI header places it in two ways {apart:.0f} mm apart (qform and sform); it is read by "
            "the qform, as ITK and Slicer read it, and the mask is written there: in FSL or nibabel-based "
            "viewers, which use the sform, mask and scan will not overlay"
        )
