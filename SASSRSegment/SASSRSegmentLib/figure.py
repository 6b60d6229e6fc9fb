"""A PNG a person can look at: the LR input with the HR mask's outline, three orthogonal slices for 3D.

The input is shown with nearest-neighbour display (its real LR pixels) and the outline at HR
resolution, so the detail the super-resolution adds is visible. numpy + SimpleITK only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import geometry, imageio, lesions
from .geometry import Grid
from .normalization import tissue_mask

OUTLINE_RGB = (255, 40, 40)
MIN_SIDE_PIXELS = 480
MAX_SIDE_PIXELS = 800
GAP_PIXELS = 8


def _display_grid(mask_grid: Grid) -> Grid:
    """An isotropic grid over the mask's extent (HR pixel size, capped so the figure stays screen-sized)."""
    extent = np.asarray(mask_grid.size) * np.asarray(mask_grid.spacing)
    # At least HR detail, enlarged up to MIN_SIDE_PIXELS for small images, at most MAX_SIDE_PIXELS a side.
    spacing = min(min(mask_grid.spacing), float(extent.max()) / MIN_SIDE_PIXELS)
    spacing = max(spacing, float(extent.max()) / MAX_SIDE_PIXELS)
    size = [max(1, round(e / spacing)) for e in extent]
    if mask_grid.dims == 3 and mask_grid.size[2] == 1:
        size[2], spacing_z = 1, mask_grid.spacing[2]
    else:
        spacing_z = spacing
    spacings = np.array([spacing, spacing, spacing_z][: mask_grid.dims])
    corner = mask_grid.index_to_physical(-0.5 * np.ones(mask_grid.dims))
    origin = corner + mask_grid.matrix @ (spacings / 2)
    return Grid(
        tuple(size), tuple(float(s) for s in spacings), tuple(float(v) for v in origin), mask_grid.direction
    )


def _slab(grid: Grid, axis: int, index: int) -> Grid:
    """The one-voxel-thick sub-grid of `grid` at `index` along `axis`."""
    size = list(grid.size)
    size[axis] = 1
    offset = np.zeros(grid.dims)
    offset[axis] = index
    return Grid(
        tuple(size), grid.spacing, tuple(float(v) for v in grid.index_to_physical(offset)), grid.direction
    )


def _outline(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1]
    interior = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return inner & ~interior


def _panel(grey: np.ndarray, mask: np.ndarray) -> np.ndarray:
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgb[_outline(mask)] = OUTLINE_RGB
    return rgb


def _scalar(image: sitk.Image) -> sitk.Image:
    if image.GetNumberOfComponentsPerPixel() > 1:
        image = sitk.VectorIndexSelectionCast(image, 0)
    return sitk.Cast(image, sitk.sitkFloat32)


def render(image: sitk.Image, mask: sitk.Image) -> np.ndarray:
    """The figure as an RGB uint8 array (rows, columns, 3).

    3D: axial, coronal and sagittal slices (index axes z, y, x; superior up) through the centroid of the
    largest lesion, or through the centre when there is none. 2D and single-slice: the image itself.
    """
    image = _scalar(image)
    display = _display_grid(Grid.from_image(mask))
    rows = lesions.lesion_table(mask, diameters=False)
    if rows:
        centre = np.round(display.physical_to_index(rows[0]["centroid_lps_mm"])).astype(int)
        centre = np.clip(centre, 0, np.asarray(display.size) - 1)
    else:
        centre = np.asarray(display.size) // 2
    # Window on the foreground so a large black background does not wash the anatomy out.
    values = sitk.GetArrayFromImage(image)
    lo, hi = np.percentile(values[tissue_mask(values)], [0.5, 99.5])
    panels = []
    volumetric = display.dims == 3 and display.size[2] > 1
    for axis in (2, 1, 0) if volumetric else (None,):
        grid = display if axis is None else _slab(display, axis, int(centre[axis]))
        grey = sitk.GetArrayFromImage(geometry.resample(image, grid, "nearest"))
        hr = sitk.GetArrayFromImage(geometry.resample(mask, grid, "nearest")) > 0
        if grey.ndim == 3:  # numpy order (z, y, x): grid axis a is numpy axis 2 - a
            layer = 0 if axis is None else 2 - axis
            grey, hr = np.take(grey, 0, axis=layer), np.take(hr, 0, axis=layer)
        if axis in (0, 1):  # rows run along z: put superior on top
            grey, hr = grey[::-1], hr[::-1]
        scaled = np.clip((grey - lo) / max(hi - lo, 1e-12), 0, 1) * 255
        panels.append(_panel(scaled.astype(np.uint8), hr))
    height = max(p.shape[0] for p in panels)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, GAP_PIXELS), (0, 0))) for p in panels]
    return np.concatenate(padded, axis=1)[:, :-GAP_PIXELS]


def overlay_figure(
    image: sitk.Image,
    mask: sitk.Image,
    path: str | os.PathLike,
    overwrite: bool = False,
    staging: imageio.Staging | None = None,
) -> Path:
    """Render the figure and write it as PNG (atomically, or into `staging`)."""
    figure = sitk.GetImageFromArray(render(image, mask), isVector=True)
    return imageio.write_image(figure, path, overwrite, staging)
