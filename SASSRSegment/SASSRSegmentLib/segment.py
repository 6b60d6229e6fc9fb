"""The `segment` command: LR images in, lesion masks at `scale` times finer resolution out.

Pipeline per image: checks -> (ROI crop) -> working LR grid of the model card -> antialiased resampling
-> normalisation -> sliding-window HR probabilities on the HR working grid -> linear resampling onto
the output grid (the input's HR grid, or the input grid) -> threshold -> atomic write. The HR output
covers exactly the physical extent of its input, so it overlays it in any viewer.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import geometry, imageio, lesions, normalization, provenance
from .errors import UserError
from .geometry import Grid
from .progress import Progress

# The command line runs this command in a worker thread: a cancel then takes effect within a second at
# every stage (see cli.run_command).
RUNS_IN_WORKER = True
SAMPLE_NAME = "brats_2013_pat0005_1_flair_2mm.nrrd"
MASK_SUFFIX, PROB_SUFFIX, SR_SUFFIX = "_mask", "_probabilities", "_sr"
# Bytes per voxel held at the peak. Output grid: the uint8 mask image and, while small components are
# dropped, the kept array and its image; probabilities twice (numpy, image) when kept, as float32 or as
# 8-bit, with the uint32 component labels of the lesion table that needs them. When the output grid is not the HR working
# grid, the working grid's float32 probabilities are resampled: one float32 array there and two on the
# output grid. The slab being blended: window depth x HR plane, float32, three copies. The input as
# float32 while it is resampled. Network activations: about _ACTIVATION_COPIES float32 maps of the first
# width per HR window voxel.
_BYTES_MASK, _BYTES_LABELS, _BYTES_IN = 3, 4, 8
_BYTES_PROBABILITIES = {"none": 0, "uint8": 2, "float32": 8}
PROBABILITY_KINDS = tuple(_BYTES_PROBABILITIES)
_BYTES_RESAMPLED_WORK, _BYTES_RESAMPLED_OUT, _BYTES_SLAB = 4, 8, 12
_ACTIVATION_COPIES = 10
CONTEXT_LR_VOXELS = 8


def samples_dir() -> Path:
    from .bundle import MODELS_DIR

    return MODELS_DIR.parent / "Samples"


# ------------------------------------------------------------------------------------- input checks


def _single_slice(image: sitk.Image) -> bool:
    return image.GetDimension() == 3 and image.GetSize()[2] == 1


def effective_dims(image: sitk.Image) -> int:
    """2 for 2D images and single-slice volumes (how Slicer holds a 2D image), else 3; a UserError for
    input that is neither (a time series, 5D)."""
    image = _drop_singleton_4th(image)
    if image.GetDimension() > 3:
        raise UserError(f"the input is {image.GetDimension()}D; only 2D images and 3D volumes are supported")
    return 2 if image.GetDimension() == 2 or _single_slice(image) else image.GetDimension()


def _drop_singleton_4th(image: sitk.Image) -> sitk.Image:
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


def _match_channels(image: sitk.Image, in_channels: int) -> sitk.Image:
    components = image.GetNumberOfComponentsPerPixel()
    if components == in_channels:
        return image
    if in_channels == 1 and components in (3, 4):
        # Greyscale saved as RGB(A) is common for ultrasound screenshots: accept it when R = G = B.
        rgb = sitk.GetArrayViewFromImage(image)[..., :3]
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return sitk.VectorIndexSelectionCast(image, 0)
        raise UserError(
            f"the input is a colour image ({components} components) but the model takes greyscale; convert it to "
            "greyscale first"
        )
    raise UserError(
        f"the input has {components} component(s) per voxel but the model takes {in_channels} channel(s); "
        "choose a matching model with --model"
    )


def check_image(image: sitk.Image, card: dict) -> sitk.Image:
    """The image in a form the model takes (squeezed, channel-matched), or a UserError saying why not."""
    dims = effective_dims(image)
    image = _drop_singleton_4th(image)
    model_dims = int(card["preprocessing"]["spatial_dims"])
    if dims != model_dims:
        what = "a 2D image" if dims == 2 else "a 3D volume"
        raise UserError(
            f"the input is {what} but model {card.get('name', '?')!r} is a {model_dims}D model; "
            f"choose a {dims}D model with --model (see `models`)"
        )
    if any(n == 0 for n in image.GetSize()):
        raise UserError(f"the input is empty (size {tuple(image.GetSize())})")
    return _match_channels(image, int(card["network"].get("in_channels", 1)))


# ------------------------------------------------------------------------- single-slice volumes


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


# ---------------------------------------------------------------------------------- the core


def same_grid(a: Grid, b: Grid) -> bool:
    """Equal up to float rounding in the headers (origins within 1e-4 voxel)."""
    return (
        a.size == b.size
        and np.allclose(a.spacing, b.spacing, rtol=1e-6)
        and np.allclose(a.origin, b.origin, atol=1e-4 * min(a.spacing))
        and np.allclose(a.direction, b.direction, atol=1e-6)
    )


def estimate_bytes(
    input_grid: Grid,
    output_grid: Grid,
    hr_work: Grid,
    window_hr: tuple[int, ...],
    card: dict,
    batch: int,
    probabilities: str = "float32",
) -> int:
    """Peak memory of one image's segmentation (an estimate that errs high)."""
    width = int(card["network"]["features"][0])
    per_output = (
        _BYTES_MASK + _BYTES_PROBABILITIES[probabilities] + (_BYTES_LABELS if probabilities != "none" else 0)
    )
    work = 0
    if not same_grid(hr_work, output_grid):
        per_output += _BYTES_RESAMPLED_OUT
        work = _BYTES_RESAMPLED_WORK * math.prod(hr_work.size)
    slab = _BYTES_SLAB * window_hr[0] * math.prod(hr_work.size[::-1][1:])
    return int(
        work
        + slab
        + per_output * math.prod(output_grid.size)
        + _BYTES_IN * math.prod(input_grid.size)
        + _ACTIVATION_COPIES * 4 * width * math.prod(window_hr) * batch
    )


