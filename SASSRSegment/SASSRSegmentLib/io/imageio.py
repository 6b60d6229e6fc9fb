"""Reading inputs (image files, DICOM series folders) and writing outputs atomically.

Every output is written to a hidden temporary file in its target folder and renamed into place, so a
crash, Ctrl-C or full disk never leaves a half-written file under the name the user asked for.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..runtime.errors import UserError
from . import headers
from .files import plain_permissions
from .multiframe import FRAMES_TAG, check_multiframe, join_files

# Longest first so that ".seg.nrrd" wins over ".nrrd" and ".nii.gz" over ".gz".
IMAGE_EXTENSIONS = (
    ".seg.nrrd",
    ".nii.gz",
    ".nrrd",
    ".nhdr",
    ".nii",
    ".mha",
    ".mhd",
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".bmp",
    ".dcm",
)
OUTPUT_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha", ".png")
TWO_D_ONLY = (".png",)


@dataclass(frozen=True)
class InputItem:
    """One image to segment: a file, or a DICOM series (a folder plus the series' id)."""

    path: Path
    series_id: str | None = None
    name: str = ""

    def __str__(self) -> str:
        return f"{self.path} (series {self.series_id})" if self.series_id else str(self.path)


def split_extension(path: str | os.PathLike) -> tuple[str, str]:
    """(stem, extension) of a file name, knowing the two-part extensions .nii.gz and .seg.nrrd."""
    name = Path(path).name
    lower = name.lower()
    for ext in IMAGE_EXTENSIONS + (".csv", ".json"):
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], lower[-len(ext) :]
    stem, ext = os.path.splitext(name)
    return stem, ext.lower()


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    # GDCM prints multi-line warnings on stderr for folders without DICOM; the caller reports instead.
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def dicom_series(folder: Path) -> list[str]:
    """The DICOM series ids found directly in `folder` (empty when there is none)."""
    with _quiet_itk():
        try:
            return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
        except RuntimeError as exc:  # a DICOM file GDCM cannot make sense of
            raise UserError(f"cannot read the DICOM files in {folder}: {_read_problem(exc)}") from None


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and split_extension(path)[1] in IMAGE_EXTENSIONS


def _items_for_dicom_folder(folder: Path, ids: list[str]) -> list[InputItem]:
    if len(ids) == 1:
        return [InputItem(folder, ids[0], folder.name)]
    items = []
    for k, sid in enumerate(sorted(ids)):
        label = _series_label(folder, sid) or f"series{k + 1}"
        if any(item.name == f"{folder.name}_{label}" for item in items):
            label = f"{label}_{k + 1}"
        items.append(InputItem(folder, sid, f"{folder.name}_{label}"))
    return items


def _series_label(folder: Path, series_id: str) -> str:
    """A series' number and description from its first file ("7_t2_flair_tra"), so that an exam's
    outputs say which series each is; "" when the header has neither. A series of one file (an
    ultrasound image or a radiograph each) is named by the file: eight images of one description had
    come out as Breast_US, Breast_US_2, ... in the order of their UIDs."""
    with _quiet_itk():
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id)
        if len(files) == 1 and _frames(files[0]) == 1:
            name = Path(files[0]).name
            name = name[: -len(".dcm")] if name.lower().endswith(".dcm") else name  # img.001 stays itself
            return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")[:60]
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            return ""
    parts = [
        reader.GetMetaData(tag).strip() for tag in ("0020|0011", "0008|103e") if reader.HasMetaDataKey(tag)
    ]
    return re.sub(r"[^A-Za-z0-9.-]+", "_", "_".join(p for p in parts if p)).strip("_")[:60]


def find_inputs(paths: list[str | os.PathLike]) -> tuple[list[InputItem], bool]:
    """Expand the command line's inputs into images; also says whether this is a batch.

    A file is one image. A folder holding a DICOM series is one image per series; any other folder is a
    batch of the image files in it and of its sub-folders that hold DICOM series (not deeper).
    """
    items: list[InputItem] = []
    batch = len(paths) > 1
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            items.append(InputItem(path, None, split_extension(path)[0]))
        elif path.is_dir():
            ids = dicom_series(path)
            if ids:
                found = _items_for_dicom_folder(path, ids)
                batch = batch or len(found) > 1
            else:
                batch = True
                found = []
                for child in sorted(path.iterdir()):
                    if _is_image_file(child) and split_extension(child)[1] != ".dcm":
                        found.append(InputItem(child, None, split_extension(child)[0]))
                    elif child.is_dir() and (child_ids := dicom_series(child)):
                        found.extend(_items_for_dicom_folder(child, child_ids))
                if not found:
                    raise UserError(
                        f"folder {path} holds no image SimpleITK reads (NRRD, NIfTI, MHA, PNG, JPEG, TIFF or "
                        "DICOM series); give image files or a folder of them"
                    )
            items.extend(found)
        else:
            raise UserError(f"input {path} does not exist")
    names = [item.name for item in items]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise UserError(
            f"several inputs share the name {dup[0]!r}; outputs would collide, rename or split them"
        )
    return items, batch


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    # ITK messages start with the source file and line; the useful part is at the end.
    if "): " in text:
        text = text.rsplit("): ", 1)[-1]
    return text[:200]


