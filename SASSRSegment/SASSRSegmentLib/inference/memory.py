"""How much memory a segmentation needs (the pipeline refuses up front what would not fit) and how much
there is."""

from __future__ import annotations

import math

from ..io.geometry import Grid, same_grid

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