def available_memory_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _sub_grid(grid: Grid, start: list[int], size: list[int]) -> Grid:
    origin = grid.index_to_physical(start)
    return Grid(tuple(int(n) for n in size), grid.spacing, tuple(float(v) for v in origin), grid.direction)


def _with_context(grid: Grid, start: list[int], size: list[int], prep: dict) -> tuple[list[int], list[int]]:
    """The ROI's index region widened by CONTEXT_LR_VOXELS working voxels a side (within the image).

    The network then sees lesions cut by the ROI's faces with their surroundings, and interpolation at
    the faces uses real neighbours instead of extrapolating the edge voxels.
    """
    work_spacing = np.asarray(geometry.working_lr_grid(_sub_grid(grid, start, size), prep).spacing)
    margin = np.ceil(CONTEXT_LR_VOXELS * work_spacing / np.asarray(grid.spacing) - 1e-6).astype(int)
    lo = np.maximum(np.asarray(start) - margin, 0)
    hi = np.minimum(np.asarray(start) + np.asarray(size) + margin, grid.size)
    return lo.tolist(), (hi - lo).tolist()


@dataclass
class _Prepared:
    input_grid: Grid  # the grid the network input is made from (ROI plus context; 2D proxy of a slice)
    output_grid: Grid
    hr_work: Grid
    lr: object  # torch.Tensor (C, *spatial) of normalised LR intensities; None for a constant image
    window: tuple[int, ...]
    plane: _Plane | None
    tissue_ml: float | None = None  # tissue volume the normalisation traced (MRI kind), for plausibility


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
    """Each channel's normalisation levels measured on the whole image (None: the kind needs none).

    An ROI is normalised with these, so a crop's intensities are exactly the whole scan's."""
    if prep["normalization"].get("kind") != "mri":
        return None
    if _single_slice(image):
        image = _Plane(Grid.from_image(image)).proxy(image)
    work = geometry.working_lr_grid(Grid.from_image(image), prep)
    return [normalization.fit(to_working_grid(ch, work)) for ch in _channels(image)]


