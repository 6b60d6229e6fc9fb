"""Whole-image LR generators for robustness evaluation: the ways low-resolution images are really made.

Each generator turns an HR image (cropped to a multiple of the scale) into an LR image on the
corner-aligned LR grid (`geometry.lr_grid`), except "hr", which hands the HR image itself to the engine
(which brings it to its working grid). They are written independently of the training synthesis
(`degrade.py`), so a model is scored on images it was not made from, and "lanczos" is a kernel family
training never uses.

- block: the mean of each block of HR voxels (the training default).
- gaussian-linear / gaussian-bspline: SimpleITK's recursive Gaussian with the FWHM rule
  (sigma = sqrt(s_lr^2 - s_hr^2) / 2.355 mm per axis), then linear / B-spline resampling, as common
  tools make a 2 mm image from a 1 mm one. Leaves smoothing tails and ringing around the head.
- kspace: the HR spectrum truncated to the LR band (what an MRI acquisition at the lower resolution
  measures), sampled at the LR voxel centres.
- decimate: every scale-th HR voxel, no anti-aliasing.
- lanczos: a Lanczos-3 kernel stretched to the LR spacing (an anti-aliasing resampler as in image
  libraries).
- thick-slice-5mm (3D): 5 mm slices (box profile) along the volume's last axis, block-averaged in plane,
  resampled linearly to the LR grid, as a routine thick-slice scan reaches a 2 mm working grid.
- rician-2pct: block averaging, then Rician noise of 2 % of the intensity range.
- hr: the HR image itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import SimpleITK as sitk

from ..io import geometry
from ..io.geometry import Grid

THICK_SLICE_MM = 5.0


def _separable(array: np.ndarray, matrices: list[np.ndarray | None]) -> np.ndarray:
    """Apply one (n_out, n_in) matrix along each numpy axis (None: leave the axis)."""
    out = np.asarray(array, dtype=np.float64)
    for axis, matrix in enumerate(matrices):
        if matrix is not None:
            out = np.moveaxis(np.tensordot(matrix, out, axes=([1], [axis])), 0, axis)
    return out.astype(np.float32)


def _centres(n_lr: int, factor: float) -> np.ndarray:
    """LR voxel centres in HR index units (HR voxel i spans [i - 0.5, i + 0.5])."""
    return factor * (np.arange(n_lr) + 0.5) - 0.5


def _interpolation(positions: np.ndarray, n_in: int) -> np.ndarray:
    """Linear interpolation at `positions` (input index units; edges extended)."""
    positions = np.clip(positions, 0, n_in - 1)
    low = np.minimum(np.floor(positions).astype(int), n_in - 2) if n_in > 1 else np.zeros(len(positions), int)
    weight = positions - low
    matrix = np.zeros((len(positions), n_in))
    rows = np.arange(len(positions))
    matrix[rows, low] += 1 - weight
    if n_in > 1:
        matrix[rows, low + 1] += weight
    return matrix


def _kernel_matrix(n_lr: int, n_hr: int, factor: float, kernel: Callable, support: float) -> np.ndarray:
    """Rows: `kernel` of (HR index - LR centre) / factor, normalised to sum 1 (truncated at the edges)."""
    offsets = np.arange(n_hr)[None, :] - _centres(n_lr, factor)[:, None]
    weights = np.where(np.abs(offsets) < support * factor, kernel(offsets / factor), 0.0)
    return weights / weights.sum(axis=1, keepdims=True)


def block_matrix(n_lr: int, factor: int) -> np.ndarray:
    return np.kron(np.eye(n_lr), np.full((1, factor), 1.0 / factor))


def lanczos_matrix(n_lr: int, n_hr: int, factor: int, lobes: int = 3) -> np.ndarray:
    return _kernel_matrix(n_lr, n_hr, factor, lambda t: np.sinc(t) * np.sinc(t / lobes), lobes)


def kspace_matrix(n_lr: int, n_hr: int) -> np.ndarray:
    """Keep the n_lr lowest frequencies of an n_hr-sample axis and sample at the LR voxel centres."""
    factor = n_hr / n_lr
    freqs = np.fft.fftfreq(n_hr)
    keep = np.abs(freqs) < 0.5 / factor
    centres = _centres(n_lr, factor)
    # x(t) = 1/N sum_k X_k exp(2 pi i f_k t): the band-limited signal evaluated at the centres.
    basis = np.exp(2j * np.pi * centres[:, None] * freqs[None, keep])
    dft = np.exp(-2j * np.pi * freqs[keep][:, None] * np.arange(n_hr)[None, :])
    return np.real(basis @ dft) / n_hr


def thick_slice_matrix(n_lr: int, n_hr: int, factor: int, thickness: int) -> np.ndarray:
    """Box slices of `thickness` HR voxels (whole slices only), then linear interpolation to the LR
    centres."""
    n_thick = n_hr // thickness
    slices = np.kron(np.eye(n_thick), np.full((1, thickness), 1.0 / thickness))
    slices = np.pad(slices, ((0, 0), (0, n_hr - slices.shape[1])))
    positions = (_centres(n_lr, factor) - (thickness - 1) / 2) / thickness  # in slice index units
    return _interpolation(positions, n_thick) @ slices


def _matrices(kind: str, shape: tuple[int, ...], scale: int, hr_spacing: list[float]) -> list[np.ndarray]:
    out = []
    for axis, n in enumerate(shape):
        n_lr = n // scale
        if kind == "block":
            out.append(block_matrix(n_lr, scale))
        elif kind == "decimate":
            out.append(np.eye(n)[::scale][:n_lr])
        elif kind == "lanczos":
            out.append(lanczos_matrix(n_lr, n, scale))
        elif kind == "kspace":
            out.append(kspace_matrix(n_lr, n))
        elif kind == "thick" and axis == 0:
            thickness = max(scale, int(round(THICK_SLICE_MM / hr_spacing[::-1][axis])))
            out.append(thick_slice_matrix(n_lr, n, scale, thickness))
        else:  # thick-slice in plane
            out.append(block_matrix(n_lr, scale))
    return out


def _per_channel(image: sitk.Image, make: Callable[[sitk.Image], sitk.Image]) -> sitk.Image:
    if image.GetNumberOfComponentsPerPixel() == 1:
        return make(image)
    channels = [sitk.VectorIndexSelectionCast(image, c) for c in range(image.GetNumberOfComponentsPerPixel())]
    return sitk.Compose([make(c) for c in channels])


def _like_source(lr: sitk.Image, source: sitk.Image) -> sitk.Image:
    """8-bit images stay 8-bit (a real LR photograph or ultrasound frame is); others stay float32."""
    if source.GetPixelID() in (sitk.sitkUInt8, sitk.sitkVectorUInt8):
        return sitk.Cast(sitk.Clamp(sitk.Round(lr), sitk.sitkFloat32, 0, 255), sitk.sitkUInt8)
    return lr


def _matrix_generator(kind: str) -> Callable:
    def make(hr: sitk.Image, scale: int, rng: np.random.Generator) -> sitk.Image:
        grid = geometry.lr_grid(Grid.from_image(hr), scale)

        def one(channel: sitk.Image) -> sitk.Image:
            array = sitk.GetArrayFromImage(channel).astype(np.float32)
            matrices = _matrices(kind, array.shape, scale, list(hr.GetSpacing()))
            return _like_source(grid.image_from_array(_separable(array, matrices)), channel)

        return _per_channel(hr, one)

    return make


def _sitk_generator(interpolator: int) -> Callable:
    def make(hr: sitk.Image, scale: int, rng: np.random.Generator) -> sitk.Image:
        grid = geometry.lr_grid(Grid.from_image(hr), scale)
        sigma = [math.sqrt((scale * s) ** 2 - s**2) / 2.355 for s in hr.GetSpacing()]

        def one(channel: sitk.Image) -> sitk.Image:
            smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(channel, sitk.sitkFloat32), sigma)
            lr = sitk.Resample(
                smooth, grid.reference_image(), sitk.Transform(), interpolator, 0.0, sitk.sitkFloat32
            )
            return _like_source(lr, channel)

        return _per_channel(hr, one)

    return make


def rician(percent: float) -> Callable:
    """The generator of block averages with Rician noise of `percent` of each channel's range."""

    def make(hr: sitk.Image, scale: int, rng: np.random.Generator) -> sitk.Image:
        def one(channel: sitk.Image) -> sitk.Image:
            lr = geometry.make_lr_image(sitk.Cast(channel, sitk.sitkFloat32), scale)
            array = sitk.GetArrayFromImage(lr)
            low = float(array.min())
            sd = percent / 100 * (float(array.max()) - low)
            noisy = low + np.hypot(
                array - low + rng.normal(0, sd, array.shape), rng.normal(0, sd, array.shape)
            )
            out = Grid.from_image(lr).image_from_array(noisy.astype(np.float32))
            return _like_source(out, channel)

        return _per_channel(hr, one)

    return make


