"""The input side of segmentation: which images a model takes, and how an input (or its ROI) is brought
to the model's working grid with whole-image intensity levels, checked, and described for the pipeline."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..data import normalization
from ..io import geometry, headers
from ..io.geometry import Grid
from ..runtime import hostmemory
from ..runtime.errors import UserError
from . import noise, padding, pixels
from .memory import (
    LARGE_WINDOW_EXTRA_BYTES,
    choose_window,
    default_overlap,
    estimate_bytes,
    trained_window,
    window_invariant,
)

CONTEXT_LR_VOXELS = 8
# Working voxels of background kept around the tissue's box (see support_box).
SUPPORT_MARGIN_LR = 8


def _single_slice(image: sitk.Image) -> bool:
    return image.GetDimension() == 3 and image.GetSize()[2] == 1


def effective_dims(image: sitk.Image) -> int:
    """2 for 2D images and single-slice volumes (how Slicer holds a 2D image; also one slice stored
    across x or y, which `check_image` explains), else 3; a UserError for input that is neither (a time
    series, 5D)."""
    image = drop_singleton_4th(image)
    if image.GetDimension() > 3:
        raise UserError(f"the input is {image.GetDimension()}D; only 2D images and 3D volumes are supported")
    return 2 if image.GetDimension() == 2 or 1 in image.GetSize() else image.GetDimension()


def drop_singleton_4th(image: sitk.Image) -> sitk.Image:
    if image.GetDimension() != 4:
        return image
    if image.GetSize()[3] != 1:
        raise UserError(
            f"the input is 4D, a time series of {image.GetSize()[3]} volumes of {tuple(image.GetSize()[:3])}, which is "
            "not supported: extract the one 3D volume to segment (in Slicer: Sequences module, or "
            "SimpleITK's Extract) and pass that"
        )
    array = sitk.GetArrayFromImage(image)[0]
    out = sitk.GetImageFromArray(array, isVector=image.GetNumberOfComponentsPerPixel() > 1)
    direction = np.asarray(image.GetDirection()).reshape(4, 4)[:3, :3]
    return Grid(
        tuple(image.GetSize()[:3]),
        tuple(image.GetSpacing()[:3]),
        tuple(image.GetOrigin()[:3]),
        tuple(direction.ravel()),
    ).apply(out)


def check_image(image: sitk.Image, card: dict, warn: Callable[[str], None] = lambda m: None) -> sitk.Image:
    """The image in a form the model takes (squeezed, channel-matched), or a UserError saying why not."""
    dims = effective_dims(image)
    headers.check_modality(image, card, dims)
    image = drop_singleton_4th(image)
    model_dims = int(card["preprocessing"]["spatial_dims"])
    size = image.GetSize()
    if dims == model_dims == 2 and len(size) == 3 and size[2] != 1:
        # One slice stored across x or y (a (1, H, W) array saved as a volume): which of its axes is the
        # image's width is not known, and the model is not blind to it.
        raise UserError(
            f"the input is one slice stored across its {'xy'[size.index(1)]} axis (size {tuple(size)}); "
            f"model {card.get('name', '?')!r} takes a 2D image, or a slice stored as (width, height, 1): "
            "save it that way"
        )
    frames = headers.modality(image) in ("US", "XA", "RF") or image.GetNumberOfComponentsPerPixel() in (3, 4)
    if dims == 3 and model_dims == 2 and frames:
        # Frames in time, or pictures stacked, not slices: "choose a 3D model" had sent an ultrasound cine
        # to the brain MRI model.
        raise UserError(
            f"the input is a stack of {size[2]} frames (a cine, or images read as one volume?) but model "
            f"{card.get('name', '?')!r} takes one image: give the frame to segment (e.g. saved as PNG)"
        )
    if dims != model_dims:
        what = "a 2D image" if dims == 2 else "a 3D volume"
        raise UserError(
            f"the input is {what} but model {card.get('name', '?')!r} is a {model_dims}D model; "
            f"choose a {dims}D model with --model (see `models`)"
        )
    if any(n == 0 for n in size):
        raise UserError(f"the input is empty (size {tuple(size)})")
    if model_dims == 2:
        _warn_turned_picture(image, warn)
    _check_voxel_size(image, card)
    _warn_two_valued(image, warn)
    image = pixels.match_channels(pixels.no_data_as_lowest(image, warn), card, warn)
    kind = card["preprocessing"]["normalization"].get("kind")
    if kind == "uint8":
        image = pixels.in_8_bit_range(image, warn)
    elif kind == "mri":
        image = padding.padding_as_background(image, warn)
    return image


# Voxels this many times finer than a model's working spacing are no scan it can read: a header in metres
# or microns read as mm (0.002 mm voxels took 7.8 GB to an empty mask; 1e-6 mm a traceback past memory).
FINEST_FACTOR = 20


def _check_voxel_size(image: sitk.Image, card: dict) -> None:
    working = card["preprocessing"].get("lr_spacing")
    if not working or image.GetDimension() != len(working):
        return
    spacing = image.GetSpacing()
    fine = [i for i, s in enumerate(spacing) if s * FINEST_FACTOR < min(working)]
    if fine:
        axis = fine[0]
        raise UserError(
            f"the input's voxels are {spacing[axis]:.3g} mm along axis {'xyz'[axis]}, far finer than the "
            f"{min(working):g} mm model {card.get('name', '?')!r} works at: check the header's units (metres or "
            "microns read as mm?) and spacing"
        )


def _warn_two_valued(image: sitk.Image, warn: Callable[[str], None]) -> None:
    """A mask or label map given as the image: a brain label map came out as "0 lesions", a BUSI mask as
    40,914 lesion pixels, both without a word."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        return
    array = sitk.GetArrayViewFromImage(image)
    low, high = array.min(), array.max()
    if low != high and np.all((array == low) | (array == high)):
        warn(
            f"the image holds two values only ({float(low):g} and {float(high):g}): a mask or label map given "
            "as the image? Its mask means nothing"
        )


