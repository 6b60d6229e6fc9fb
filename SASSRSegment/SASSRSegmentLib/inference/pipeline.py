"""Segmentation of one image: an LR image in, its lesion mask at `scale` times finer resolution out
(the code the `segment` and `evaluate` commands and the benchmarks run).

Per image: checks -> (ROI crop) -> working LR grid of the model card -> antialiased resampling ->
normalisation (`inputs.py`) -> sliding-window HR probabilities on the HR working grid (`windows.py`)
-> linear resampling onto the output grid (the input's HR grid, or the input grid) -> threshold ->
small-component removal. The HR output covers exactly the physical extent of its input, so it
overlays it in any viewer. Writing is the command's (commands/segment.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import SimpleITK as sitk

from ..io import geometry
from ..io.geometry import Grid, same_grid
from ..runtime.errors import UserError
from . import lesions
from .inputs import PreparedInput, prepare_input
from .memory import PROBABILITY_KINDS

# ---------------------------------------------------------------------------------- the core


def _to_output(array: np.ndarray, prepared: PreparedInput) -> sitk.Image:
    """An HR-working-grid array on the output grid (resampled linearly unless the grids coincide;
    smoothed first along axes where the output is coarser, e.g. for --output-grid input). Outside the
    working grid (the black frame around a scan, `inputs.content_box`) nothing was predicted: 0."""
    image = prepared.hr_work.image_from_array(array)
    if not same_grid(prepared.hr_work, prepared.output_grid):
        image = geometry.resample(image, prepared.output_grid, "linear", antialias=True, extrapolate=False)
        image = _zero_beyond(image, prepared.input_grid)
    return image


def _zero_beyond(image: sitk.Image, seen: Grid) -> sitk.Image:
    """`image` with its voxels beyond the extent of `seen` (the input the network was given) set to 0:
    the working grid overshoots a scan by up to a working voxel, which a black frame around the scan
    would otherwise receive (a lesion at the scan's edge spilt 1768 HR pixels into it)."""
    grid = Grid.from_image(image)
    corners = [grid.physical_to_index(p) for p in seen.extent_corners()]
    start = np.maximum(np.ceil(np.min(corners, axis=0) - 1e-6), 0).astype(int)
    stop = np.minimum(np.floor(np.max(corners, axis=0) + 1e-6) + 1, grid.size).astype(int)
    if np.all(start == 0) and np.all(stop == grid.size):
        return image
    array = sitk.GetArrayViewFromImage(image)
    box = tuple(slice(a, b) for a, b in zip(start[::-1], stop[::-1]))
    kept = np.zeros_like(array)
    kept[box] = array[box]
    out = sitk.GetImageFromArray(kept, isVector=image.GetNumberOfComponentsPerPixel() > 1)
    out.CopyInformation(image)
    return out


def _lift(image: sitk.Image, prepared: PreparedInput) -> sitk.Image:
    """An output of the working frame on the input's own: a single slice's plane, or its axis order."""
    if prepared.plane is not None:
        return prepared.plane.lift(image)
    return geometry.reorient(image, prepared.stored_as)


def _lift_numbered(
    numbered: tuple[sitk.Image, list[int]], mask: sitk.Image, prepared: PreparedInput
) -> tuple[sitk.Image, list[int]]:
    """The numbered lesions' box lifted as `_lift` does, with its index offset in the lifted `mask`."""
    box, offset = numbered
    if prepared.plane is not None:
        return prepared.plane.lift(box), [*offset, 0]
    if prepared.stored_as is None:
        return numbered
    box = lesions.in_scan_order(geometry.reorient(box, prepared.stored_as))
    start = np.rint(Grid.from_image(mask).physical_to_index(box.GetOrigin()))
    return box, [int(v) for v in start]


def tta_axes(card: dict) -> list[int] | None:
    """The axes (array order) the model saw flipped in training; None when the card does not say.

    Flipping any other axis at test time shows the model images unlike its training data (an
    upside-down ultrasound image), which lowers accuracy instead of raising it.
    """
    axes = card.get("training", {}).get("config", {}).get("flip_axes")
    return None if axes is None else [int(a) for a in axes]


@dataclass
class Segmentation:
    mask: sitk.Image  # uint8 0/1 on the output grid
    probabilities: sitk.Image | None
    # lesions.numbered_lesions(mask, fully_connected), when asked for: (label image of the lesions'
    # box, its index offset in the mask)
    numbered: tuple[sitk.Image, list[int]] | None = None


def segment_image(*args, **kwargs) -> tuple[sitk.Image, sitk.Image | None]:
    """`segment_lesions`'s (mask, probabilities)."""
    result = segment_lesions(*args, **kwargs)
    return result.mask, result.probabilities


def segment_lesions(
    image: sitk.Image,
    net,
    card: dict,
    device=None,
    tta: bool = False,
    threshold: float | None = None,
    roi: list[float] | None = None,
    output_grid: str = "hr",
    overlap: float | None = None,
    batch_size: int = 1,
    memory_limit: int | None = None,
    progress: Callable[[str, float], None] | None = None,
    warn: Callable[[str], None] | None = None,
    probabilities: str = "float32",
    number_lesions: bool = False,
    fully_connected: bool = True,
) -> Segmentation:
    """The mask and probabilities, both on the output grid: `hr_grid(input, scale)` (or of the ROI's
    input voxels), or the input grid with output_grid="input"; with `number_lesions`, the mask's
    lesions numbered as `lesions.numbered_lesions(mask, fully_connected)` does (from the labelling
    that removes the small components where it can).

    probabilities: "float32" (values 0..1), "uint8" (round(255 p): a quarter of the memory, enough for
    the lesion table's mean probabilities) or "none" (the second result is None). Unless float32 ones
    are asked for, on the HR grid the mask is thresholded slab by slab from the exact probabilities, so
    memory holds a few bytes per HR voxel (what makes very large volumes fit).
    roi: (xmin, xmax, ymin, ymax[, zmin, zmax]) in RAS mm; the input voxels it touches are segmented.
    progress(stage, fraction) is called as work proceeds; warn(message) for non-fatal problems.
    """
    if probabilities not in PROBABILITY_KINDS:
        raise ValueError(f"probabilities must be one of {PROBABILITY_KINDS}, got {probabilities!r}")
    from .windows import sliding_window_predict

    threshold = card_threshold(card, threshold)
    report = progress or (lambda stage, fraction: None)
    warn = warn or (lambda m: None)
    report("preprocess", 0.0)
    prepared = prepare_input(
        image,
        card,
        roi,
        output_grid,
        batch_size,
        memory_limit,
        warn,
        probabilities,
        overlap,
    )
    report("preprocess", 1.0)
    predict = partial(
        sliding_window_predict,
        net,
        prepared.lr,
        prepared.window,
        int(card["preprocessing"]["scale"]),
        overlap=prepared.overlap,
        batch_size=batch_size,
        device=device,
        tta=tta,
        tta_axes=tta_axes(card),
        progress=lambda f: report("predict", f),
        support=prepared.support,
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
    result = _postprocess(mask, probs, prepared, card, number_lesions, fully_connected, warn)
    report("resample", 1.0)
    return result


def _postprocess(
    mask: sitk.Image,
    probabilities: sitk.Image | None,
    prepared: PreparedInput,
    card: dict,
    number_lesions: bool,
    fully_connected: bool,
    warn: Callable[[str], None],
) -> Segmentation:
    """Small-component removal (and the lesions' numbers when asked for), the plausibility check, and
    the results lifted onto the input's grid."""
    min_fraction = float(card.get("postprocess", {}).get("min_component_fraction", 0))
    numbered = None
    if number_lesions:
        mask, numbered = lesions.drop_small_and_number(mask, min_fraction, fully_connected)
    else:
        mask = lesions.drop_small_components(mask, min_fraction)
    _check_plausible(mask, prepared, card, warn)
    mask = _lift(mask, prepared)
    if numbered is not None:
        numbered = _lift_numbered(numbered, mask, prepared)
    lifted = None if probabilities is None else _lift(probabilities, prepared)
    return Segmentation(mask, lifted, numbered)


def _check_plausible(
    mask: sitk.Image, prepared: PreparedInput, card: dict, warn: Callable[[str], None]
) -> None:
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
    overlap: float | None = None,
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
    from .windows import sliding_window_predict

    report = progress or (lambda stage, fraction: None)
    prepared = prepare_input(image, card, roi, output_grid, 1, memory_limit, lambda m: None, overlap=overlap)
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
        overlap=prepared.overlap,
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


def card_threshold(card: dict, threshold: float | None = None) -> float:
    """`threshold` when given, else the model card's (0.5 when it has none)."""
    if threshold is not None:
        return float(threshold)
    value = card.get("threshold", 0.5)
    # A hand-edited card: a word or a value outside (0, 1) would fail deep inside, or find nothing.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise UserError(
            f"model {card.get('name', '(unnamed)')}: threshold {json.dumps(value)} in its model.json "
            "must be a number between 0 and 1"
        )
    return float(value)


def to_8_bit(image: sitk.Image, factor: float) -> sitk.Image:
    """round(factor * value), clamped to 0..255, as uint8 (8-bit probabilities, PNG outputs)."""
    return sitk.Cast(sitk.Clamp(image * factor + 0.5, sitk.sitkFloat32, 0.0, 255.0), sitk.sitkUInt8)