def _prepare(
    image: sitk.Image,
    card: dict,
    roi: list[float] | None,
    output_grid: str,
    batch_size: int,
    memory_limit: int | None,
    warn: Callable[[str], None],
    probabilities: str = "float32",
) -> _Prepared:
    import torch

    prep = card["preprocessing"]
    scale = int(prep["scale"])
    image = check_image(image, card)
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
    finite = np.isfinite(array)
    if not finite.all():
        raise UserError(
            f"the input has {array.size - int(finite.sum())} NaN or infinite voxel(s); replace them (e.g. with 0) "
            "before segmenting"
        )
    input_grid = Grid.from_image(image)
    target = _sub_grid(input_grid, start, size)  # the input voxels to segment (all, or those the ROI touches)
    out_grid = geometry.hr_grid(target, scale) if output_grid == "hr" else target
    work_lr = geometry.working_lr_grid(input_grid, prep)
    hr_work = geometry.hr_grid(work_lr, scale)
    # The card's window is in array order (z, y, x), like the tensor; clipped to the image.
    window = tuple(min(int(w), n) for w, n in zip(prep["patch_size_lr"], work_lr.size[::-1]))
    window_hr = tuple(w * scale for w in window)
    need = estimate_bytes(input_grid, out_grid, hr_work, window_hr, card, batch_size, probabilities)
    limit = memory_limit if memory_limit is not None else available_memory_bytes()
    if need > limit:
        raise UserError(
            f"this image needs about {need / 2**30:.1f} GB at {scale}x resolution but only {limit / 2**30:.1f} GB "
            "is available; segment a region with --roi xmin xmax ymin ymax zmin zmax (RAS mm) or use "
            "--output-grid input"
        )
    if float(array.min()) == float(array.max()):
        warn("the input image is constant (no contrast): the mask is empty")
        return _Prepared(input_grid, out_grid, hr_work, None, window, plane)
    spec = prep["normalization"]
    channels, tissue = [], None
    for c, channel in enumerate(_channels(image)):
        values, traced = normalization.normalize_and_trace(
            to_working_grid(channel, work_lr), spec, levels[c] if levels else None
        )
        channels.append(values)
        tissue = traced if tissue is None else tissue
    tissue_ml = None if tissue is None else float(tissue.sum()) * math.prod(work_lr.spacing) / 1000.0
    _check_input(input_grid, work_lr, tissue_ml, card, warn)
    return _Prepared(
        input_grid, out_grid, hr_work, torch.from_numpy(np.stack(channels)), window, plane, tissue_ml
    )


def _to_output(array: np.ndarray, prepared: _Prepared) -> sitk.Image:
    """An HR-working-grid array on the output grid (resampled linearly unless the grids coincide;
    smoothed first along axes where the output is coarser, e.g. for --output-grid input)."""
    image = prepared.hr_work.image_from_array(array)
    if not same_grid(prepared.hr_work, prepared.output_grid):
        image = geometry.resample(image, prepared.output_grid, "linear", antialias=True)
    return image


def _lift(image: sitk.Image, prepared: _Prepared) -> sitk.Image:
    return prepared.plane.lift(image) if prepared.plane is not None else image


def tta_axes(card: dict) -> list[int] | None:
    """The axes (array order) the model saw flipped in training; None when the card does not say.

    Flipping any other axis at test time shows the model images unlike its training data (an
    upside-down ultrasound image), which lowers accuracy instead of raising it.
    """
    axes = card.get("training", {}).get("config", {}).get("flip_axes")
    return None if axes is None else [int(a) for a in axes]


def segment_image(
    image: sitk.Image,
    net,
    card: dict,
    device=None,
    tta: bool = False,
    threshold: float | None = None,
    roi: list[float] | None = None,
    output_grid: str = "hr",
    overlap: float = 0.5,
    batch_size: int = 1,
    memory_limit: int | None = None,
    progress: Callable[[str, float], None] | None = None,
    warn: Callable[[str], None] | None = None,
    probabilities: str = "float32",
) -> tuple[sitk.Image, sitk.Image | None]:
    """(uint8 mask, probabilities), both on the output grid: `hr_grid(input, scale)` (or of the ROI's
    input voxels), or the input grid with output_grid="input".

    probabilities: "float32" (values 0..1), "uint8" (round(255 p): a quarter of the memory, enough for
    the lesion table's mean probabilities) or "none" (the second result is None). Unless float32 ones
    are asked for, on the HR grid the mask is thresholded slab by slab from the exact probabilities, so
    memory holds a few bytes per HR voxel (what makes very large volumes fit).
    roi: (xmin, xmax, ymin, ymax[, zmin, zmax]) in RAS mm; the input voxels it touches are segmented.
    progress(stage, fraction) is called as work proceeds; warn(message) for non-fatal problems.
    """
    if probabilities not in PROBABILITY_KINDS:
        raise ValueError(f"probabilities must be one of {PROBABILITY_KINDS}, got {probabilities!r}")
    from .inference import sliding_window_predict

    threshold = card_threshold(card, threshold)
    report = progress or (lambda stage, fraction: None)
    report("preprocess", 0.0)
    prepared = _prepare(
        image, card, roi, output_grid, batch_size, memory_limit, warn or (lambda m: None), probabilities
    )
    report("preprocess", 1.0)
    predict = partial(
        sliding_window_predict,
        net,
        prepared.lr,
        prepared.window,
        int(card["preprocessing"]["scale"]),
        overlap=overlap,
        batch_size=batch_size,
        device=device,
        tta=tta,
        tta_axes=tta_axes(card),
        progress=lambda f: report("predict", f),
    )
    if prepared.lr is not None and same_grid(prepared.hr_work, prepared.output_grid):
        mask, probs = _predict_streamed(predict, prepared.hr_work, threshold, probabilities)
    else:
        if prepared.lr is None:
            probs = prepared.output_grid.reference_image(sitk.sitkFloat32)
        else:
            hr = predict()
            report("resample", 0.0)
            probs = _to_output(hr.numpy(), prepared)
            del hr
        mask = sitk.Cast(probs >= threshold, sitk.sitkUInt8)
        probs = _as_kind(probs, probabilities)
    prepared.lr = predict = None  # the LR input is not needed after prediction
    mask = lesions.drop_small_components(
        mask, float(card.get("postprocess", {}).get("min_component_fraction", 0))
    )
    _check_plausible(mask, prepared, card, warn or (lambda m: None))
    report("resample", 1.0)
    return _lift(mask, prepared), (None if probs is None else _lift(probs, prepared))