# name -> (generator(hr_image, scale, rng) -> LR image, dimensions it applies to)
GENERATORS: dict[str, tuple[Callable, tuple[int, ...]]] = {
    "block": (_matrix_generator("block"), (2, 3)),
    "gaussian-linear": (_sitk_generator(sitk.sitkLinear), (2, 3)),
    "gaussian-bspline": (_sitk_generator(sitk.sitkBSpline), (2, 3)),
    "kspace": (_matrix_generator("kspace"), (2, 3)),
    "decimate": (_matrix_generator("decimate"), (2, 3)),
    "lanczos": (_matrix_generator("lanczos"), (2, 3)),
    "thick-slice-5mm": (_matrix_generator("thick"), (3,)),
    "rician-2pct": (rician(2), (2, 3)),
    "hr": (lambda hr, scale, rng: hr, (2, 3)),
}


def names_for(dims: int) -> list[str]:
    return [name for name, (_, applies) in GENERATORS.items() if dims in applies]


def make_lr(name: str, hr_image: sitk.Image, scale: int, seed: int = 0) -> sitk.Image:
    """The LR input generator `name` makes of `hr_image` (cropped to a multiple of `scale`)."""
    make, _ = GENERATORS[name]
    return make(geometry.crop_to_multiple(hr_image, scale), scale, np.random.default_rng(seed))