def _warn_turned_picture(image: sitk.Image, warn: Callable[[str], None]) -> None:
    """A 2D image whose header flips or swaps its axes is segmented as its pixels are stored, top row at
    the top, as every training image was: a picture's header is less sure than its pixels (a 2D array
    written to NIfTI by nibabel with an identity affine reads as flipped in x and y, its pixels upright),
    and the model must see the transducer at the top (docs/models.md). The user is told, because a
    viewer that follows the header shows the picture turned from what the model saw."""
    d = image.GetDimension()
    plane = np.asarray(image.GetDirection()).reshape(d, d)[:2, :2]
    upright = [np.eye(2)]
    if image.HasMetaDataKey("qform_code"):  # read from NIfTI, whose identity affine is this in LPS
        upright.append(-np.eye(2))
    if any(np.allclose(plane, u, atol=1e-3) for u in upright):
        return
    turned = (
        "flips or swaps its axes"
        if np.allclose(np.abs(plane), np.round(np.abs(plane)), atol=1e-3)
        else "turns it"
    )
    warn(
        f"the image's header {turned} (direction {tuple(round(float(v), 3) for v in plane.ravel())}); the model "
        "sees its pixels as stored, first row at the top: if a program that ignores the header (an image "
        "editor) shows the transducer elsewhere than at the top, the mask is less accurate; store it upright"
    )


@dataclass(frozen=True)
class _Plane:
    """A single-slice volume seen as a 2D image: the 2D proxy has origin 0 and identity direction, so a
    proxy point p maps to origin + D @ (p_x, p_y, 0) of the volume."""

    volume: Grid

    def proxy(self, image: sitk.Image) -> sitk.Image:
        vector = image.GetNumberOfComponentsPerPixel() > 1
        out = sitk.GetImageFromArray(sitk.GetArrayFromImage(image)[0], isVector=vector)
        out.SetSpacing(self.volume.spacing[:2])
        return out

    def lift_grid(self, grid: Grid) -> Grid:
        origin = np.asarray(self.volume.origin) + self.volume.matrix @ np.array([*grid.origin, 0.0])
        return Grid(
            (*grid.size, 1),
            (*grid.spacing, self.volume.spacing[2]),
            tuple(float(v) for v in origin),
            self.volume.direction,
        )

    def lift(self, image: sitk.Image) -> sitk.Image:
        array = sitk.GetArrayFromImage(image)[np.newaxis]
        return self.lift_grid(Grid.from_image(image)).image_from_array(array)