# An input axis this much coarser than the model's working spacing loses what lies between its samples.
COARSE_FACTOR = 1.5


def _check_input(
    grid: Grid, work: Grid, tissue_ml: float | None, card: dict, warn: Callable[[str], None]
) -> None:
    """One-line warnings for inputs unlike the model's training images: much coarser sampling (thick
    slices), or more tissue than any training image held (e.g. a head that is not skull-stripped)."""
    coarse = [(i, s / w) for i, (s, w) in enumerate(zip(grid.spacing, work.spacing)) if s / w > COARSE_FACTOR]
    if coarse:
        axis, factor = max(coarse, key=lambda c: c[1])
        warn(
            f"the input's voxels are {grid.spacing[axis]:g} mm along axis {'xyz'[axis]}, {factor:.1f}x the model's "
            f"{work.spacing[axis]:g} mm: what lies between its slices is interpolated, so expect a less accurate mask"
        )
    checks = card.get("plausibility", {})
    limit = checks.get("max_tissue_ml")
    if limit is not None and tissue_ml is not None and tissue_ml > float(limit):
        warn(
            f"the image holds {tissue_ml:.0f} mL of tissue, more than any training image ({float(limit):.0f} mL)"
            + (f": {checks['tissue_hint']}" if checks.get("tissue_hint") else "")
        )


def _check_plausible(mask: sitk.Image, prepared: _Prepared, card: dict, warn: Callable[[str], None]) -> None:
    """Warn when the mask covers more of the tissue than any lesion the model was trained on: the
    input is then most likely unlike its training data (contrast, resolution, a different organ)."""
    limit = card.get("plausibility", {}).get("max_tissue_fraction")
    if limit is None or not prepared.tissue_ml:
        return
    lesion_ml = np.count_nonzero(sitk.GetArrayViewFromImage(mask)) * math.prod(mask.GetSpacing()) / 1000.0
    if lesion_ml > float(limit) * prepared.tissue_ml:
        warn(
            f"the mask covers {100 * lesion_ml / prepared.tissue_ml:.0f} % of the tissue ({lesion_ml:.0f} mL), "
            f"more than any lesion in the model's training data ({100 * float(limit):.0f} %): the image may be "
            "unlike what the model was trained on (contrast, resolution or organ); check the result"
        )


def _as_kind(probabilities: sitk.Image, kind: str) -> sitk.Image | None:
    if kind == "none":
        return None
    if kind == "uint8":
        return to_8_bit(probabilities, 255.0)
    return probabilities


def _predict_streamed(
    predict: Callable, grid: Grid, threshold: float, probabilities: str
) -> tuple[sitk.Image, sitk.Image | None]:
    """Threshold each finished slab as it arrives: the HR volume is never held as float32 unless
    float32 probabilities are asked for."""
    import torch

    shape = grid.size[::-1]
    arrays = {"mask": np.empty(shape, np.uint8)}
    if probabilities != "none":
        arrays["probabilities"] = np.empty(shape, np.dtype(probabilities))

    def sink(first_row: int, block) -> None:
        rows = slice(first_row, first_row + block.shape[1])
        arrays["mask"][rows] = (block[0] >= threshold).numpy()
        if probabilities == "float32":
            arrays["probabilities"][rows] = block[0].numpy()
        elif probabilities == "uint8":
            arrays["probabilities"][rows] = (block[0] * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).numpy()

    predict(sink=sink)
    # Each array is released as soon as its image copy exists.
    mask = grid.image_from_array(arrays.pop("mask"))
    return mask, (grid.image_from_array(arrays.pop("probabilities")) if len(arrays) else None)