def read_image(
    item: InputItem | str | os.PathLike, warn: Callable[[str], None] = lambda m: None
) -> sitk.Image:
    """Read one image file or DICOM series; UserError (one line) when that is impossible or would be
    wrong (a series with missing or repeated slices); `warn` hears what the header questions."""
    if not isinstance(item, InputItem):
        path = Path(item)
        if path.is_dir():
            ids = dicom_series(path)
            if not ids:
                raise UserError(f"folder {path} holds no DICOM series")
            item = InputItem(path, ids[0], path.name)
        else:
            item = InputItem(path, None, split_extension(path)[0])
    try:
        if item.series_id is not None:
            return _read_series(item, warn)
        if not item.path.is_file():
            raise UserError(f"input {item.path} does not exist")
        if item.path.stat().st_size == 0:
            raise UserError(f"input {item.path} is empty (0 bytes)")
        image = read_file(item.path, warn)
    except RuntimeError as exc:
        image = _grey_and_alpha_png(item.path) if "Unknown PixelType" in str(exc) else None
        if image is None:
            raise UserError(f"cannot read {item}: {_read_problem(exc)}") from None
    if image.HasMetaDataKey(FRAMES_TAG):  # a multi-frame DICOM file: placed by its frames' positions
        return check_multiframe(image, item.path, str(item), warn)
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        # Its real part had been segmented, after numpy's warnings.
        raise UserError(f"input {item} holds complex values (raw MRI data?): save its magnitude image")
    dims = image.GetDimension()
    direction = np.asarray(image.GetDirection()).reshape(dims, dims)
    if not np.allclose(direction @ direction.T, np.eye(dims), atol=1e-3):
        # A NIfTI so made is refused by ITK itself; a MetaImage or NRRD is read, and the network saw its
        # voxels as square.
        raise UserError(f"cannot read {item}: {_SHEARED}")
    return image


def read_file(path: Path, warn: Callable[[str], None] = lambda m: None) -> sitk.Image:
    """ITK's reading of one image file, a NIfTI checked against its own header: before, for data cut
    short (ITK reads what is missing as zeros), after, for the position ITK placed it by. Also the
    reading of a dataset's cases, whose caches and scores had been made of such zeros."""
    nifti = headers.read_nifti_header(path) if headers.is_nifti(path) else None
    if nifti is not None:
        headers.check_nifti_complete(path, nifti)
    with _quiet_itk():
        image = sitk.ReadImage(str(path))
    if nifti is not None:
        headers.check_nifti_positions(image, path, nifti, warn)
    return image


def _read_series(item: InputItem, warn: Callable[[str], None]) -> sitk.Image:
    # ITK's complaint about uneven slices goes to stderr only; check_slice_positions says it in words.
    with _quiet_itk():
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(item.path), item.series_id)
        if len(files) == 1:  # one (multi-frame) file; the series reader would add a fourth axis to it
            return check_multiframe(sitk.ReadImage(files[0]), Path(files[0]), str(item), warn)
        # Multi-frame files, which the series reader would stack along a fourth axis; the ends only, as a
        # classic series' headers are hundreds (one frame may sort first, or last).
        if _frames(files[0]) > 1 or _frames(files[-1]) > 1:
            return join_files([Path(f) for f in files], str(item))
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()
        image = reader.Execute()
    headers.check_slice_positions(reader, str(item))
    if reader.HasMetaDataKey(0, headers.MODALITY_TAG):
        image.SetMetaData(headers.MODALITY_TAG, reader.GetMetaData(0, headers.MODALITY_TAG))
    return image


def _frames(path: str) -> int:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return int(reader.GetMetaData(FRAMES_TAG)) if reader.HasMetaDataKey(FRAMES_TAG) else 1


