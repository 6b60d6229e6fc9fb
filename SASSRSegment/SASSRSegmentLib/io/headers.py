"""What a DICOM or NIfTI header says that ITK's reading of the pixels does not check: where a series'
slices really lie, which modality the image is, and a NIfTI's second position (its sform)."""

from __future__ import annotations

import gzip
import itertools
import math
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
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


NIFTI_SUFFIXES = (".nii", ".nii.gz")
_GZIP_MAGIC = b"\x1f\x8b"


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


@dataclass(frozen=True)
class NiftiHeader:
    """The few NIfTI-1 header fields ITK's metadata lacks or garbles (it keeps qfac in an entry that
    prints as no number, and pixdim[0] as 0)."""

    gzipped: bool
    data_bytes: int  # vox_offset + the voxels' bytes: what a whole file holds at least
    qfac: float


def read_nifti_header(path: Path) -> NiftiHeader | None:
    """The header of a NIfTI-1 file (gzipped or not, whatever its name says); None for NIfTI-2, a file
    that cannot be opened or is not NIfTI: ITK has its own say on those."""
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == _GZIP_MAGIC
        with (gzip.open if gzipped else open)(path, "rb") as stream:
            header = stream.read(348)
        order = next(o for o in "<>" if struct.unpack_from(o + "i", header)[0] == 348)
        dims = struct.unpack_from(order + "8h", header, 40)
        bitpix = struct.unpack_from(order + "h", header, 72)[0]
        qfac = struct.unpack_from(order + "f", header, 76)[0]
        offset = struct.unpack_from(order + "f", header, 108)[0]
    except (OSError, EOFError, StopIteration, struct.error, ValueError):
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0 or any(n < 0 for n in dims[1 : dims[0] + 1]):
        return None
    data_bytes = int(offset) + math.prod(dims[1 : dims[0] + 1]) * bitpix // 8
    return NiftiHeader(gzipped, data_bytes, -1.0 if qfac < 0 else 1.0)


def check_nifti_complete(path: Path, header: NiftiHeader) -> None:
    """Refuse a NIfTI file holding fewer bytes than its header names: ITK reads the missing voxels as
    zeros without a word (a file cut in half by a copy lost the lesion in its second half). A gzip
    stream whose size trailer says otherwise is decompressed to count them, which also finds one that
    ends early (a cut file's last four bytes are arbitrary)."""
    if not header.gzipped:
        held = path.stat().st_size
    elif _gzip_trailer_size(path) == header.data_bytes % 2**32:
        return
    else:
        held = 0
        try:
            with gzip.open(path, "rb") as stream:
                while held < header.data_bytes:
                    chunk = stream.read(1 << 22)
                    if not chunk:
                        break
                    held += len(chunk)
        except (EOFError, zlib.error, gzip.BadGzipFile):
            held = 0
    if held < header.data_bytes:
        raise UserError(
            f"input {path} is truncated or corrupt: it holds less image data than its header names (a copy "
            "cut short?)"
        )


def _gzip_trailer_size(path: Path) -> int:
    """The uncompressed size (mod 2^32) a whole gzip file's last four bytes state."""
    with open(path, "rb") as raw:
        raw.seek(-4, 2)
        return int.from_bytes(raw.read(4), "little")


def _nifti_form(image: sitk.Image, name: str, qfac: float) -> np.ndarray | None:
    """A NIfTI header's qform or sform as the 3 x 4 matrix from voxel index to RAS mm; None where its code
    is 0 or ITK's metadata lacks it."""
    try:
        if int(image.GetMetaData(f"{name}_code")) == 0:
            return None
        if name == "sform":
            form = np.array([[float(v) for v in image.GetMetaData(f"srow_{a}").split()] for a in "xyz"])
            return form if form.shape == (3, 4) else None
        b, c, d = (float(image.GetMetaData(f"quatern_{k}")) for k in "bcd")
        offset = [float(image.GetMetaData(f"qoffset_{k}")) for k in "xyz"]
        spacing = [float(image.GetMetaData(f"pixdim[{k}]")) for k in (1, 2, 3)]
    except (RuntimeError, ValueError):
        return None
    a = math.sqrt(max(0.0, 1.0 - b * b - c * c - d * d))
    rotation = np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ]
    )
    scale = np.array([spacing[0], spacing[1], spacing[2] * qfac])
    return np.column_stack([rotation * scale, offset])


def _apart(image: sitk.Image, form: np.ndarray) -> float:
    """How far (mm) a NIfTI form places the image's corners from where ITK read them."""
    dims = image.GetDimension()
    apart = 0.0
    for corner in itertools.product(*[(0, n - 1) for n in image.GetSize()[:3]]):
        ras = form[:, :3] @ np.array(corner, dtype=float) + form[:, 3]
        lps = np.array(image.TransformIndexToPhysicalPoint(list(corner) + [0] * (dims - 3)))[:3]
        apart = max(apart, float(np.linalg.norm(ras * [-1, -1, 1] - lps)))
    return apart


def check_nifti_positions(
    image: sitk.Image, path: Path, header: NiftiHeader, warn: Callable[[str], None]
) -> None:
    """Refuse a NIfTI image that ITK placed by neither of its header's positions (qform, sform), and warn
    when the two disagree. ITK (and so Slicer and this tool) reads the sform where its code is 1 and the
    qform otherwise, and takes the voxel size from pixdim whatever the sform says: an sform of 2 mm
    voxels over pixdim's 1 mm was read as 1 mm (the lesion's volume 8 times too small)."""
    if image.GetDimension() < 3:
        return
    forms = {name: _nifti_form(image, name, header.qfac) for name in ("qform", "sform")}
    forms = {name: form for name, form in forms.items() if form is not None}
    if not forms:
        return
    tolerance = 0.5 * max(image.GetSpacing()[:3])
    apart = {name: _apart(image, form) for name, form in forms.items()}
    used = [name for name, mm in apart.items() if mm <= tolerance]
    if not used:
        said = ", ".join(
            f"its {name}'s {' x '.join(f'{v:.3g}' for v in np.linalg.norm(form[:, :3], axis=0))} mm"
            for name, form in forms.items()
        )
        raise UserError(
            f"input {path} has a NIfTI header that disagrees with itself on its voxels: pixdim says "
            f"{' x '.join(f'{v:.3g}' for v in image.GetSpacing()[:3])} mm, {said}; fix the header (one "
            "position, or the same voxel size in both)"
        )
    if len(used) < len(forms):
        other = next(name for name in forms if name not in used)
        warn(
            f"its NIfTI header places it in two ways {apart[other]:.0f} mm apart (qform and sform); it is read "
            f"by the {used[0]}, as ITK and Slicer read it, and the mask is written there: a viewer that places "
            f"the scan by its {other} shows mask and scan apart"
        )