def _with_context(grid: Grid, start: list[int], size: list[int], prep: dict) -> tuple[list[int], list[int]]:
    """The ROI's index region widened by CONTEXT_LR_VOXELS working voxels a side (within the image).

    The network then sees lesions cut by the ROI's faces with their surroundings, and interpolation at
    the faces uses real neighbours instead of extrapolating the edge voxels.
    """
    work_spacing = np.asarray(geometry.working_lr_grid(grid.sub_grid(start, size), prep).spacing)
    margin = np.ceil(CONTEXT_LR_VOXELS * work_spacing / np.asarray(grid.spacing) - 1e-6).astype(int)
    lo = np.maximum(np.asarray(start) - margin, 0)
    hi = np.minimum(np.asarray(start) + np.asarray(size) + margin, grid.size)
    return lo.tolist(), (hi - lo).tolist()


@dataclass
class PreparedInput:
    input_grid: Grid  # the grid the network input is made from (ROI plus context; 2D proxy of a slice)
    output_grid: Grid
    hr_work: Grid
    lr: object  # torch.Tensor (C, *spatial) of normalised LR intensities; None for a constant image
    window: tuple[int, ...]
    overlap: float  # between the windows, when there are several
    plane: _Plane | None
    tissue_ml: float | None = None  # tissue volume the normalisation traced (MRI kind), for plausibility
    # The LR index box (array order) that holds the tissue, with SUPPORT_MARGIN_LR voxels of context;
    # None: predict everywhere. Outside it the normalised input is background (0) and no lesion can be.
    support: tuple[slice, ...] | None = None
    # The input's own axis order (`geometry.orientation`) where the network saw it reordered to the
    # card's; None where it saw it as stored. The outputs go back to it.
    stored_as: str | None = None


def _channels(image: sitk.Image) -> list[sitk.Image]:
    components = image.GetNumberOfComponentsPerPixel()
    return (
        [image] if components == 1 else [sitk.VectorIndexSelectionCast(image, c) for c in range(components)]
    )


def to_working_grid(channel: sitk.Image, work: Grid) -> np.ndarray:
    """One channel on the working LR grid, as a float32 array.

    Where the input's voxels tile the working voxels exactly (a 1 mm scan for a 2 mm model), they are
    block-averaged, which is how an LR voxel integrates what it covers and how training made its inputs;
    otherwise the input is resampled linearly, smoothed first along axes where it is finer.
    """
    factors = geometry.block_factors(Grid.from_image(channel), work)
    if factors is None:
        return sitk.GetArrayFromImage(geometry.resample(channel, work, "linear", True))
    return geometry.block_average_onto(sitk.GetArrayFromImage(channel).astype(np.float32), factors, work)


def _whole_image_levels(image: sitk.Image, prep: dict) -> list | None:
    """Each channel's (normalisation levels, noise) measured on the whole image (None: the kind needs
    none); where the noise has a channel smoothed (`noise.py`), the smoothed channel's levels.

    An ROI is normalised with these, so a crop's intensities, and whether it is smoothed, are exactly
    the whole scan's."""
    if prep["normalization"].get("kind") != "mri":
        return None
    if _single_slice(image):
        image = _Plane(Grid.from_image(image)).proxy(image)
    work = geometry.working_lr_grid(Grid.from_image(image), prep)
    measured = []
    for channel in _channels(image):
        working = to_working_grid(channel, work)
        levels, values, traced = normalization.fit_and_normalize(working)
        amount = noise.relative_noise(values, traced)
        if amount > noise.NOISE_LIMIT:
            levels = normalization.fit(noise.smoothed(working))
        measured.append((levels, amount))
    return measured