def _grey_and_alpha_png(path: Path) -> sitk.Image | None:
    """A PNG of grey + transparency (LA), which SimpleITK cannot read, as the two-component image Slicer
    makes of it (its grey is then segmented); None for anything else. Spacing 1, as SimpleITK reads PNGs."""
    from PIL import Image

    try:
        with Image.open(path) as png:
            if png.format != "PNG" or png.mode != "LA":
                return None
            array = np.asarray(png)
    except OSError:
        return None
    return sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=True)


_SHEARED = (
    "its orientation is sheared or scaled, not a rotation (a gantry-tilted CT converted to NIfTI?), which ITK "
    "cannot place; resample it onto a regular grid first"
)


def _read_problem(exc: RuntimeError) -> str:
    """What went wrong in reading, in words (ITK's messages name its own source files)."""
    text = str(exc)
    if "Unable to determine ImageIO reader" in text:
        return (
            "it is not an image in a format this tool reads (NRRD, NIfTI, MetaImage, PNG, JPEG, TIFF, BMP, "
            "DICOM); was it renamed, or is it another kind of file?"
        )
    if "Unknown PixelType" in text:
        # SimpleITK maps no pixel type to a PNG of grey + transparency (2 components).
        return (
            "its pixel type is one this tool cannot read (a greyscale PNG with transparency?); save it as plain "
            "greyscale or RGB"
        )
    if "orthonormal" in text:
        return _SHEARED
    if "spacing" in text.lower() and ("zero" in text.lower() or "negative" in text.lower()):
        return "its header gives a voxel size of zero or below (a degenerate orientation); fix the header"
    return "the file is truncated or corrupt (its header names more data than the file holds, or bad data)"


def check_output_path(
    path: str | os.PathLike, overwrite: bool, kinds: tuple[str, ...] = OUTPUT_EXTENSIONS
) -> Path:
    """Validate an output file name before any work: known extension, writable folder, no clobbering."""
    path = Path(path)
    ext = split_extension(path)[1]
    if ext not in kinds:
        raise UserError(
            f"output {path}: unknown extension {ext or '(none)'!r}; use one of {', '.join(kinds)}"
        )
    if path.is_dir():
        raise UserError(f"output {path} is a folder; give a file name ending in {ext}")
    if path.exists() and not overwrite:
        raise UserError(f"output {path} already exists; pass --overwrite to replace it")
    ensure_writable_folder(path.parent)
    return path


def ensure_writable_folder(folder: str | os.PathLike) -> Path:
    """Prove `folder` can be written (permissions alone lie for root and read-only mounts): it, or the
    nearest folder above it that exists, takes a file. Missing folders are created when an output is
    written into them (`Staging`), so a run that fails first leaves no empty folders behind."""
    folder = Path(folder) if str(folder) else Path(".")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "a file is in the way")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to folder {folder}: {exc.strerror or exc}") from None
    return folder


class Staging:
    """Outputs that appear together or not at all.

    Each output is written to a temporary file next to its target; `commit()` renames them all into
    place (with Ctrl-C and SIGTERM held back for those few renames). Whatever was not committed (an
    error, a cancel) is deleted on leaving the `with` block, so an input leaves all of its outputs or
    none, and a file that --overwrite would replace stays as it was until the commit.
    """

    def __init__(self, overwrite: bool):
        self.overwrite = overwrite
        self._staged: list[tuple[Path, Path]] = []
        self._created: list[Path] = []  # folders made for outputs, removed again if nothing lands there
        self._lock = threading.Lock()  # a discard from another thread waits for a commit in progress

    def path(self, path: str | os.PathLike) -> Path:
        """The temporary file to write for `path` (same folder and extension; missing folders are made)."""
        path = Path(path)
        if path.exists() and not self.overwrite:
            raise UserError(f"output {path} already exists; pass --overwrite to replace it")
        missing = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot write to folder {path.parent}: {exc.strerror or exc}") from None
        self._created += missing
        stem, ext = split_extension(path)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".partial{ext}", dir=path.parent)
        os.close(fd)
        self._staged.append((Path(tmp_name), path))
        return Path(tmp_name)

    def commit(self) -> list[Path]:
        """Move every staged file into place; returns the outputs."""
        with self._lock, _signals_held():
            for tmp, path in self._staged:
                os.chmod(tmp, plain_permissions())
                os.replace(tmp, path)
            done, self._staged, self._created = [path for _, path in self._staged], [], []
        return done

    def discard(self) -> None:
        """Delete whatever is staged and not committed, and the folders made for it."""
        with self._lock:
            for tmp, _ in self._staged:
                tmp.unlink(missing_ok=True)
            for folder in sorted(self._created, key=lambda f: len(f.parts), reverse=True):
                with contextlib.suppress(OSError):
                    folder.rmdir()
            self._staged, self._created = [], []

    def __enter__(self) -> Staging:
        with _LIVE_LOCK:
            _LIVE.add(self)
        return self

    def __exit__(self, *exc) -> None:
        self.discard()
        with _LIVE_LOCK:
            _LIVE.discard(self)