def super_resolve_image(
    image: sitk.Image,
    net,
    card: dict,
    device=None,
    tta: bool = False,
    roi: list[float] | None = None,
    output_grid: str = "hr",
    overlap: float = 0.5,
    memory_limit: int | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> sitk.Image:
    """The network's HR image (its image-SR decoder) on the same output grid as `segment_image`.

    Intensities are the normalised ones the network works in (z-score for MRI, [0, 1] for 8-bit and CT).
    """
    if getattr(net, "sr_decoder", None) is None:
        raise UserError(
            f"model {card.get('name', '?')!r} has no image-SR decoder (image_sr=false); drop --sr-image"
        )
    from .inference import sliding_window_predict

    report = progress or (lambda stage, fraction: None)
    prepared = _prepare(image, card, roi, output_grid, 1, memory_limit, lambda m: None)
    scale = int(card["preprocessing"]["scale"])
    if prepared.lr is None:
        # A constant image normalises to zeros everywhere: so is its super-resolved version.
        return _lift(prepared.output_grid.reference_image(sitk.sitkFloat32), prepared)
    device = device or next(net.parameters()).device
    hr = sliding_window_predict(
        net,
        prepared.lr,
        prepared.window,
        scale,
        overlap=overlap,
        batch_size=1,
        device=device,
        tta=tta,
        tta_axes=tta_axes(card),
        progress=lambda f: report("super-resolve", f),
        output="image",
    ).numpy()
    if hr.shape[0] == 1:
        out = _to_output(hr[0], prepared)
    else:
        out = sitk.Compose([_to_output(c, prepared) for c in hr])
    return _lift(out, prepared)


# ---------------------------------------------------------------------------------- the command


def add_prediction_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `segment` and `evaluate` share; `check_prediction_arguments` checks them."""
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument(
        "--tta",
        action="store_true",
        help="average over the axis flips the model was trained with (up to 2^d times slower)",
    )
    parser.add_argument("--threshold", type=float, help="probability threshold (default: the model card's)")
    parser.add_argument(
        "--face-connected",
        action="store_true",
        help="lesions connect through faces only (default: also diagonals)",
    )


def check_prediction_arguments(args: argparse.Namespace) -> None:
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise UserError(f"--threshold must lie between 0 and 1, got {args.threshold}")


def card_threshold(card: dict, threshold: float | None = None) -> float:
    """`threshold` when given, else the model card's (0.5 when it has none)."""
    return float(card.get("threshold", 0.5) if threshold is None else threshold)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs", nargs="*", metavar="INPUT", help="image files, DICOM series folders or folders of images"
    )
    parser.add_argument(
        "-o", "--output", help="output file (one input) or folder (several inputs, a folder, --demo)"
    )
    parser.add_argument(
        "--model",
        help="bundled model name or bundle folder (default: the bundled model for the input's dims)",
    )
    add_prediction_arguments(parser)
    parser.add_argument(
        "--roi",
        nargs="+",
        type=float,
        metavar="MM",
        help="segment only this box: xmin xmax ymin ymax [zmin zmax] in RAS mm",
    )
    parser.add_argument(
        "--output-grid",
        choices=("hr", "input"),
        default="hr",
        help="hr: scale x finer than the input (default); input: the input grid",
    )
    parser.add_argument(
        "--probabilities", metavar="PATH", help="also write the lesion probabilities (a folder for batches)"
    )
    parser.add_argument(
        "--sr-image", metavar="PATH", help="also write the super-resolved image (a folder for batches)"
    )
    parser.add_argument(
        "--lesion-table",
        metavar="PATH",
        help="write the connected lesions to .csv or .json (one table for batches)",
    )
    parser.add_argument(
        "--figure", metavar="PATH", help="write a PNG overlay of the HR mask outline on the input (one input)"
    )
    parser.add_argument(
        "--format", choices=imageio.OUTPUT_EXTENSIONS, help="output extension when -o is a folder"
    )
    parser.add_argument(
        "--overlap", type=float, default=0.5, help="sliding-window overlap, 0 to 0.9 (default 0.5)"
    )
    parser.add_argument(
        "--batch-size", type=int, help="windows per network call (default 1 on CPU, 4 on GPU)"
    )
    parser.add_argument(
        "--memory-limit", type=float, metavar="GB", help="memory budget (default: the available RAM)"
    )
    parser.add_argument(
        "--progress", choices=("bar", "json", "quiet"), default="bar", help="json: one JSON object per line"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--quiet", action="store_true", help="print only warnings and errors")
    parser.add_argument(
        "--demo",
        action="store_true",
        help=f"segment the bundled sample {SAMPLE_NAME} into -o (default demo-output)",
    )


@dataclass
class _Job:
    item: imageio.InputItem
    mask: Path
    probabilities: Path | None = None
    sr_image: Path | None = None


def _default_extension(item: imageio.InputItem, fmt: str | None) -> str:
    if fmt:
        return fmt
    ext = imageio.split_extension(item.path)[1] if item.series_id is None else ""
    if ext in imageio.OUTPUT_EXTENSIONS:
        return ext
    return ".png" if ext in (".jpg", ".jpeg", ".bmp", ".tif", ".tiff") else ".nrrd"


def _is_folder_target(path: str) -> bool:
    return Path(path).is_dir() or path.endswith(("/", "\\")) or imageio.split_extension(path)[1] == ""


def _plan(args: argparse.Namespace, items: list[imageio.InputItem], batch: bool) -> list[_Job]:
    """Every output path, checked (extension, writable folder, no clobbering) before any work starts."""
    if not args.output:
        raise UserError("give the output with -o (a file for one input, a folder for several)")
    if batch and not _is_folder_target(args.output):
        raise UserError(f"several inputs: -o must be a folder, not {args.output}")
    extras = {"probabilities": PROB_SUFFIX, "sr_image": SR_SUFFIX}
    if batch:
        for key in extras:
            value = getattr(args, key)
            if value and not _is_folder_target(value):
                raise UserError(f"several inputs: --{key.replace('_', '-')} must be a folder, not {value}")
        if args.figure:
            raise UserError("--figure draws one input; segment that input on its own")
    jobs = []
    for item in items:
        ext = _default_extension(item, args.format)
        if _is_folder_target(args.output):
            mask = Path(args.output) / f"{item.name}{MASK_SUFFIX}{ext}"
        else:
            mask = Path(args.output)
        job = _Job(item, imageio.check_output_path(mask, args.overwrite))
        for key, suffix in extras.items():
            value = getattr(args, key)
            if value:
                path = Path(value) / f"{item.name}{suffix}{ext}" if batch else Path(value)
                setattr(job, key, imageio.check_output_path(path, args.overwrite))
        jobs.append(job)
    outputs = [p for j in jobs for p in (j.mask, j.probabilities, j.sr_image) if p is not None]
    for path, kinds in ((args.lesion_table, (".csv", ".json")), (args.figure, (".png",))):
        if path:
            outputs.append(imageio.check_output_path(path, args.overwrite, kinds))
    resolved = [p.resolve() for p in outputs]
    if len(set(resolved)) != len(resolved):
        raise UserError("two outputs would be written to the same file; give distinct output names")
    inputs = {j.item.path.resolve() for j in jobs}
    if clash := inputs & set(resolved):
        raise UserError(f"an output would replace its input {sorted(clash)[0]}; choose another output name")
    return jobs


def _demo(args: argparse.Namespace) -> None:
    """Point the arguments at the bundled sample, the bundled 3D model and files in the -o folder."""
    from .bundle import MODELS_DIR, bundled_models, read_card

    if args.inputs:
        raise UserError("--demo takes no inputs")
    sample = samples_dir() / SAMPLE_NAME
    missing = []
    if not sample.is_file():
        missing.append(f"the sample image {sample}")
    if args.model is None and not any(
        read_card(f)["preprocessing"].get("spatial_dims") == 3 for f in bundled_models().values()
    ):
        missing.append(f"a bundled 3D model in {MODELS_DIR}")
    if missing:
        raise UserError(
            f"--demo needs {' and '.join(missing)}, which this installation lacks; reinstall the extension"
        )
    folder = Path(args.output or "demo-output")
    stem = imageio.split_extension(sample)[0]
    args.inputs = [str(sample)]
    args.output = str(folder / f"{stem}{MASK_SUFFIX}.seg.nrrd")
    args.lesion_table = args.lesion_table or str(folder / f"{stem}_lesions.csv")
    args.figure = args.figure or str(folder / f"{stem}_figure.png")


def to_8_bit(image: sitk.Image, factor: float) -> sitk.Image:
    """round(factor * value), clamped to 0..255, as uint8 (8-bit probabilities, PNG outputs)."""
    return sitk.Cast(sitk.Clamp(image * factor + 0.5, sitk.sitkFloat32, 0.0, 255.0), sitk.sitkUInt8)


def _check_args(args: argparse.Namespace) -> None:
    check_prediction_arguments(args)
    if not 0.0 <= args.overlap <= 0.9:
        raise UserError(f"--overlap must lie between 0 and 0.9, got {args.overlap}")
    if args.roi is not None and len(args.roi) not in (4, 6):
        raise UserError(
            "--roi needs xmin xmax ymin ymax (2D) or xmin xmax ymin ymax zmin zmax (3D), in RAS mm"
        )
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if args.memory_limit is not None and args.memory_limit <= 0:
        raise UserError("--memory-limit must be a positive number of GB")
    if args.lesion_table:
        lesions.check_table_path(args.lesion_table)


class _Models:
    """Loads each needed model once (the default model depends on the input's dimensionality)."""

    def __init__(self, name: str | None, device):
        self.name, self.device, self._cache = name, device, {}

    def get(self, spatial_dims: int | None):
        from .bundle import load_bundle

        key = None if self.name else spatial_dims
        if key not in self._cache:
            self._cache[key] = load_bundle(self.name, self.device, spatial_dims=spatial_dims)
        return self._cache[key]


class _Session:
    """What every input of one `segment` call shares: arguments, device, models, progress."""

    def __init__(self, args: argparse.Namespace, batch: bool):
        from .devices import describe, select_device

        self.args, self.batch = args, batch
        self.mode = "quiet" if args.quiet and args.progress == "bar" else args.progress
        self.progress = Progress(self.mode)
        self.device = select_device(args.device)
        self.models = _Models(args.model, self.device)
        if args.model:
            self.models.get(None)  # a broken --model fails now, not once per input
        self.progress.log(f"device: {describe(self.device)}")
        self.batch_size = args.batch_size or (1 if self.device.type == "cpu" else 4)
        self.memory_limit = int(args.memory_limit * 2**30) if args.memory_limit else None

    def warn(self, message: str) -> None:
        if self.mode == "json":
            self.progress.log(f"warning: {message}")
        else:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def _check_formats(self, job: _Job, image: sitk.Image, card: dict, net) -> None:
        if effective_dims(image) == 3:
            for path in (job.mask, job.probabilities, job.sr_image):
                if path and imageio.split_extension(path)[1] in imageio.TWO_D_ONLY:
                    raise UserError(
                        f"output {path}: PNG holds 2D images only; use .nrrd, .seg.nrrd or .nii.gz"
                    )
        if job.sr_image:
            if getattr(net, "sr_decoder", None) is None:
                raise UserError(f"model {card.get('name', '?')!r} has no image-SR decoder; drop --sr-image")
            kind = card["preprocessing"]["normalization"].get("kind")
            if imageio.split_extension(job.sr_image)[1] == ".png" and kind != "uint8":
                raise UserError(
                    "--sr-image: PNG holds 8-bit intensities only; use .nrrd or .nii.gz for this model"
                )

    def _write_float(self, image: sitk.Image, path: Path, staging: imageio.Staging) -> None:
        # PNG stores 8 bits: probabilities and 8-bit intensities in [0, 1] become 0..255.
        is_png = imageio.split_extension(path)[1] == ".png"
        imageio.write_image(to_8_bit(image, 255.0) if is_png else image, path, self.args.overwrite, staging)

    def segment(self, job: _Job, where: str, staging: imageio.Staging) -> tuple[list[dict], dict]:
        """Segment one input and stage its outputs; returns its lesion rows and the table's metadata."""
        args = self.args

        def report(stage: str, fraction: float) -> None:
            self.progress.update(stage, fraction, where)

        report("read", 0.0)
        image = imageio.read_image(job.item)
        card, net = self.models.get(effective_dims(image))
        warnings: list[str] = []
        self._check_formats(job, image, card, net)
        common = dict(
            roi=args.roi, output_grid=args.output_grid, overlap=args.overlap, memory_limit=self.memory_limit
        )
        mask, probabilities = segment_image(
            image,
            net,
            card,
            self.device,
            tta=args.tta,
            threshold=args.threshold,
            batch_size=self.batch_size,
            progress=report,
            warn=lambda m: (warnings.append(m), self.warn(f"{job.item.name}: {m}" if self.batch else m)),
            # The table's mean probabilities need 8-bit ones only; without either, memory stays at a
            # few bytes per HR voxel.
            probabilities="float32" if job.probabilities else ("uint8" if args.lesion_table else "none"),
            **common,
        )
        sr = None
        if job.sr_image:
            sr = super_resolve_image(image, net, card, self.device, tta=args.tta, progress=report, **common)
        report("write", 0.0)
        threshold = card_threshold(card, args.threshold)
        record = provenance.record(card, args, threshold, job.item.path.name, Grid.from_image(mask), warnings)
        mask.SetMetaData(provenance.METADATA_KEY, json.dumps(record))
        imageio.write_image(mask, job.mask, args.overwrite, staging)
        if job.probabilities:
            self._write_float(probabilities, job.probabilities, staging)
        if sr is not None:
            self._write_float(sr, job.sr_image, staging)
        rows = lesions.lesion_table(
            mask, probabilities, fully_connected=not args.face_connected, diameters=bool(args.lesion_table)
        )
        if args.figure:
            from .figure import FigureInfo, overlay_figure

            info = FigureInfo(record["model"], record["threshold"])
            overlay_figure(image, mask, args.figure, args.overwrite, staging, info)
        report("write", 1.0)
        return rows, record


def run(args: argparse.Namespace) -> int:
    import time

    _check_args(args)
    if args.demo:
        _demo(args)
    if not args.inputs:
        raise UserError("give at least one input image (or --demo)")
    items, batch = imageio.find_inputs(args.inputs)
    jobs = _plan(args, items, batch)
    session = _Session(args, batch)
    table: list[dict] = []
    records: list[dict] = []
    failures: list[str] = []
    done: list[str] = []
    started = time.monotonic()
    for k, job in enumerate(jobs):
        where = f"{job.item.name} ({k + 1}/{len(jobs)})" if len(jobs) > 1 else job.item.name
        try:
            # One input's outputs appear together or not at all (a single input's table included).
            with imageio.Staging(args.overwrite) as staging:
                rows, record = session.segment(job, where, staging)
                if args.lesion_table and not batch:
                    lesions.write_lesion_table(
                        rows, args.lesion_table, args.overwrite, record, staging, _columns(record)
                    )
                written = staging.commit()
            session.progress.log(_summary(job.item.name, rows, written))
        except UserError as exc:
            if not batch:
                raise
            failures.append(job.item.path.name)
            print(f"error: {job.item}: {exc}", file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt:
            if batch:
                _finish_batch(args, table, records)
                finished = f"finished and kept: {_names(done)}; " if done else ""
                # Said even with --quiet, like an error: the user must know what the folder now holds.
                left = _names([j.item.path.name for j in jobs[k:]])
                print(f"{finished}not done: {left}", file=sys.stderr, flush=True)
            raise
        done.append(job.item.path.name)
        records.append(record)
        table += [{"case": job.item.name, **r} for r in rows] if batch else rows
    if batch:
        _finish_batch(args, table, records)
    session.progress.log(
        f"segmented {len(jobs) - len(failures)} of {len(jobs)} input(s) in {time.monotonic() - started:.1f} s"
    )
    if failures:
        raise UserError(f"{len(failures)} of {len(jobs)} input(s) failed (reasons above): {_names(failures)}")
    return 0


def _summary(name: str, rows: list[dict], written: list[Path]) -> str:
    """What one input gave and where each output went (volumes in mL, as clinicians read them)."""
    if rows and "volume_mm3" in rows[0]:
        amount = f"{sum(r['volume_mm3'] for r in rows) / 1000:.2f} mL"
    else:
        amount = f"{sum(r.get('area_mm2', 0.0) for r in rows):.1f} mm2"
    return f"{name}: {len(rows)} lesion(s), {amount} in total; wrote {', '.join(str(p) for p in written)}"


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


def _columns(record: dict) -> list[str]:
    return lesions.table_columns(int(record["spatial_dims"]))


def _finish_batch(args: argparse.Namespace, table: list[dict], records: list[dict]) -> None:
    """A batch's table holds the inputs that finished (all of them, or those before a cancel)."""
    if args.lesion_table and records:
        meta = {**provenance.shared(records), "inputs": [r["input"] for r in records]}
        lesions.write_lesion_table(
            table, args.lesion_table, args.overwrite, meta, columns=_columns(records[0])
        )