def _in_model_order(image: sitk.Image, prep: dict) -> tuple[sitk.Image, str | None]:
    """(the image in the card's axis order, the order it is stored in; None where that is the card's).
    A single slice, whatever axis it lies across, never gets here with a 3D card (`check_image`)."""
    oriented = geometry.reorient(image, prep.get("orientation"))
    return oriented, (None if oriented is image else geometry.orientation(image))


def prepare_input(
    image: sitk.Image,
    card: dict,
    roi: list[float] | None,
    output_grid: str,
    batch_size: int,
    memory_limit: int | None,
    warn: Callable[[str], None],
    probabilities: str = "float32",
    overlap: float | None = None,
) -> PreparedInput:
    """The input on the model's working grid, its window and overlap (None: the model's default)."""
    import torch

    from ..model.network import encoder_stride

    prep = card["preprocessing"]
    scale = int(prep["scale"])
    image, stored_as = _in_model_order(check_image(image, card, warn), prep)
    full = Grid.from_image(image)
    start, size = [0] * full.dims, list(full.size)
    levels = None
    if roi:
        start, size = geometry.roi_region(full, list(roi))
        context_start, context_size = _with_context(full, start, size, prep)
        levels = _whole_image_levels(image, prep)
        image = sitk.RegionOfInterest(image, context_size, context_start)
        start = [a - b for a, b in zip(start, context_start)]
    plane = None
    if _single_slice(image):
        plane = _Plane(Grid.from_image(image))
        image = plane.proxy(image)
        start, size = start[:2], size[:2]
    array = sitk.GetArrayViewFromImage(image)
    target = Grid.from_image(image).sub_grid(start, size)  # the input voxels to segment (all, or the ROI's)
    out_grid = geometry.hr_grid(target, scale) if output_grid == "hr" else target
    image = _scan_in_frame(image, array, prep)
    input_grid = Grid.from_image(image)
    work_lr = geometry.working_lr_grid(input_grid, prep)
    hr_work = geometry.hr_grid(work_lr, scale)
    limit = memory_limit if memory_limit is not None else hostmemory.available_bytes()

    def bytes_for(window: tuple[int, ...]) -> int:
        hr = tuple(w * scale for w in window)
        return estimate_bytes(
            input_grid, out_grid, hr_work, hr, card, batch_size, probabilities, bool(stored_as)
        )

    overlap = default_overlap(card) if overlap is None else overlap
    # Windows are in array order (z, y, x), like the tensor.
    spatial = tuple(work_lr.size[::-1])
    budget = min(limit, bytes_for(trained_window(card, spatial)) + LARGE_WINDOW_EXTRA_BYTES)
    window = choose_window(card, spatial, overlap, lambda w: bytes_for(w) <= budget)
    need = bytes_for(window)
    if need > limit:
        raise UserError(
            f"this image needs about {need / 2**30:.1f} GB at {scale}x resolution but only {limit / 2**30:.1f} GB "
            "is available; segment a region with --roi xmin xmax ymin ymax zmin zmax (RAS mm) or use "
            "--output-grid input"
        )
    if float(array.min()) == float(array.max()):
        warn(
            "--roi covers one value only (background?): the mask is empty"
            if roi
            else "the input image is constant (no contrast): the mask is empty"
        )
        return PreparedInput(input_grid, out_grid, hr_work, None, window, overlap, plane, stored_as=stored_as)
    channels, tissue, anywhere = _normalised_channels(image, work_lr, prep["normalization"], levels, warn)
    tissue_ml = None if tissue is None else float(tissue.sum()) * math.prod(work_lr.spacing) / 1000.0
    _check_input(input_grid, work_lr, tissue_ml, card, warn, stored_as)
    # Only a window-invariant network gets a box: an instance-normalised one runs on its training
    # patches, which a box smaller than them would shrink.
    stride = encoder_stride(card["network"]["features"])
    support = support_box(anywhere, align=stride) if window_invariant(card) else None
    lr = torch.from_numpy(np.stack(channels))
    return PreparedInput(
        input_grid, out_grid, hr_work, lr, window, overlap, plane, tissue_ml, support, stored_as
    )