_LIVE: set[Staging] = set()
_LIVE_LOCK = threading.Lock()


def discard_pending() -> None:
    """Discard every open staging: a cancel that cannot wait for the command to unwind (it is inside one
    long library call) leaves nothing behind all the same."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for staging in live:
        staging.discard()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    block = getattr(signal, "pthread_sigmask", None)  # POSIX; elsewhere the renames just run
    held = {signal.SIGINT, signal.SIGTERM}
    if block is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    block(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        block(signal.SIG_UNBLOCK, held)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary path next to `path` (same extension); rename it to `path` on success only."""
    with Staging(overwrite) as staging:
        yield staging.path(path)
        staging.commit()


# Segment colours in label order: the first is the lesion red of the figure; more lesions cycle.
_SEGMENT_COLOURS = (
    "0.9 0.2 0.2",
    "0.2 0.6 0.9",
    "0.95 0.75 0.1",
    "0.3 0.8 0.3",
    "0.7 0.4 0.9",
    "0.95 0.5 0.2",
)


def _segmentation_metadata(image: sitk.Image, names: Sequence[str]) -> dict[str, str]:
    """The NRRD keys that make Slicer load a label map as a segmentation: label value k is the segment
    names[k - 1]."""
    extent = " ".join(f"0 {n - 1}" for n in image.GetSize())
    if image.GetDimension() == 2:
        extent += " 0 0"
    keys = {
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
    }
    for k, name in enumerate(names):
        keys |= {
            f"Segment{k}_ID": name.lower().replace(" ", "_"),
            f"Segment{k}_Name": name,
            f"Segment{k}_LabelValue": str(k + 1),
            f"Segment{k}_Layer": "0",
            f"Segment{k}_Color": _SEGMENT_COLOURS[k % len(_SEGMENT_COLOURS)],
            f"Segment{k}_Extent": extent,
            f"Segment{k}_Tags": "Segmentation.Status:completed|",
        }
    return keys


def write_image(
    image: sitk.Image,
    path: str | os.PathLike,
    overwrite: bool = False,
    staging: Staging | None = None,
    segment_names: Sequence[str] = ("lesion",),
) -> Path:
    """Write atomically (or into `staging`, for its commit); the format follows the extension.
    `.seg.nrrd` gets Slicer segment metadata: label value k is the segment `segment_names[k - 1]`."""
    path = Path(path)
    ext = split_extension(path)[1]
    if ext in TWO_D_ONLY and image.GetDimension() == 3 and image.GetSize()[2] > 1:
        raise UserError(
            f"output {path}: PNG holds 2D images only; use .nrrd, .seg.nrrd, .nii.gz or .mha for 3D"
        )
    if ext == ".seg.nrrd":
        # SimpleITK's copy keeps its source's metadata only until its own is first set: the mask's
        # provenance had been dropped from every .seg.nrrd.
        metadata = {key: image.GetMetaData(key) for key in image.GetMetaDataKeys()}
        metadata.update(_segmentation_metadata(image, segment_names))
        image = sitk.Image(image)
        for key, value in metadata.items():
            image.SetMetaData(key, value)
    with _target(path, overwrite, staging) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), ext not in TWO_D_ONLY)
        except RuntimeError as exc:
            raise UserError(f"cannot write {path}: {_one_line(exc)}") from None
    return path


def write_text(
    text: str, path: str | os.PathLike, overwrite: bool = False, staging: Staging | None = None
) -> Path:
    """Write a text file atomically (or into `staging`, for its commit)."""
    path = Path(path)
    with _target(path, overwrite, staging) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


@contextlib.contextmanager
def _target(path: Path, overwrite: bool, staging: Staging | None) -> Iterator[Path]:
    if staging is None:
        with atomic_path(path, overwrite) as tmp:
            yield tmp
    else:
        yield staging.path(path)
