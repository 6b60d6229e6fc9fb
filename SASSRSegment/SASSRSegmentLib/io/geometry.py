"""Image grids and the LR/HR rule that training, inference and evaluation all share.

A grid is SimpleITK's: size (x, y[, z]), spacing, origin (centre of voxel 0) and direction cosines. Its
physical extent along axis k runs from -s_k/2 to (n_k - 1/2) s_k in index space. An HR grid made from
an LR grid by `hr_grid` covers exactly the same extent, so an HR mask overlays its LR image exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..runtime.errors import UserError

_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}


@dataclass(frozen=True)
class Grid:
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def from_image(cls, image: sitk.Image) -> Grid:
        return cls(
            tuple(int(v) for v in image.GetSize()),
            tuple(float(v) for v in image.GetSpacing()),
            tuple(float(v) for v in image.GetOrigin()),
            tuple(float(v) for v in image.GetDirection()),
        )

    @property
    def dims(self) -> int:
        return len(self.size)

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(self.dims, self.dims)

    def index_to_physical(self, index) -> np.ndarray:
        """Continuous (x, y[, z]) index to physical (LPS) point."""
        idx = np.asarray(index, dtype=float)
        return np.asarray(self.origin) + self.matrix @ (idx * np.asarray(self.spacing))

    def physical_to_index(self, point) -> np.ndarray:
        offset = np.asarray(point, dtype=float) - np.asarray(self.origin)
        return np.linalg.solve(self.matrix, offset) / np.asarray(self.spacing)

    def sub_grid(self, start, size) -> Grid:
        """The grid of the index box `start` (x, y[, z]) of `size` voxels: the same voxels, in place."""
        origin = self.index_to_physical(start)
        return Grid(
            tuple(int(n) for n in size), self.spacing, tuple(float(v) for v in origin), self.direction
        )

    def extent_corners(self) -> np.ndarray:
        """The 2**dims physical corners of the grid's extent (voxel edges, not centres)."""
        lo = -0.5 * np.ones(self.dims)
        hi = np.asarray(self.size, dtype=float) - 0.5
        corners = [
            self.index_to_physical([hi[k] if (c >> k) & 1 else lo[k] for k in range(self.dims)])
            for c in range(2**self.dims)
        ]
        return np.stack(corners)

    def reference_image(self, pixel_type: int = sitk.sitkUInt8) -> sitk.Image:
        image = sitk.Image(list(self.size), pixel_type)
        return self.apply(image)

    def apply(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def image_from_array(self, array: np.ndarray) -> sitk.Image:
        """Wrap a numpy array in (z, y, x) order as an image on this grid."""
        if tuple(array.shape[::-1]) != self.size:
            raise ValueError(f"array shape {array.shape} does not match grid size {self.size} (x, y, z)")
        return self.apply(sitk.GetImageFromArray(array))


def hr_grid(lr: Grid, scale: int) -> Grid:
    """The grid `scale` times finer than `lr` covering exactly the same physical extent."""
    hr_spacing = np.asarray(lr.spacing) / scale
    origin = np.asarray(lr.origin) - lr.matrix @ ((scale - 1) / 2 * hr_spacing)
    return Grid(
        tuple(n * scale for n in lr.size),
        tuple(float(s) for s in hr_spacing),
        tuple(float(v) for v in origin),
        lr.direction,
    )


def lr_grid(hr: Grid, scale: int) -> Grid:
    """The inverse of `hr_grid`; every size must be a multiple of `scale`."""
    if any(n % scale for n in hr.size):
        raise ValueError(f"grid size {hr.size} is not a multiple of {scale}; crop_to_multiple first")
    hr_spacing = np.asarray(hr.spacing)
    origin = np.asarray(hr.origin) + hr.matrix @ ((scale - 1) / 2 * hr_spacing)
    return Grid(
        tuple(n // scale for n in hr.size),
        tuple(float(s) for s in hr_spacing * scale),
        tuple(float(v) for v in origin),
        hr.direction,
    )


def working_lr_grid(grid: Grid, prep: dict) -> Grid:
    """The LR grid the network sees for an input on `grid`, per the model card's preprocessing.

    3D models use a fixed LR spacing (`lr_spacing`); 2D models an isotropic spacing that gives the
    longer side `lr_longer_side` pixels. The grid starts at the input's extent corner and covers the
    whole input (it may overshoot by less than one LR voxel), with the input's direction. When the
    input already has the working spacing, the two grids coincide voxel for voxel.
    """
    extent = np.asarray(grid.size) * np.asarray(grid.spacing)
    if prep.get("lr_spacing"):
        spacing = np.asarray(prep["lr_spacing"], dtype=float)
        if spacing.size != grid.dims:
            raise UserError(
                f"the model expects {spacing.size}D images but the input is {grid.dims}D; "
                f"choose a {grid.dims}D model with --model"
            )
    elif prep.get("lr_longer_side"):
        spacing = np.full(grid.dims, extent.max() / float(prep["lr_longer_side"]))
    else:
        raise ValueError("preprocessing needs 'lr_spacing' or 'lr_longer_side'")
    size = [max(1, math.ceil(e / s - 1e-6)) for e, s in zip(extent, spacing)]
    corner = grid.index_to_physical(-0.5 * np.ones(grid.dims))
    origin = corner + grid.matrix @ (spacing / 2)
    return Grid(
        tuple(size), tuple(float(s) for s in spacing), tuple(float(v) for v in origin), grid.direction
    )


def training_hr_grid(case_grid: Grid, prep: dict) -> Grid:
    """The HR working grid a training case is resampled onto (its LR input is made by block averaging)."""
    return hr_grid(working_lr_grid(case_grid, prep), int(prep["scale"]))


def resample(
    image: sitk.Image,
    grid: Grid,
    interpolator: str = "linear",
    antialias: bool = True,
    default_value: float = 0.0,
    extrapolate: bool = True,
) -> sitk.Image:
    """Resample `image` onto `grid` (float32 output for linear/bspline).

    When the target spacing is coarser than the source's, a Gaussian of standard deviation
    (target - source) / 2 per axis removes what the coarser grid cannot represent (aliasing).
    Outside the input, values are extrapolated from the nearest voxel, so a grid that overshoots
    the input by a fraction of a voxel sees no artificial dark border; without `extrapolate`, they
    are `default_value`.
    """
    if interpolator != "nearest":
        image = sitk.Cast(image, sitk.sitkFloat32)
        if antialias:
            src = np.asarray(image.GetSpacing())
            dst = np.asarray(grid.spacing)
            if not np.allclose(grid.direction, image.GetDirection(), atol=1e-6):
                # Axes do not correspond: smooth isotropically for the finest target spacing.
                dst = np.full_like(src, dst.min())
            variance = (np.maximum(dst - src, 0) / 2) ** 2
            if np.any(variance > 0):
                image = sitk.DiscreteGaussian(image, variance.tolist(), 64, 0.01, True)
    return sitk.Resample(
        image,
        list(grid.size),
        sitk.Transform(),
        _INTERPOLATORS[interpolator],
        grid.origin,
        grid.spacing,
        grid.direction,
        default_value,
        image.GetPixelID(),
        extrapolate,  # nearest-neighbour extrapolation outside the input
    )


def resample_label(label: sitk.Image, grid: Grid) -> sitk.Image:
    """Resample a binary mask by interpolating its indicator and thresholding at 0.5 (uint8 output).

    Unlike nearest neighbour, this keeps a lesion's area when the grid changes resolution.
    """
    indicator = sitk.Cast(label > 0, sitk.sitkFloat32)
    return sitk.Cast(resample(indicator, grid, "linear", antialias=True) >= 0.5, sitk.sitkUInt8)


def crop_to_multiple(image: sitk.Image, scale: int) -> sitk.Image:
    """Crop the far end of each axis so every size is a multiple of `scale` (origin unchanged)."""
    size = [n - n % scale for n in image.GetSize()]
    if any(n == 0 for n in size):
        raise UserError(f"image of size {image.GetSize()} is smaller than the scale factor {scale}")
    if list(size) == list(image.GetSize()):
        return image
    return sitk.RegionOfInterest(image, size, [0] * image.GetDimension())


def downsample_block(array: np.ndarray, scale, spatial_dims: int | None = None) -> np.ndarray:
    """Mean over each block of the last `spatial_dims` axes (all axes by default): `scale` voxels a side,
    or `scale[i]` along spatial axis i (numpy order).

    This is how an LR voxel integrates the HR voxels it covers, and it keeps the physical extent.
    """
    d = array.ndim if spatial_dims is None else spatial_dims
    lead, spatial = array.shape[: array.ndim - d], array.shape[array.ndim - d :]
    factors = [int(scale)] * d if np.isscalar(scale) else [int(f) for f in scale]
    if any(n % f for n, f in zip(spatial, factors)):
        raise ValueError(f"spatial shape {spatial} is not a multiple of {scale}")
    shape = list(lead)
    for n, f in zip(spatial, factors):
        shape += [n // f, f]
    axes = tuple(len(lead) + 2 * i + 1 for i in range(d))
    return array.reshape(shape).mean(axis=axes, dtype=np.float64).astype(np.float32)


def block_factors(source: Grid, target: Grid) -> tuple[int, ...] | None:
    """Whole numbers of `source` voxels per `target` voxel along each axis (x, y, z order) when the
    target's voxels are tiled exactly by the source's (same direction, integer spacing ratios, a shared
    extent corner); None otherwise."""
    if source.dims != target.dims or not np.allclose(source.direction, target.direction, atol=1e-6):
        return None
    ratio = np.asarray(target.spacing) / np.asarray(source.spacing)
    factors = np.rint(ratio)
    if np.any(factors < 1) or not np.allclose(ratio, factors, rtol=1e-4):
        return None
    corners = [g.index_to_physical(-0.5 * np.ones(g.dims)) for g in (source, target)]
    if not np.allclose(corners[0], corners[1], atol=1e-3 * min(source.spacing)):
        return None
    return tuple(int(f) for f in factors)


def block_average_onto(array: np.ndarray, factors: tuple[int, ...], target: Grid) -> np.ndarray:
    """`array` (numpy order, on a grid tiling `target` by `factors`, see `block_factors`) averaged onto
    `target`. A target that overshoots the array's far end sees the edge voxels repeated, as
    `resample`'s extrapolation does."""
    factors = factors[::-1]
    want = [n * f for n, f in zip(target.size[::-1], factors)]
    array = array[tuple(slice(0, w) for w in want)]
    pad = [(0, w - n) for w, n in zip(want, array.shape)]
    if any(p for _, p in pad):
        array = np.pad(array, pad, mode="edge")
    return downsample_block(array, factors)


def make_lr_image(hr_image: sitk.Image, scale: int) -> sitk.Image:
    """The LR image of an HR image, exactly as training makes it: crop to a multiple, block average."""
    hr_image = crop_to_multiple(hr_image, scale)
    array = sitk.GetArrayFromImage(hr_image).astype(np.float32)
    components = hr_image.GetNumberOfComponentsPerPixel()
    if components > 1:  # (z, y, x, c): average each component
        array = np.moveaxis(
            downsample_block(np.moveaxis(array, -1, 0), scale, hr_image.GetDimension()), 0, -1
        )
        lr = sitk.GetImageFromArray(array, isVector=True)
    else:
        lr = sitk.GetImageFromArray(downsample_block(array, scale))
    return lr_grid(Grid.from_image(hr_image), scale).apply(lr)


def roi_region(grid: Grid, ras_bounds: list[float]) -> tuple[list[int], list[int]]:
    """Index region (start, size) of `grid` covering a box given in RAS millimetres (Slicer's convention).

    `ras_bounds` is (xmin, xmax, ymin, ymax[, zmin, zmax]); SimpleITK is LPS, so x and y change sign.
    Raises UserError when the box misses the image.
    """
    d = grid.dims
    if len(ras_bounds) != 2 * d:
        raise UserError(
            f"--roi needs {2 * d} numbers for a {d}D image (xmin xmax ymin ymax{' zmin zmax' * (d == 3)})"
        )
    lo = np.asarray(ras_bounds[0::2], dtype=float)
    hi = np.asarray(ras_bounds[1::2], dtype=float)
    if np.any(hi <= lo):
        raise UserError("--roi: each max must be larger than its min")
    flip = np.ones(d)
    flip[:2] = -1
    indices = []
    for c in range(2**d):
        ras = np.array([hi[k] if (c >> k) & 1 else lo[k] for k in range(d)])
        indices.append(grid.physical_to_index(ras * flip))
    indices = np.stack(indices)
    start = np.maximum(np.floor(indices.min(axis=0) + 0.5), 0).astype(int)
    stop = np.minimum(np.ceil(indices.max(axis=0) - 0.5) + 1, grid.size).astype(int)
    if np.any(stop <= start):
        raise UserError("--roi does not overlap the image; check that it is given in RAS millimetres")
    return start.tolist(), (stop - start).tolist()


def same_grid(a: Grid, b: Grid) -> bool:
    """Equal up to float rounding in the headers (origins within 1e-4 voxel)."""
    return (
        a.size == b.size
        and np.allclose(a.spacing, b.spacing, rtol=1e-6)
        and np.allclose(a.origin, b.origin, atol=1e-4 * min(a.spacing))
        and np.allclose(a.direction, b.direction, atol=1e-6)
    )


def orientation(image: sitk.Image) -> str:
    """Where a 3D image's array axes point, in DICOM letters (x, y, z; "LPS" for the identity
    direction), the nearest ones for an oblique image."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def reorient(image: sitk.Image, axes: str | None) -> sitk.Image:
    """The same voxels in the same places, stored with their array axes permuted and flipped to point as
    `axes` says (DICOM letters, see `orientation`): no interpolation, and the inverse is `reorient(out,
    orientation(image))`. `image` itself when it already points so, for None, and for 2D images.

    A network learns the axis order of its training images. The shipped brain model, trained on axial
    volumes, found 7 mL of the shipped sample's lesion stored as a sagittal 3D acquisition is
    (left-right the slowest axis; Dice 0.16 against the expert), and 37.5 mL stored axially (0.61)."""
    if axes is None or image.GetDimension() != 3 or orientation(image) == axes:
        return image
    return sitk.DICOMOrient(image, axes)


def reoriented_spacing(spacing, direction, axes: str | None) -> tuple[float, ...]:
    """The voxel spacing an image of this spacing and direction has after `reorient(image, axes)`."""
    probe = sitk.Image([1] * len(spacing), sitk.sitkUInt8)
    probe.SetSpacing([float(s) for s in spacing])
    probe.SetDirection([float(v) for v in direction])
    return tuple(reorient(probe, axes).GetSpacing())