# An 8-bit 2D image whose scan fills less than this share of its width or height is framed in black (a
# screen capture, a scanner's export): its working grid covers the scan only, framed as the training
# images are. Pixels up to CONTENT_LEVEL (pixels.py) are the frame: digital black, give or take compression (at 8,
# BUSI images darkened by a gamma of 1.6 lost dark tissue to the "frame", 0.747 -> 0.736). Bright
# pieces under CONTENT_PIECE of the image (text, marks in the frame) are not the scan.
CONTENT_SHARE = 0.9
CONTENT_PIECE = 0.01
# A frame of another grey (white, mid-grey, the image's mean: padding to a size) fills at least this
# share of the image's edge with one value. No training image has one, so any width of it is left out:
# 2 white pixels around BUSI images cost 0.057, an eighth of their size 0.24.
FRAME_EDGE_SHARE = 0.5


def _frame_value(array: np.ndarray) -> float:
    """The value of a constant frame around the image (its edge's commonest value where that fills
    FRAME_EDGE_SHARE of the edge), else 0: black, a scan's own dark surround."""
    edge = np.concatenate([array[0], array[-1], array[1:-1, 0], array[1:-1, -1]])
    values, counts = np.unique(edge, return_counts=True)
    k = int(np.argmax(counts))
    return float(values[k]) if counts[k] >= FRAME_EDGE_SHARE * edge.size else 0.0


def content_box(array: np.ndarray) -> tuple[list[int], list[int]] | None:
    """Index start and size (x, y) of the scan inside the frame of an 8-bit 2D image; None when there
    is no frame (a black one narrower than 1 - CONTENT_SHARE of both sides, or none) or nothing in it."""
    frame = _frame_value(array)
    scan = np.abs(array.astype(np.float32) - np.float32(frame)) > pixels.CONTENT_LEVEL
    pieces = sitk.ConnectedComponent(sitk.GetImageFromArray(scan.astype(np.uint8)), True)
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.ComputePerimeterOff()
    shape.Execute(pieces)
    boxes = [
        shape.GetBoundingBox(label)
        for label in shape.GetLabels()
        if shape.GetNumberOfPixels(label) >= CONTENT_PIECE * array.size
    ]
    if not boxes:
        return None
    start = np.min([b[:2] for b in boxes], axis=0)
    stop = np.max([np.add(b[:2], b[2:]) for b in boxes], axis=0)
    share = CONTENT_SHARE if frame <= pixels.CONTENT_LEVEL else 1.0
    if np.all(stop - start >= share * np.asarray(array.shape[::-1])):
        return None
    return start.tolist(), (stop - start).tolist()


def _scan_in_frame(image: sitk.Image, array: np.ndarray, prep: dict) -> sitk.Image:
    """What the network sees of the input: the scan inside its frame (`content_box`) for a model
    that sees whole 8-bit 2D images, else all of it. The output grid stays the whole input's."""
    if not prep.get("lr_longer_side") or prep["normalization"].get("kind") != "uint8" or array.ndim != 2:
        return image
    box = content_box(array)
    return image if box is None else sitk.RegionOfInterest(image, box[1], box[0])


def _normalised_channels(
    image: sitk.Image, work_lr: Grid, spec: dict, levels: list | None, warn: Callable[[str], None]
) -> tuple:
    """(each channel normalised on the working grid, the first channel's tissue, the union of every
    channel's tissue); the tissue masks are None for kinds that trace none (8-bit, CT). A channel noisier
    than clean scans are (`noise.relative_noise`) is smoothed on the working grid first, with a warning."""
    channels, tissue, anywhere = [], None, None
    for c, channel in enumerate(_channels(image)):
        working = to_working_grid(channel, work_lr)
        values = traced = None
        if levels:  # an ROI: the whole scan's levels and noise
            level, amount = levels[c]
        else:
            level = None
            values, traced = normalization.normalize_and_trace(working, spec)
            amount = noise.relative_noise(values, traced)
        if amount > noise.NOISE_LIMIT:
            warn(
                f"the scan is noisy (noise about {100 * amount:.0f} % of its tissue's range, more than the model's "
                f"training scans showed): it is smoothed by {noise.SMOOTHING_VOXELS:g} voxel before segmenting"
            )
            working, values = noise.smoothed(working), None
        if values is None:
            values, traced = normalization.normalize_and_trace(working, spec, level)
        channels.append(values)
        tissue = traced if tissue is None else tissue
        # Where any channel has tissue, the network has input to see (a channel that traces none has no
        # contrast and normalises to zeros).
        if traced is not None:
            anywhere = traced if anywhere is None else anywhere | traced
    return channels, tissue, anywhere


