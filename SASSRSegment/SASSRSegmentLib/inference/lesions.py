"""Connected lesions of a mask and the lesion table (CSV or JSON).

Coordinates: SimpleITK's physical space is LPS; Slicer shows RAS. Both are given, and every coordinate
column says which. Longest diameters are Feret diameters between voxel centres on the lesion's
border, so a one-voxel lesion has diameter 0.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..io.geometry import Grid
from ..io.imageio import Staging, split_extension, write_text
from ..runtime.errors import UserError
from . import measure

_AXES = ("x", "y", "z")


def connected_lesions(mask: sitk.Image, fully_connected: bool = True) -> sitk.Image:
    """Label image of the mask's connected components, numbered 1.. from the largest down.

    fully_connected: diagonal neighbours join (26-connectivity in 3D, 8 in 2D); else faces only.
    """
    binary = sitk.Cast(mask > 0, sitk.sitkUInt8)
    labels = sitk.ConnectedComponent(binary, fully_connected)
    return sitk.RelabelComponent(labels, sortByObjectSize=True)


_SLAB_ROWS = 32  # first-axis rows per step of the voxel loops below: temporaries stay small
# Labelling is most of the cost of removing small components from a dense mask: the first pass's
# labels are kept up to this size (a 240x240x154 HR brain's take 35 MB; a 1024x1024x600 one's would
# take 2.5 GB and are labelled twice instead).
_KEPT_LABEL_BYTES = 256 * 2**20
# Up to this size a box is labelled in one piece (its temporaries about 10 bytes a voxel, not 4): the
# dense benchmark's 154x224x176 box takes 24 MB.
_ONE_SLAB_LABEL_BYTES = 64 * 2**20


def lesion_region(mask: sitk.Image) -> tuple[list[int], list[int]] | None:
    """Index start and size (x, y, z) of the box around the mask's nonzero voxels; None if empty.

    Component labelling runs inside this box only: lesions are small beside a large HR volume, and
    labels take four bytes a voxel.
    """
    array = sitk.GetArrayViewFromImage(mask)
    occupied = [np.zeros(n, bool) for n in array.shape]
    for first in range(0, array.shape[0], _SLAB_ROWS):
        chunk = array[first : first + _SLAB_ROWS] != 0
        for axis in range(array.ndim):
            others = tuple(a for a in range(array.ndim) if a != axis)
            hit = chunk.any(axis=others) if others else chunk
            if axis == 0:
                occupied[0][first : first + len(chunk)] = hit
            else:
                occupied[axis] |= hit
    if not occupied[0].any():
        return None
    start = [int(np.argmax(o)) for o in occupied]
    stop = [len(o) - int(np.argmax(o[::-1])) for o in occupied]
    return start[::-1], [b - a for a, b in zip(start, stop)][::-1]


def _slab_labels(array: np.ndarray, first: int, rows: int, fully_connected: bool) -> np.ndarray:
    chunk = sitk.GetImageFromArray((array[first : first + rows] != 0).astype(np.uint8))
    return sitk.GetArrayFromImage(sitk.ConnectedComponent(chunk, fully_connected))


def _neighbour_pairs(a: np.ndarray, b: np.ndarray, fully_connected: bool) -> np.ndarray:
    """(label in a, label in b) for every pair of touching foreground voxels of two adjacent planes."""
    shifts = itertools.product((-1, 0, 1), repeat=a.ndim) if fully_connected else [(0,) * a.ndim]
    keys = []
    span = int(b.max()) + 1
    for shift in shifts:
        sa = tuple(slice(max(0, -k), n - max(0, k)) for k, n in zip(shift, a.shape))
        sb = tuple(slice(max(0, k), n - max(0, -k)) for k, n in zip(shift, a.shape))
        la, lb = a[sa].ravel(), b[sb].ravel()
        both = (la > 0) & (lb > 0)
        # One integer per pair: a 1D unique sorts a dense mask's touching planes 10x faster than rows.
        keys.append(la[both].astype(np.int64) * span + lb[both])
    unique = np.unique(np.concatenate(keys))
    return np.stack([unique // span, unique % span], axis=1)


def keep_large_components(
    array: np.ndarray,
    min_fraction: float,
    out: np.ndarray | None = None,
    fully_connected: bool = True,
    rows: int | None = None,
    numbered: bool = False,
) -> np.ndarray:
    """Write into `out` (uint8, array's shape) the components of `array`'s nonzero voxels that have at
    least `min_fraction` of the largest one's voxels, and return it. With `numbered`, each kept
    component's lesion number instead of 1 (as `numbered_lesions` numbers them: 1 the largest, equal
    sizes in scan order). Without `out`, a new array of the smallest unsigned type that holds the values.

    Components are labelled `rows` first-axis rows at a time and joined across slab faces
    (union-find). The slabs' four-byte labels are kept for the second pass up to `_KEPT_LABEL_BYTES`;
    a larger volume's are labelled again instead, so memory holds one slab's. By default (None) an
    array whose labels take at most `_ONE_SLAB_LABEL_BYTES` is labelled in one slab (the dense-mask
    benchmark's 154x224x176 box: 0.107 s against 0.131 s in 32-row slabs), a larger one `_SLAB_ROWS`
    rows at a time.
    """
    # Slab k's local label j > 0 is global label bases[k] + j; global label 0 is the background.
    bases, sizes, boundary = [], [np.zeros(1, np.int64)], None
    parent = np.zeros(1, np.int64)
    kept = [] if 4 * array.size <= _KEPT_LABEL_BYTES else None
    if rows is None:
        rows = array.shape[0] if 4 * array.size <= _ONE_SLAB_LABEL_BYTES else _SLAB_ROWS
    for first in range(0, array.shape[0], rows):
        labels = _slab_labels(array, first, rows, fully_connected)
        if kept is not None:
            kept.append(labels)
        count, base = int(labels.max()), len(parent) - 1
        bases.append(base)
        sizes.append(np.bincount(labels.ravel(), minlength=count + 1)[1:])
        parent = np.concatenate([parent, np.arange(base + 1, base + count + 1)])
        if boundary is not None:
            for a, b in _neighbour_pairs(boundary, labels[0], fully_connected):
                ra, rb = _root(parent, int(a)), _root(parent, int(b) + base)
                parent[max(ra, rb)] = min(ra, rb)
        boundary = np.where(labels[-1] > 0, labels[-1].astype(np.int64) + base, 0)
    while not np.array_equal(parent, parent[parent]):
        parent = parent[parent]
    root_sizes = np.bincount(parent, weights=np.concatenate(sizes), minlength=len(parent))
    root_sizes[0] = 0
    keep = root_sizes[parent] >= min_fraction * root_sizes.max()
    keep[0] = False
    value = keep.astype(np.uint8)
    if numbered:
        # A component's root is its first label in scan order (unions keep the smaller label).
        roots = np.flatnonzero(keep & (parent == np.arange(len(parent))))
        order = roots[np.lexsort((roots, -root_sizes[roots]))]
        number = np.zeros(len(parent), np.int64)
        number[order] = np.arange(1, len(order) + 1)
        value = number[parent]
    top = int(value.max(initial=0))
    if out is None:
        out = np.zeros(array.shape, np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.uint32)
    elif top > np.iinfo(out.dtype).max:
        raise ValueError(f"{top} lesions do not fit in {out.dtype}")
    for k, (base, first) in enumerate(zip(bases, range(0, array.shape[0], rows))):
        labels = kept[k] if kept is not None else _slab_labels(array, first, rows, fully_connected)
        # Local label j is global base + j; local 0 (background) stays 0.
        local = np.concatenate([[0], value[base + 1 : base + int(labels.max()) + 1]]).astype(out.dtype)
        out[first : first + rows] = local[labels]
    return out


def _root(parent: np.ndarray, label: int) -> int:
    while parent[label] != label:
        parent[label] = parent[parent[label]]
        label = int(parent[label])
    return label


def drop_small_components(mask: sitk.Image, min_fraction: float) -> sitk.Image:
    """Remove connected components smaller than `min_fraction` of the largest (uint8 0/1 result).

    For single-mass lesions (a glioma's whole tumour) the specks away from the main mass are false
    positives far more often than satellite lesions; models whose validation says so set this in
    their card. min_fraction <= 0 keeps everything.
    """
    region = lesion_region(mask) if min_fraction > 0 else None
    if region is None:
        return mask
    start, size = region
    box = tuple(slice(a, a + n) for a, n in zip(start[::-1], size[::-1]))
    kept = np.zeros(mask.GetSize()[::-1], np.uint8)
    keep_large_components(sitk.GetArrayViewFromImage(mask)[box], min_fraction, out=kept[box])
    out = sitk.GetImageFromArray(kept)
    out.CopyInformation(mask)
    return out


def drop_small_and_number(
    mask: sitk.Image, min_fraction: float, fully_connected: bool = True
) -> tuple[sitk.Image, tuple[sitk.Image, list[int]] | None]:
    """(`drop_small_components(mask, min_fraction)`, `numbered_lesions` of it) from one labelling where
    the labels fit in `_KEPT_LABEL_BYTES` and the connectivities agree: a second labelling was
    most of what a dense mask's lesion table and summary cost (80 ms of 0.2 s on the dense benchmark).
    The numbered box is the one around the lesions before the small ones were dropped."""
    region = lesion_region(mask)
    if region is None:
        return mask, None
    start, size = region
    if not fully_connected or 4 * int(np.prod(size)) > _KEPT_LABEL_BYTES:
        mask = drop_small_components(mask, min_fraction)
        return mask, numbered_lesions(mask, fully_connected)
    box = tuple(slice(a, a + n) for a, n in zip(start[::-1], size[::-1]))
    # In the smallest type that holds them: a dense mask's few lesions take a byte a voxel, not four.
    numbers = keep_large_components(
        sitk.GetArrayViewFromImage(mask)[box], max(min_fraction, 0.0), numbered=True
    )
    kept = np.zeros(mask.GetSize()[::-1], np.uint8)
    kept[box] = numbers > 0
    out = sitk.GetImageFromArray(kept)
    out.CopyInformation(mask)
    return out, (Grid.from_image(mask).sub_grid(start, size).image_from_array(numbers), list(start))


def _lps_to_ras(point: np.ndarray) -> np.ndarray:
    flip = np.ones(len(point))
    flip[:2] = -1
    return point * flip


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    ga, gb = Grid.from_image(a), Grid.from_image(b)
    return (
        ga.size == gb.size
        and np.allclose(ga.spacing, gb.spacing, atol=1e-6)
        and np.allclose(ga.origin, gb.origin, atol=1e-4)
        and np.allclose(ga.direction, gb.direction, atol=1e-6)
    )


def numbered_lesions(mask: sitk.Image, fully_connected: bool = True) -> tuple[sitk.Image, list[int]] | None:
    """(label image, its index offset in the mask) over the box around the mask's lesions, each lesion
    numbered as everywhere it is shown (the lesion table's id, the figure): 1 the largest, equal sizes in
    scan order. None when the mask is empty. The box keeps its place in space (a sub-grid of the mask's).
    """
    region = lesion_region(mask)
    if region is None:
        return None
    offset, size = region
    if list(size) != list(mask.GetSize()):
        mask = sitk.RegionOfInterest(mask, size, offset)
    if mask.GetPixelID() != sitk.sitkUInt8:
        mask = sitk.Cast(mask > 0, sitk.sitkUInt8)
    # Not relabelled by size with a second label volume's worth of sorting: the numbers are mapped.
    labels = sitk.ConnectedComponent(mask, fully_connected)
    shape = _shape_statistics(labels)
    by_size = sorted(shape.GetLabels(), key=lambda label: (-shape.GetNumberOfPixels(label), label))
    if by_size != list(range(1, len(by_size) + 1)):
        labels = sitk.ChangeLabel(
            labels, changeMap={float(old): float(new) for new, old in enumerate(by_size, 1)}
        )
    return labels, list(offset)


def in_scan_order(labels: sitk.Image) -> sitk.Image:
    """`labels` (lesions numbered 1.. from the largest down) with equal sizes numbered in this image's
    scan order, as `numbered_lesions` numbers them: labels found in another axis order (an input the
    pipeline reordered for its network) break ties in that order's."""
    array = sitk.GetArrayViewFromImage(labels).ravel()
    sizes = np.bincount(array)[1:]
    if len(np.unique(sizes)) == len(sizes):
        return labels
    values, first = np.unique(array, return_index=True)
    first_at = dict(zip(values.tolist(), first.tolist()))
    order = sorted(range(1, len(sizes) + 1), key=lambda k: (-sizes[k - 1], first_at[k]))
    if order == list(range(1, len(sizes) + 1)):
        return labels
    return sitk.ChangeLabel(labels, changeMap={float(old): float(new) for new, old in enumerate(order, 1)})


def _shape_statistics(labels: sitk.Image) -> sitk.LabelShapeStatisticsImageFilter:
    shape = sitk.LabelShapeStatisticsImageFilter()
    # On by default and used by nothing here: perimeters were 90 % of the filter's time on a mask that
    # fills the volume (0.66 s of 0.71 s on 8.9 million voxels).
    shape.ComputePerimeterOff()
    shape.Execute(labels)
    return shape


def numbered_mask(mask: sitk.Image, numbered: tuple[sitk.Image, list[int]] | None) -> tuple[sitk.Image, int]:
    """(the mask with each lesion's number as its value, the number of lesions): uint8, or uint16 past
    255 lesions, on the mask's grid; `numbered` is the mask's `numbered_lesions`, the table's numbers."""
    if numbered is None:
        return sitk.Cast(mask > 0, sitk.sitkUInt8), 0
    labels, offset = numbered
    count = int(sitk.GetArrayViewFromImage(labels).max())
    pixel = sitk.sitkUInt8 if count <= 255 else sitk.sitkUInt16
    full = sitk.Image(mask.GetSize(), pixel)
    full.CopyInformation(mask)
    return sitk.Paste(
        full, sitk.Cast(labels, pixel), labels.GetSize(), [0] * mask.GetDimension(), offset
    ), count


def lesion_table(
    mask: sitk.Image,
    probabilities: sitk.Image | None = None,
    fully_connected: bool = True,
    diameters: bool = True,
) -> list[dict]:
    """One row per connected lesion (largest first), clinical keys first.

    Clinical: id (the lesion number, also the figure's and the segments'), volume_ml (area_mm2 for 2D
    images), axial_diameter_mm and perpendicular_diameter_mm (RECIST / RANO, in the measurement plane:
    see `measure`), longest_diameter_mm (3D), centroid_ras_mm, and mean_probability when
    `probabilities` (on the mask's grid) is given: values 0..1, or uint8 values round(255 p).
    Technical: voxels, volume_mm3, centroid_lps_mm, bbox_index_start, bbox_index_size (voxels, x y z),
    bbox_ras_min_mm, bbox_ras_max_mm (the RAS axis-aligned box around the lesion's voxels, voxel edges
    included). diameters=False leaves the diameters out (a summary or a figure does not need them).
    """
    if probabilities is not None and not _same_grid(mask, probabilities):
        raise ValueError("probabilities must lie on the mask's grid")
    numbered = numbered_lesions(mask, fully_connected)
    return lesion_rows(numbered, probabilities, diameters=diameters, planar=is_planar(mask))


def is_planar(mask: sitk.Image) -> bool:
    """A 2D image held as a single-slice volume (a DICOM ultrasound frame, Slicer's 2D images): its
    lesions have areas, not volumes."""
    return mask.GetDimension() == 3 and mask.GetSize()[2] == 1


def lesion_rows(
    numbered: tuple[sitk.Image, list[int]] | None,
    probabilities: sitk.Image | None = None,
    diameters: bool = True,
    planar: bool = False,
) -> list[dict]:
    """`lesion_table`'s rows from a mask's `numbered_lesions` (for callers that need those too: the
    lesions are then labelled once); `probabilities` on the mask's grid; `planar`: `is_planar(mask)`."""
    if numbered is None:
        return []
    labels, offset = numbered
    label_array = sitk.GetArrayViewFromImage(labels)
    shape = _shape_statistics(labels)
    stats = None
    probability_unit = 1.0
    if probabilities is not None:
        probabilities = sitk.RegionOfInterest(probabilities, labels.GetSize(), offset)
        probability_unit = 255.0 if probabilities.GetPixelID() == sitk.sitkUInt8 else 1.0
        stats = sitk.LabelStatisticsImageFilter()
        stats.Execute(probabilities, labels)
    grid = Grid.from_image(labels)  # the lesions' box, on the mask's grid
    d = grid.dims
    rows = []
    for label in sorted(shape.GetLabels()):  # the lesion numbers, 1 the largest
        box = shape.GetBoundingBox(label)
        start, size = np.asarray(box[:d], dtype=float), np.asarray(box[d:], dtype=float)
        corners = []
        for c in range(2**d):
            index = [start[k] + size[k] - 0.5 if (c >> k) & 1 else start[k] - 0.5 for k in range(d)]
            corners.append(_lps_to_ras(grid.index_to_physical(index)))
        corners = np.stack(corners)
        centroid = np.asarray(shape.GetCentroid(label))
        physical_size = float(shape.GetPhysicalSize(label))
        row: dict = {"id": label}
        if d == 3 and not planar:
            row["volume_ml"] = physical_size / 1000.0
        else:
            row["area_mm2"] = physical_size / (grid.spacing[2] if planar else 1.0)
        if diameters:
            box_slices = tuple(slice(a, a + n) for a, n in zip(box[:d][::-1], box[d:][::-1]))
            found = measure.diameters(label_array[box_slices] == label, grid, tuple(box[:d]))
            row["axial_diameter_mm"] = found.axial_mm
            row["perpendicular_diameter_mm"] = found.perpendicular_mm
            row["longest_diameter_mm"] = found.longest_mm
        row["centroid_ras_mm"] = _lps_to_ras(centroid).tolist()
        if stats is not None:
            row["mean_probability"] = float(stats.GetMean(label)) / probability_unit
        row["voxels"] = int(shape.GetNumberOfPixels(label))
        if d == 3 and not planar:
            row["volume_mm3"] = physical_size
        row.update(
            {
                "centroid_lps_mm": centroid.tolist(),
                "bbox_index_start": [int(v) + o for v, o in zip(box[:d], offset)],
                "bbox_index_size": [int(v) for v in box[d:]],
                "bbox_ras_min_mm": corners.min(axis=0).tolist(),
                "bbox_ras_max_mm": corners.max(axis=0).tolist(),
            }
        )
        rows.append(row)
    return rows


def low_confidence(rows: list[dict], minimum: float | None) -> str | None:
    """A warning when the lesions' voxels average a probability below `minimum` (the card's
    plausibility.min_mean_probability): most of the mask is then voxels the model barely calls lesion.
    None when they do not, or when the table has no probabilities."""
    measured = [r for r in rows if "mean_probability" in r]
    if minimum is None or not measured:
        return None
    voxels = sum(r["voxels"] for r in measured)
    mean = sum(r["mean_probability"] * r["voxels"] for r in measured) / voxels
    if mean >= minimum:
        return None
    return (
        f"low confidence: the mask's voxels average a lesion probability of {mean:.2f}, below the "
        f"{minimum:g} expected of this model's lesions; check the result"
    )


# Decimals per column, by the column's unit: what a measurement at HR resolution can carry.
_DECIMALS = (("_ml", 3), ("_mm3", 1), ("_mm2", 1), ("_mm", 1), ("probability", 3))


def _rounded(key: str, value):
    if not isinstance(value, float):
        return value
    return round(value, next((n for suffix, n in _DECIMALS if key.endswith(suffix)), 4))


def _flatten(row: dict) -> dict:
    flat = {}
    for key, value in row.items():
        if isinstance(value, list):
            # "centroid_ras_mm" -> centroid_ras_x_mm, ...: the unit stays last.
            base, unit = (key[:-3], "_mm") if key.endswith("_mm") else (key, "")
            for axis, v in zip(_AXES, value):
                flat[f"{base}_{axis}{unit}"] = _rounded(f"{base}_{axis}{unit}", v)
        else:
            flat[key] = _rounded(key, value)
    return flat


def table_columns(dims: int, probabilities: bool = True, planar: bool = False) -> list[str]:
    """The CSV header of a `dims`-D lesion table (the same whether or not there are lesions); `planar`:
    of a single-slice volume."""
    box = sitk.Image([3, 3, 1] if planar else [3] * dims, sitk.sitkUInt8)
    box[(1, 1, 0) if planar else (1,) * dims] = 1
    probability = sitk.Cast(box, sitk.sitkFloat32) if probabilities else None
    return list(_flatten(lesion_table(box, probability)[0]))


def format_table(
    rows: list[dict], kind: str, meta: dict | None = None, columns: list[str] | None = None
) -> str:
    """The table as CSV text (vector columns split per axis; `columns` first, in order, so an empty
    table still has its header) or JSON text ({..., "lesions": [...]})."""
    if kind == ".json":
        document = {
            "coordinates": "physical millimetres; *_lps_* in SimpleITK/DICOM LPS, *_ras_* in Slicer RAS",
            **(meta or {}),
            "lesions": [_flatten_rounded(r) for r in rows],
        }
        return json.dumps(document, indent=2) + "\n"
    flat = [_flatten(r) for r in rows]
    names: list[str] = [c for c in ("case",) if any(c in r for r in flat)] + list(columns or [])
    for r in flat:
        names += [c for c in r if c not in names]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=names or ["id"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buffer.getvalue()


def _flatten_rounded(row: dict) -> dict:
    """A JSON row: vectors kept as lists, every number rounded like the CSV's."""
    return {k: [_rounded(k, x) for x in v] if isinstance(v, list) else _rounded(k, v) for k, v in row.items()}


def check_table_path(path: str | os.PathLike) -> str:
    kind = split_extension(path)[1]
    if kind not in (".csv", ".json"):
        raise UserError(f"lesion table {path}: use a name ending in .csv or .json")
    return kind


def write_lesion_table(
    rows: list[dict],
    path: str | os.PathLike,
    overwrite: bool = False,
    meta: dict | None = None,
    staging: Staging | None = None,
    columns: list[str] | None = None,
) -> Path:
    """Write the table atomically (or into `staging`); the format follows the extension (.csv or .json).

    A CSV table's `meta` (provenance) goes into a sidecar `<table>.provenance.json`; a JSON table holds it.
    """
    kind = check_table_path(path)
    if kind == ".csv" and meta:
        write_text(json.dumps(meta, indent=2) + "\n", provenance_path(path), overwrite, staging)
    return write_text(format_table(rows, kind, meta, columns), path, overwrite, staging)


def provenance_path(table: str | os.PathLike) -> Path:
    stem, _ = split_extension(table)
    return Path(table).with_name(f"{Path(stem).name}.provenance.json")
