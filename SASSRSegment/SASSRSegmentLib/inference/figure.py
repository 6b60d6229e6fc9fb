"""A figure a radiologist reads at a glance: the LR input with the HR mask, labelled.

3D: axial, coronal and sagittal views through the largest lesion (lesion 1 of the table), each named
from the image's real orientation and marked with the patient sides at its edges; 2D: the image. The
input is shown with nearest-neighbour display (its real LR pixels) and the mask at HR as a translucent
fill with an outline, so the detail super-resolution adds is visible. A scale bar, a legend (mask and
input resolution), the lesion count and volume, the model and threshold, and "research use only" are
drawn with Pillow (which Slicer's Python ships); it renders headless.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..data.normalization import tissue_mask
from ..io import geometry, imageio
from ..io.geometry import Grid
from ..runtime.fonts import font
from . import lesions
from .inputs import drop_singleton_4th
from .pixels import luminance, no_data_as_lowest

MASK_RGB = (255, 40, 40)
FILL_ALPHA = 0.3
TEXT_RGB = (255, 255, 255)
MARKER_RGB = (255, 215, 0)
MIN_SIDE_PIXELS = 480
MAX_SIDE_PIXELS = 800
GAP_PIXELS = 8
FONT_PIXELS = 15
MAX_NUMBERS = 9  # lesion numbers written per panel, from lesion 1 on: more would hide the anatomy
NICE_MM = (1, 2, 5, 10, 20, 50, 100, 200, 500)
STAMP = "RESEARCH USE ONLY - not for diagnosis"


@dataclass(frozen=True)
class FigureInfo:
    """What the legend says about how the mask was made."""

    model: str = ""
    threshold: float | None = None
    fully_connected: bool = True  # how lesions are counted and numbered, as in the lesion table


# An axial volume's storage: x to the patient's left, y posterior, z superior.
DISPLAY_ORIENTATION = "LPS"


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


def side(direction_lps) -> str:
    """The patient side a direction (LPS) points to most: R, L, A, P, I or S."""
    v = np.asarray(direction_lps, dtype=float)
    axis = int(np.argmax(np.abs(v[:3])))
    return ("RL", "AP", "IS")[axis][int(v[axis] > 0)]


def view_name(normal_lps) -> str:
    """Axial, coronal or sagittal for a slice normal (LPS), "oblique" added when it is over 20 degrees off."""
    n = np.abs(np.asarray(normal_lps, dtype=float)) / np.linalg.norm(normal_lps)
    axis = int(np.argmax(n))
    name = ("Sagittal", "Coronal", "Axial")[axis]
    return name if n[axis] >= math.cos(math.radians(20)) else f"{name} (oblique)"


@dataclass
class _Panel:
    rgb: np.ndarray
    title: str
    sides: dict  # edge ("left", "right", "top", "bottom") -> patient side letter
    numbers: list = field(default_factory=list)  # (lesion number, row, column) where it is written


def _blend(grey: np.ndarray, mask: np.ndarray) -> np.ndarray:
    rgb = np.repeat(grey[..., None].astype(np.float32), 3, axis=-1)
    rgb[mask] = (1 - FILL_ALPHA) * rgb[mask] + FILL_ALPHA * np.asarray(MASK_RGB, np.float32)
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    edge = mask & ~interior
    # Two pixels wide: the outline stays visible on a screen-sized figure.
    edge = edge | np.roll(edge, 1, axis=0) & mask | np.roll(edge, 1, axis=1) & mask
    rgb[edge] = MASK_RGB
    return rgb.astype(np.uint8)


def _scalar(image: sitk.Image) -> sitk.Image:
    """The image as the network saw it: one volume of a one-volume 4D file, the luminance of RGB(A)
    (a greyscale export with coloured marks; see `inputs.check_image`), the first of other channels."""
    # NaN voxels as the network saw them: its lowest value (NaN would turn the whole display black).
    image = no_data_as_lowest(drop_singleton_4th(image), lambda message: None)
    components = image.GetNumberOfComponentsPerPixel()
    if components in (3, 4):
        image = luminance(image)
    elif components > 1:
        image = sitk.VectorIndexSelectionCast(image, 0)
    return sitk.Cast(image, sitk.sitkFloat32)


def _numbers(labels: np.ndarray) -> list[tuple[int, int, int]]:
    """(lesion number, row, column) just above each lesion seen in a panel, the lowest numbers first."""
    found = []
    for number in [int(v) for v in np.unique(labels) if v][:MAX_NUMBERS]:
        rows, cols = np.nonzero(labels == number)
        top = rows.min()
        column = int(np.median(cols[rows <= top + 2]))
        found.append((number, max(0, int(top) - FONT_PIXELS - 2), max(0, column - FONT_PIXELS // 3)))
    return found


def _panels(
    image: sitk.Image, mask: sitk.Image, display: Grid, centre: np.ndarray, labels: sitk.Image | None = None
) -> list[_Panel]:
    values = sitk.GetArrayFromImage(image)
    # Window on the tissue so a large black background does not wash the anatomy out.
    lo, hi = np.percentile(values[tissue_mask(values)], [0.5, 99.5])
    m = display.matrix
    panels = []
    volumetric = display.dims == 3 and display.size[2] > 1
    for axis in (2, 1, 0) if volumetric else (None,):
        grid = display if axis is None else _slab(display, axis, int(centre[axis]))
        grey = sitk.GetArrayFromImage(geometry.resample(image, grid, "nearest"))
        hr = sitk.GetArrayFromImage(geometry.resample(mask, grid, "nearest")) > 0
        numbered = np.zeros(hr.shape, np.uint32)
        if labels is not None:
            # Not geometry.resample: its extrapolation would spread the box's edge labels outside it.
            placed = sitk.Resample(
                labels, grid.reference_image(), sitk.Transform(), sitk.sitkNearestNeighbor, 0
            )
            numbered = sitk.GetArrayFromImage(placed)
        if grey.ndim == 3:  # numpy order (z, y, x): grid axis a is numpy axis 2 - a
            layer = 0 if axis is None else 2 - axis
            grey, hr = np.take(grey, 0, axis=layer), np.take(hr, 0, axis=layer)
            numbered = np.take(numbered, 0, axis=layer)
        # Columns run along index axis `across`, rows along `down` (flipped so rows along z put +z on top).
        across, down = {None: (0, 1), 2: (0, 1), 1: (0, 2), 0: (1, 2)}[axis]
        flip = axis in (0, 1)
        if flip:
            grey, hr, numbered = grey[::-1], hr[::-1], numbered[::-1]
        scaled = (np.clip((grey - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)
        if axis is None:  # a 2D image (or one slice) has no patient orientation to mark
            title, sides = "Image", {}
        else:
            up = m[:, down] if flip else -m[:, down]
            title = view_name(m[:, axis])
            sides = {
                "right": side(m[:, across]),
                "left": side(-m[:, across]),
                "top": side(up),
                "bottom": side(-up),
            }
        panels.append(_Panel(_blend(scaled, hr), title, sides, _numbers(numbered)))
    return panels


def scale_bar_mm(panel_width_mm: float) -> int:
    """The longest round length (1, 2, 5 x 10^k mm) that fits in a fifth of the panel."""
    fitting = [v for v in NICE_MM if v <= panel_width_mm / 5]
    return fitting[-1] if fitting else NICE_MM[0]


def _spacing_text(image: sitk.Image) -> str:
    spacing = image.GetSpacing()
    if image.GetDimension() == 3 and image.GetSize()[2] == 1:
        spacing = spacing[:2]
    return " x ".join(f"{s:g}" for s in spacing)


def _legend(rows: list[dict], mask: sitk.Image, image: sitk.Image, info: FigureInfo) -> list[str]:
    key, amount = (
        ("volume_mm3", lambda v: f"{v / 1000:.1f} mL")
        if mask.GetDimension() == 3 and not lesions.is_planar(mask)
        else ("area_mm2", lambda v: f"{v:.0f} mm2")
    )
    if rows:
        total = sum(r[key] for r in rows)
        count = f"{len(rows)} lesion{'s' if len(rows) > 1 else ''}, {amount(total)} in total"
        if len(rows) > 1:
            count += f"; views through lesion 1 ({amount(rows[0][key])})"
    else:
        count = "no lesion found"
    lines = [count, f"mask at {_spacing_text(mask)} mm over the {_spacing_text(image)} mm input"]
    model = info.model + (f", threshold {info.threshold:g}" if info.threshold is not None else "")
    if model:
        lines.append(f"model: {model}")
    return lines


def render(image: sitk.Image, mask: sitk.Image, info: FigureInfo | None = None) -> np.ndarray:
    """The figure as an RGB uint8 array (rows, columns, 3)."""
    from PIL import Image, ImageDraw

    info = info or FigureInfo()
    image = _scalar(image)
    if mask.GetDimension() == 3 and not lesions.is_planar(mask):
        # Views as a viewer shows them (radiological: the patient's left on the right, superior at
        # the top) whatever order the volume is stored in: a sagittal acquisition's came out upside down.
        image, mask = (
            geometry.reorient(image, DISPLAY_ORIENTATION),
            geometry.reorient(mask, DISPLAY_ORIENTATION),
        )
    display = _display_grid(Grid.from_image(mask))
    numbered = lesions.numbered_lesions(mask, info.fully_connected)
    rows = lesions.lesion_rows(numbered, diameters=False, planar=lesions.is_planar(mask))
    if rows:
        centre = np.round(display.physical_to_index(rows[0]["centroid_lps_mm"])).astype(int)
        centre = np.clip(centre, 0, np.asarray(display.size) - 1)
    else:
        centre = np.asarray(display.size) // 2
    panels = _panels(image, mask, display, centre, numbered[0] if numbered else None)
    face = font(FONT_PIXELS)
    line = FONT_PIXELS + 6
    legend = _legend(rows, mask, image, info)
    title_h, legend_h = line + 4, line * (len(legend) + 1) + 8
    width = sum(p.rgb.shape[1] for p in panels) + GAP_PIXELS * (len(panels) + 1)
    height = title_h + max(p.rgb.shape[0] for p in panels) + legend_h + GAP_PIXELS
    canvas = Image.new("RGB", (max(width, 420), height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    x = GAP_PIXELS
    spacing = display.spacing[0]
    for k, panel in enumerate(panels):
        h, w = panel.rgb.shape[:2]
        canvas.paste(Image.fromarray(panel.rgb), (x, title_h))
        draw.text((x, 4), panel.title, fill=TEXT_RGB, font=face)
        y0, mid_y, mid_x = title_h, title_h + h // 2, x + w // 2
        for edge, letter in panel.sides.items():
            at = {
                "left": (x + 3, mid_y - line // 2),
                "right": (x + w - FONT_PIXELS, mid_y - line // 2),
                "top": (mid_x - 4, y0 + 2),
                "bottom": (mid_x - 4, y0 + h - line),
            }[edge]
            draw.text(at, letter, fill=MARKER_RGB, font=face)
        for number, row, column in panel.numbers:
            draw.text((x + column, y0 + row), str(number), fill=TEXT_RGB, font=face)
        if k == 0:
            bar_mm = scale_bar_mm(w * spacing)
            bar_px = round(bar_mm / spacing)
            bx, by = x + 6, y0 + h - 8
            draw.rectangle([bx, by, bx + bar_px - 1, by + 2], fill=TEXT_RGB)
            label = f"{bar_mm} mm" if bar_mm < 10 else f"{bar_mm / 10:g} cm"
            draw.text((bx, by - line), label, fill=TEXT_RGB, font=face)
        x += w + GAP_PIXELS
    y = title_h + max(p.rgb.shape[0] for p in panels) + GAP_PIXELS
    draw.rectangle([GAP_PIXELS, y + 4, GAP_PIXELS + 12, y + 16], fill=MASK_RGB)
    for k, text in enumerate(legend):
        draw.text((GAP_PIXELS + (18 if k == 0 else 0), y + k * line), text, fill=TEXT_RGB, font=face)
    draw.text((GAP_PIXELS, y + len(legend) * line), STAMP, fill=MARKER_RGB, font=face)
    return np.asarray(canvas)


def overlay_figure(
    image: sitk.Image,
    mask: sitk.Image,
    path: str | os.PathLike,
    overwrite: bool = False,
    staging: imageio.Staging | None = None,
    info: FigureInfo | None = None,
) -> Path:
    """Render the figure and write it as PNG (atomically, or into `staging`)."""
    figure = sitk.GetImageFromArray(render(image, mask, info), isVector=True)
    return imageio.write_image(figure, path, overwrite, staging)