def support_box(
    tissue: np.ndarray | None, margin: int | None = None, align: int = 1
) -> tuple[slice, ...] | None:
    """The index box of the `tissue` voxels widened by `margin` (SUPPORT_MARGIN_LR by default) within the
    array, each face moved out so that its distance from the array's face on that side is a multiple of
    `align`; None when there is no tissue mask (8-bit, CT) or the box is the whole array.

    A skull-stripped brain fills a third of its volume's box: the network runs on the tissue's box only.
    Outside the tissue the input is 0 and no lesion can be; the margin keeps the box's faces, where the
    network pads, away from the tissue (the network sees further than the margin, so the probabilities
    near the tissue's edge move slightly: Dice 0.998 on the shipped sample). Faces a multiple of the
    network's stride from the array's keep its pooling grid where the whole volume's is, from either end
    (a flipped test-time pass pads and pools from the far end; a U-Net is not shift-invariant).
    """
    if tissue is None or not tissue.any():
        return None
    margin = SUPPORT_MARGIN_LR if margin is None else margin
    box = []
    for axis, n in enumerate(tissue.shape):
        present = np.flatnonzero(tissue.any(axis=tuple(a for a in range(tissue.ndim) if a != axis)))
        start = max(int(present[0]) - margin, 0) // align * align
        stop = n - (n - min(int(present[-1]) + 1 + margin, n)) // align * align
        box.append(slice(start, stop))
    if all(b.start == 0 and b.stop == n for b, n in zip(box, tissue.shape)):
        return None
    return tuple(box)


# An input axis this much coarser than the model's working spacing loses what lies between its samples.
COARSE_FACTOR = 1.5


def _check_input(
    grid: Grid,
    work: Grid,
    tissue_ml: float | None,
    card: dict,
    warn: Callable[[str], None],
    stored_as: str | None = None,
) -> None:
    """One-line warnings for inputs unlike the model's training images: much coarser sampling (thick
    slices), or more tissue than any training image held (e.g. a head that is not skull-stripped).
    Axes are named as the input stores them (`stored_as`: the order it was reordered from)."""
    spacing = geometry.reoriented_spacing(grid.spacing, grid.direction, stored_as)
    working = geometry.reoriented_spacing(work.spacing, work.direction, stored_as)
    coarse = [(i, s / w) for i, (s, w) in enumerate(zip(spacing, working)) if s / w > COARSE_FACTOR]
    if coarse and len(spacing) == 2 and math.isclose(spacing[0], spacing[1], rel_tol=1e-3):
        # Pixels carry no physical size a user chose (1 mm for a PNG): the image is small, not coarse.
        warn(
            f"the image is {max(grid.size)} px on its longer side, fewer than the {max(work.size)} the model "
            "works at: it is enlarged, so expect a less accurate mask; a crop tight around a lesion also "
            "hides the tissue around it (give the whole image, and --roi for a region)"
        )
    elif coarse:
        axis, factor = max(coarse, key=lambda c: c[1])
        warn(
            f"the input's voxels are {spacing[axis]:g} mm along axis {'xyz'[axis]}, {factor:.1f}x the model's "
            f"{working[axis]:g} mm: what lies between its slices is interpolated, so expect a less accurate mask"
        )
    checks = card.get("plausibility", {})
    limit = checks.get("max_tissue_ml")
    if limit is not None and tissue_ml is not None and tissue_ml > float(limit):
        warn(
            f"the image holds {tissue_ml:.0f} mL of tissue, more than any training image ({float(limit):.0f} mL)"
            + (f": {checks['tissue_hint']}" if checks.get("tissue_hint") else "")
        )
