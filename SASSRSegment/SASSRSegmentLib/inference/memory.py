"""How much memory a segmentation needs (the pipeline refuses up front what would not fit; how much there
is: runtime/hostmemory.py)."""

from __future__ import annotations

import math
from collections.abc import Callable

from ..io.geometry import Grid, same_grid

# Bytes per voxel held at the peak. Output grid: the uint8 mask image and, while small components are
# dropped, the kept array and its image; probabilities twice (numpy, image) when kept, as float32 or as
# 8-bit, with the uint32 component labels of the lesion table that needs them. When the output grid is not the HR working
# grid, the working grid's float32 probabilities are resampled: one float32 array there and two on the
# output grid. The slab being blended: window depth x HR plane, float32, three copies. The input as
# float32 while it is resampled. Network activations: see activation_bytes.
_BYTES_MASK, _BYTES_LABELS, _BYTES_IN = 3, 4, 8


_BYTES_PROBABILITIES = {"none": 0, "uint8": 2, "float32": 8}


PROBABILITY_KINDS = tuple(_BYTES_PROBABILITIES)


_BYTES_RESAMPLED_WORK, _BYTES_RESAMPLED_OUT, _BYTES_SLAB = 4, 8, 12


# An input reordered to the model's axis order (`geometry.reorient`) has each output copied back into
# its own order, one at a time: the mask's byte, or the probabilities' when they are larger.
_BYTES_REORDERED = {"none": 1, "uint8": 1, "float32": 4}


# Peak RSS of one window's prediction on CPU, per first-width channel per HR window voxel: 5-6.5 for 3D
# networks that work at LR up to one-channel logits or sub-pixel children (the baseline, the full network
# with sub-pixel heads; 48^3 to 120x120x80 LR windows), 19-21 for the 2D full network whose learned
# upsampling convolves at HR (128^2 to 512^2 LR).
_ACTIVATION_BYTES_LR_HEADS, _ACTIVATION_BYTES_HR_CONVOLUTIONS = 8, 24

# What a window larger than the training patch may add to the estimate, whatever memory is free: a
# whole 2 mm brain (about 1.1 million LR voxels, 1.1 GiB more estimated) is one window, and a large
# volume's tiles keep its peak near that of the training-size windows.
LARGE_WINDOW_EXTRA_BYTES = 5 << 28


def estimate_bytes(
    input_grid: Grid,
    output_grid: Grid,
    hr_work: Grid,
    window_hr: tuple[int, ...],
    card: dict,
    batch: int,
    probabilities: str = "float32",
    reordered: bool = False,
) -> int:
    """Peak memory of one image's segmentation (an estimate that errs high)."""
    per_output = (
        _BYTES_MASK + _BYTES_PROBABILITIES[probabilities] + (_BYTES_LABELS if probabilities != "none" else 0)
    )
    if reordered:
        per_output += _BYTES_REORDERED[probabilities]
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
        + activation_bytes(card, window_hr, batch)
    )


def activation_bytes(card: dict, window_hr: tuple[int, ...], batch: int) -> int:
    """The network's peak activations for `batch` windows of `window_hr` HR voxels."""
    network = card["network"]
    at_hr = network.get("learned_upsampling", True) and network.get("hr_head", "interpolate") != "subpixel"
    per_voxel = _ACTIVATION_BYTES_HR_CONVOLUTIONS if at_hr else _ACTIVATION_BYTES_LR_HEADS
    return per_voxel * int(network["features"][0]) * math.prod(window_hr) * batch


def window_invariant(card: dict) -> bool:
    """Whether the network's output at a voxel is the same in any window that holds its context.

    Batch normalisation at inference uses the statistics learnt in training; instance normalisation
    measures each window anew, so such a network must see windows like its training patches."""
    return card["network"].get("norm") == "batch"


def default_overlap(card: dict) -> float:
    """Half-window overlaps average the window-dependence of an instance-normalised network away; a
    window-invariant one only needs its window borders, which lack context, covered."""
    return 0.25 if window_invariant(card) else 0.5


def trained_window(card: dict, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """The card's training patch (array order), clipped to the image."""
    return tuple(min(int(w), n) for w, n in zip(card["preprocessing"]["patch_size_lr"], spatial))


def choose_window(
    card: dict, spatial: tuple[int, ...], overlap: float, fits: Callable[[tuple[int, ...]], bool]
) -> tuple[int, ...]:
    """The LR window (array order) to predict `spatial` with.

    The training patch for a window-dependent network. A window-invariant one gets the whole image
    if `fits(window)`, otherwise the fewest overlapping tiles that fit, split along the longest window
    axis first (the first axis on ties), never smaller than the training patch."""
    trained = trained_window(card, spatial)
    if not window_invariant(card):
        return trained
    tiles = [1] * len(spatial)

    def window() -> tuple[int, ...]:
        # k windows overlapping by `overlap` cover k - (k - 1) * overlap window lengths.
        return tuple(
            max(t, min(n, math.ceil(n / (k - (k - 1) * overlap)))) for n, k, t in zip(spatial, tiles, trained)
        )

    current = window()
    while current != trained and not fits(current):
        axis = max((a for a in range(len(spatial)) if current[a] > trained[a]), key=lambda a: current[a])
        tiles[axis] += 1
        current = window()
    return current
