"""Random LR synthesis for training: the network's input made of an HR patch the ways real
low-resolution images are made, so a model trained on block averages does not meet a different
image at inference.

Block averaging (`sampling.lr_from_hr`) is the cleanest LR image there is: no blur beyond the voxel,
no aliasing, no noise. Real scans are acquired or resampled at the lower resolution and carry the
marks of how. With `"degradation": "random"` every training patch gets, per axis independently, one
of these operators (each an (n_lr, n_hr) matrix applied separably, rows summing to 1):

- block averaging (1/5): the default's input, kept so the clean case stays in the mix;
- Gaussian anti-aliasing then linear or cubic interpolation at the LR voxel centres (2/5): what
  resampling tools do. Sigma is 0.3-1.6x the FWHM rule sigma = sqrt(s_lr^2 - s_hr^2) / 2.355, since
  tools use anything from a light smoothing to more than the rule;
- k-space truncation (1/5): an MRI acquired at the lower resolution measures only the central band
  of the spectrum; the lowest n_lr cosines of the patch (a DCT: the mirror extension keeps the
  patch's cut edges from ringing as if the field of view ended there), with or without a Tukey taper
  of the band edge (a scanner's apodisation), so sharp edges ring as they do on real scans;
- plain decimation (1/5): one HR voxel per LR voxel, no anti-aliasing, at a random phase in the
  block: aliased, and shifted by up to (scale - 1) / 2 HR voxels against the block centres, as a
  decimated image placed on the block-centred grid is;

and in 3D, with probability 0.2, thick slices along one axis instead: slices 3-6 mm thick (the
routine 2D-acquisition range) with a box or Gaussian slice profile, sampled every slice thickness
at a random phase, then interpolated linearly to the LR grid, as the engine does when it resamples a
thick-slice scan to its working grid.

Then, on the LR patch, in the order a scanner adds them:
- MRI only, probability 0.5: a smooth multiplicative bias field (coil sensitivity), at most
  +-0.3 (uniform), from a random 3-point-per-axis lattice;
- noise, always, its standard deviation log-uniform in 0.5-8 % of the tissue's intensity range
  (1st to 99th percentile; from barely visible to a noisy low-field scan): Rician-like for MRI
  (the magnitude of a complex signal with Gaussian noise in both parts), multiplicative speckle for
  8-bit images (ultrasound), Gaussian otherwise (CT);
- rounding to the stored precision: 8-bit images always (real LR ultrasound frames are 8-bit); MRI
  with probability 0.3, to 255 levels (an 8-bit export) or to 256-4096 levels of the tissue range
  (integer scanner values); CT always to whole HU;
- MRI: the tissue values re-standardised (`restandardise`) as the normaliser z-scores a real LR scan
  by its own statistics. Without it training sees a thick-slice patch with the fifth of its contrast
  the slices took, where `segment` shows the network that contrast restored (on the shipped brain
  model: Dice 0.48 against 0.67 on the weakest validation case's 5 mm slices, only from the order of
  normalising and degrading). The statistics are the whole case's through the patch's operators
  (`scan_statistics`, plus what the patch's noise added), as the normaliser sees a whole scan: a
  patch's own gain is 1-9 % below its scan's, and would undo the intensity augmentation's scaling.

The HR patch is already normalised (data/cache.py). For MRI the normaliser sets everything outside
the tissue to 0, noise included, and writes a rim voxel as `f * z(tissue)`; so the bias, noise and
rounding act on the tissue value t = v / f of each voxel with tissue fraction f (the HR tissue
indicator through the same operators) of at least the normaliser's `TISSUE_LEVEL`, and the result is
multiplied back by f; voxels below it are set to 0. So the background is exactly 0, the blur and
ringing that spill into it are gone, and the rim stays a partial volume, as at inference. Intensity scale, shift and gamma are
`sampling.Augmentation`'s, applied to the HR patch before this.

Cost: one 3D patch (96^3 -> 48^3) is three small matrix products per channel plus noise, about 20 ms
on one core; the scan's statistics (a 156x190x176 brain, prepared once as a `Scan`) add about 30 ms,
next to 2.5 s for a training step of four patches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .normalization import TISSUE_LEVEL, erode

DEGRADATIONS = ("block", "random")
# Fixed LR inputs training can validate on (`fixed_matrices`): one setting of each operator family, so
# the checkpoint kept is the best over several ways LR images are made, not over block averages alone.
FIXED_INPUTS = ("block", "gaussian-linear", "kspace", "decimate", "thick-slice-5mm")
# The contrast gains restandardise may apply (whole validation scans measured 1.05-1.27).
GAIN_RANGE = (0.67, 1.5)
FWHM = 2 * math.sqrt(2 * math.log(2))  # 2.355: a Gaussian's full width at half maximum per sigma


def lr_centres(n_lr: int, scale: int) -> np.ndarray:
    """LR voxel centres in HR index units (HR voxel i spans [i - 0.5, i + 0.5])."""
    return scale * (np.arange(n_lr) + 0.5) - 0.5


def block_matrix(n_lr: int, scale: int) -> np.ndarray:
    return np.kron(np.eye(n_lr), np.full((1, scale), 1.0 / scale))


def _keys(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel (a = -0.5): interpolates, and reproduces quadratics."""
    t = np.abs(t)
    return np.where(
        t < 1, 1.5 * t**3 - 2.5 * t**2 + 1, np.where(t < 2, -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2, 0.0)
    )


def interpolation_matrix(positions: np.ndarray, n: int, cubic: bool = False) -> np.ndarray:
    """Linear or cubic interpolation of an n-sample axis at `positions` (index units, clamped to the
    axis). Where the cubic's four taps would leave the axis it falls back to linear, so a linear ramp
    is reproduced exactly everywhere."""
    positions = np.clip(np.asarray(positions, dtype=float), 0, n - 1)
    matrix = np.zeros((len(positions), n))
    rows = np.arange(len(positions))
    low = np.minimum(np.floor(positions).astype(int), max(0, n - 2))
    frac = positions - low
    matrix[rows, low] += 1 - frac
    matrix[rows, np.minimum(low + 1, n - 1)] += frac
    if cubic:
        inside = (low >= 1) & (low + 2 <= n - 1)
        taps = low[inside, None] + np.arange(-1, 3)[None, :]
        sub = np.zeros((int(inside.sum()), n))
        np.put_along_axis(sub, taps, _keys(taps - positions[inside, None]), axis=1)
        matrix[inside] = sub
    return matrix


def gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) Gaussian smoothing; near the edges each row is cut symmetrically about its voxel (and
    renormalised), so smoothing keeps a ramp a ramp instead of bending it at the edges."""
    if sigma <= 0:
        return np.eye(n)
    reach = int(math.ceil(3 * sigma))
    i = np.arange(n)
    offsets = i[None, :] - i[:, None]
    half = np.minimum(reach, np.minimum(i, n - 1 - i))[:, None]
    weights = np.where(np.abs(offsets) <= half, np.exp(-0.5 * (offsets / sigma) ** 2), 0.0)
    return weights / weights.sum(axis=1, keepdims=True)


def gaussian_interpolation_matrix(n_lr: int, scale: int, sigma: float, cubic: bool) -> np.ndarray:
    """Gaussian anti-aliasing (sigma in HR voxels) then interpolation at the LR voxel centres."""
    n = n_lr * scale
    return interpolation_matrix(lr_centres(n_lr, scale), n, cubic) @ gaussian_matrix(n, sigma)


def kspace_matrix(n_lr: int, scale: int, taper: float = 0.0) -> np.ndarray:
    """The n_lr lowest cosines (DCT-II) of the HR axis, evaluated at the LR voxel centres; `taper` is
    the Tukey fraction of the kept band rolled off to zero (0: a hard cut)."""
    n = n_lr * scale
    k = np.arange(n_lr)
    weight = np.ones(n_lr)
    if taper > 0:
        start = (1 - taper) * n_lr
        rolled = k >= start
        weight[rolled] = 0.5 * (1 + np.cos(np.pi * (k[rolled] - start) / (taper * n_lr)))
    norm = np.where(k == 0, 1.0, 2.0) / n  # orthonormal DCT pair, folded into one factor
    hr_basis = np.cos(np.pi * k[:, None] * (np.arange(n)[None, :] + 0.5) / n)
    lr_basis = np.cos(np.pi * k[None, :] * (lr_centres(n_lr, scale)[:, None] + 0.5) / n)
    return (lr_basis * (weight * norm)[None, :]) @ hr_basis


def decimation_matrix(n_lr: int, scale: int, phase: int) -> np.ndarray:
    """HR voxel `phase` of each block (0 <= phase < scale)."""
    return np.eye(n_lr * scale)[phase::scale]


def thick_slice_matrix(
    n_lr: int, scale: int, thickness: float, phase: float, profile: str = "box", spacing: float = 0.0
) -> np.ndarray:
    """Slices `thickness` HR voxels thick, centred at phase + k * spacing (box or Gaussian profile of
    that FWHM; `spacing` 0: the thickness, no gap between slices), then linear interpolation to the LR
    voxel centres.

    A slice cut by the patch edge is renormalised to the part inside and placed at that part's
    centroid, so a ramp still comes out a ramp; LR centres beyond the outermost slice centroids take
    that slice's value, as resampling a scan near its last slice does.
    """
    n = n_lr * scale
    i = np.arange(n)
    step = max(spacing, thickness)
    centres = np.arange(phase - step, n + step, step)
    if profile == "box":  # exact overlap of each HR voxel with the slab
        lo = np.maximum(i[None, :] - 0.5, centres[:, None] - thickness / 2)
        hi = np.minimum(i[None, :] + 0.5, centres[:, None] + thickness / 2)
        weights = np.clip(hi - lo, 0.0, None)
    else:
        sigma = thickness / FWHM
        d = i[None, :] - centres[:, None]
        weights = np.where(np.abs(d) <= thickness, np.exp(-0.5 * (d / sigma) ** 2), 0.0)
    # Slices with less than a quarter of their profile inside the patch are too cut to place well.
    full = thickness if profile == "box" else sigma * math.sqrt(2 * math.pi)
    keep = weights.sum(axis=1) >= 0.25 * full
    slices = weights[keep] / weights[keep].sum(axis=1, keepdims=True)
    centroids = slices @ i
    targets = lr_centres(n_lr, scale)
    index = np.interp(targets, centroids, np.arange(len(centroids)))  # clamps beyond the ends
    return interpolation_matrix(index, len(centroids)) @ slices


def fixed_matrices(
    name: str, shape: Sequence[int], scale: int, hr_spacing: Sequence[float]
) -> list[np.ndarray]:
    """The (n_lr, n_hr) operators of the fixed LR input `name` (FIXED_INPUTS) for an HR image of
    `shape`: the FWHM-rule Gaussian with linear interpolation, a hard k-space cut, decimation at phase
    0, or 5 mm box slices along the first axis from its first voxel (block averages in the others, and
    along the first where 5 mm is no thicker than an LR voxel); `hr_spacing` in mm, numpy axis order."""
    out = []
    for axis, n in enumerate(shape):
        n_lr = n // scale
        if name == "thick-slice-5mm" and axis == 0 and len(shape) == 3 and 5.0 / hr_spacing[0] > scale:
            thickness = 5.0 / float(hr_spacing[0])
            out.append(thick_slice_matrix(n_lr, scale, thickness, (thickness - 1) / 2))
        elif name == "gaussian-linear":
            out.append(
                gaussian_interpolation_matrix(n_lr, scale, math.sqrt(scale**2 - 1) / FWHM, cubic=False)
            )
        elif name == "kspace":
            out.append(kspace_matrix(n_lr, scale))
        elif name == "decimate":
            out.append(decimation_matrix(n_lr, scale, 0))
        else:
            out.append(block_matrix(n_lr, scale))
    return [m.astype(np.float32) for m in out]


def restandardise(t: np.ndarray, mean: float, sd: float, ref_mean: float, ref_sd: float) -> np.ndarray:
    """LR tissue values `t`, whose scan has tissue mean `mean` and standard deviation `sd`, shifted and
    scaled to the HR tissue's `ref_mean` and `ref_sd`.

    The normaliser z-scores a real LR scan by its own statistics, so at inference blur (thick slices
    most: 5 mm slices leave about 0.8 of the spread) is undone by a gain and noise by an attenuation;
    training, which normalises the HR image before degrading it, has to do the same or it meets
    contrasts that `segment` never shows it.
    """
    if sd < 1e-6:
        return t
    gain = min(max(ref_sd / sd, GAIN_RANGE[0]), GAIN_RANGE[1])
    return (ref_mean + (t - mean) * gain).astype(np.float32)


@dataclass(frozen=True)
class Scan:
    """A whole normalised HR case as `scan_statistics` reads it, prepared once per case: its channels
    and its tissue stacked (float32, (C + 1, *spatial)), which the operators take in one product, and
    the (mean, SD) per channel of its HR tissue interior, which no operator changes."""

    stacked: np.ndarray
    reference: tuple[tuple[float, float], ...]

    @classmethod
    def of(cls, hr: np.ndarray, tissue: np.ndarray) -> Scan | None:
        """The case `hr` (C, *spatial) with its `tissue`; None when its interior is too small to measure."""
        interior = erode(tissue)
        if int(interior.sum()) < 16:
            return None
        reference = tuple((float(c[interior].mean()), float(c[interior].std())) for c in hr)
        return cls(np.concatenate([hr, tissue[None]]).astype(np.float32), reference)


def scan_statistics(scan: Scan, matrices: Sequence[np.ndarray]) -> list[tuple] | None:
    """Per channel of a whole `scan`: (mean, variance) of its LR tissue through `matrices` over the LR
    voxels wholly of tissue, and (mean, SD) of the HR tissue interior; what the normaliser would
    measure on that LR scan before noise, and on the HR one.

    Every other LR row per axis is enough for a mean and a variance (an eighth of the voxels in 3D, a
    hundred thousand in a brain) and costs a third of the whole product.
    """
    lr = apply_separable(scan.stacked, [m[::2] for m in matrices])
    whole = lr[-1] >= 0.999
    if int(whole.sum()) < 16:
        return None  # too little tissue to measure: the patch's own statistics stand in
    return [
        (float(lr[c][whole].mean()), float(lr[c][whole].var()), *ref) for c, ref in enumerate(scan.reference)
    ]


def _patch_statistics(t: np.ndarray, whole: np.ndarray, reference: np.ndarray) -> tuple | None:
    """restandardise's statistics of a patch that is its whole scan (validation's inputs): None where
    too few voxels are wholly of tissue to measure a spread worth trusting."""
    if int(whole.sum()) < max(16, 0.25 * t.size) or reference.size < 16:
        return None
    return float(t[whole].mean()), float(t[whole].var()), float(reference.mean()), float(reference.std())


def apply_separable(array: np.ndarray, matrices: Sequence[np.ndarray]) -> np.ndarray:
    """array (C, *spatial): matrices[k] (n_out, n_in) applied along spatial axis k."""
    out = array
    for axis, matrix in enumerate(matrices):
        out = np.moveaxis(np.tensordot(matrix, out, axes=([1], [axis + 1])), 0, axis + 1)
    return out


def through_operators(
    hr: np.ndarray,
    matrices: Sequence[np.ndarray],
    tissue: np.ndarray | None,
    corrupt=None,
    restandardised: bool = True,
    scan: Sequence[tuple] | None = None,
) -> np.ndarray:
    """The LR image (C, *spatial) of an HR image through separable `matrices`. With the MRI `tissue`
    (*spatial, bool): what the normaliser calls background is 0, each channel's tissue values (v / f,
    f the tissue fraction) go through `corrupt(values, inside)` and then (`restandardised`)
    `restandardise`, and are written back as f * value.

    `scan` (`scan_statistics` of the whole case the patch was cut from, through the same operators)
    gives the normaliser's statistics, with what `corrupt` added to the patch's mean and variance added
    to them; without it the image is taken for its whole scan."""
    lr = apply_separable(np.asarray(hr, dtype=np.float32), matrices)
    if tissue is None:
        fraction = np.ones(lr.shape[1:], dtype=np.float32)
    else:
        fraction = apply_separable(tissue[None].astype(np.float32), matrices)[0].clip(0, 1)
        # What the normaliser calls background and sets to 0: the blur and ringing of the
        # operators spill tissue into it, which an LR scan shows only before normalisation.
        lr[:, fraction < TISSUE_LEVEL] = 0.0
    inside = fraction >= TISSUE_LEVEL
    whole = fraction[inside] >= 0.999
    interior = erode(tissue) if tissue is not None and restandardised and scan is None else None
    for c in range(lr.shape[0]):
        values = lr[c][inside] / fraction[inside]  # the tissue value of each voxel
        if values.size < 16:
            continue
        clean = values
        if corrupt is not None:
            values = corrupt(values, inside)
        if tissue is not None and restandardised:
            if scan is not None:
                stats = _with_corruption(scan[c], clean, values, whole if whole.sum() >= 16 else slice(None))
            else:
                stats = _patch_statistics(values, whole, hr[c][interior])
            if stats is not None:
                mean, var, ref_mean, ref_sd = stats
                values = restandardise(values, mean, math.sqrt(max(var, 0.0)), ref_mean, ref_sd)
        lr[c][inside] = values * fraction[inside]
    return lr


def _with_corruption(stats: tuple, clean: np.ndarray, corrupted: np.ndarray, where) -> tuple:
    """A scan's statistics with the shift and the variance that noise, bias and rounding added to a
    patch of it: the normaliser measures the scan with its noise."""
    mean, var, ref_mean, ref_sd = stats
    shift = float(corrupted[where].mean() - clean[where].mean())
    return mean + shift, var + float(corrupted[where].var() - clean[where].var()), ref_mean, ref_sd


@dataclass(frozen=True)
class Operator:
    """One axis's random way of making LR, drawn once and built for any length: a patch's, and the
    whole scan's it was cut from (whose statistics the normaliser sees). Lengths in HR voxels."""

    kind: str  # block, gaussian, kspace, decimate, thick
    sigma: float = 0.0
    cubic: bool = False
    taper: float = 0.0
    phase: float = 0.0
    thickness: float = 0.0
    profile: str = "box"
    spacing: float = 0.0  # thick slices: from one slice's centre to the next (0: the thickness)

    def matrix(self, n_lr: int, scale: int) -> np.ndarray:
        if self.kind == "thick":
            m = thick_slice_matrix(n_lr, scale, self.thickness, self.phase, self.profile, self.spacing)
        elif self.kind == "gaussian":
            m = gaussian_interpolation_matrix(n_lr, scale, self.sigma, self.cubic)
        elif self.kind == "kspace":
            m = kspace_matrix(n_lr, scale, self.taper)
        elif self.kind == "decimate":
            m = decimation_matrix(n_lr, scale, int(self.phase))
        else:
            m = block_matrix(n_lr, scale)
        return m.astype(np.float32)


@dataclass
class Degradation:
    """The random LR synthesis of one modality (module docstring): `apply` turns an HR patch into
    its LR input. `kind` is the normalisation kind ("mri", "ct", "uint8"), which says what noise and
    rounding the images carry; `hr_spacing` (mm, numpy axis order) turns slice thickness into voxels."""

    kind: str = "mri"
    hr_spacing: Sequence[float] = (1.0, 1.0, 1.0)
    p_thick: float = 0.2
    thickness_mm: Sequence[float] = (3.0, 6.0)
    # Slice spacing over thickness: a clinical 2D FLAIR leaves gaps (5 mm slices every 6.5 mm: 1.3).
    slice_gap: Sequence[float] = (1.0, 1.0)
    sigma_factor: Sequence[float] = (0.3, 1.6)
    noise: Sequence[float] = (0.005, 0.08)  # of the tissue's intensity range, log-uniform
    p_bias: float = 0.5
    bias: float = 0.3
    p_quantise: float = 0.3
    ct_window: float = 1400.0  # HU per normalised unit: CT values are whole HU

    def operators(self, shape: Sequence[int], rng: np.random.Generator, scale: int) -> list[Operator]:
        """One random way of making LR per axis of an HR patch of `shape`."""
        dims = len(shape)
        thick_axis = int(rng.integers(dims)) if dims == 3 and rng.random() < self.p_thick else -1
        out = []
        for axis in range(dims):
            if axis == thick_axis:
                thickness = rng.uniform(*self.thickness_mm) / float(self.hr_spacing[axis])
                if thickness > scale:  # slices thinner than an LR voxel are not thick
                    profile = "box" if rng.random() < 0.5 else "gaussian"
                    # Drawn only where gaps are asked for: without, a seed makes the patches it made.
                    spacing = thickness * rng.uniform(*self.slice_gap) if self.slice_gap[1] > 1 else thickness
                    phase = rng.uniform(0, spacing)
                    out.append(
                        Operator("thick", thickness=thickness, phase=phase, profile=profile, spacing=spacing)
                    )
                    continue
            choice = rng.random()
            if choice < 0.2:
                out.append(Operator("block"))
            elif choice < 0.6:
                sigma = rng.uniform(*self.sigma_factor) * math.sqrt(scale**2 - 1) / FWHM
                out.append(Operator("gaussian", sigma=sigma, cubic=choice >= 0.4))
            elif choice < 0.8:
                out.append(Operator("kspace", taper=rng.uniform(0.2, 0.5) if rng.random() < 0.5 else 0.0))
            else:
                out.append(Operator("decimate", phase=int(rng.integers(scale))))
        return out

    def apply(
        self,
        hr: np.ndarray,
        scale: int,
        rng: np.random.Generator,
        tissue: np.ndarray | None = None,
        scan: Scan | None = None,
    ) -> np.ndarray:
        """LR input (C, *spatial / scale) float32 of an HR patch (C, *spatial); `tissue` (*spatial,
        bool) marks the MRI tissue (None: everything is tissue). `scan`: the whole normalised case the
        patch was cut from, whose statistics through the same operators the MRI re-standardisation
        uses (a patch's own gain is 1-9 % lower than its scan's; docs/models.md)."""
        operators = self.operators(hr.shape[1:], rng, scale)
        matrices = [op.matrix(n // scale, scale) for op, n in zip(operators, hr.shape[1:])]
        bias = None
        if self.kind == "mri" and rng.random() < self.p_bias:
            bias = 1 + rng.uniform(0, self.bias) * _smooth_field([len(m) for m in matrices], rng)

        def corrupt(values: np.ndarray, inside: np.ndarray) -> np.ndarray:
            return self._corrupt(values, None if bias is None else bias[inside], rng)

        stats = None
        if scan is not None and self.kind == "mri":
            whole = [op.matrix(n // scale, scale) for op, n in zip(operators, scan.stacked.shape[1:])]
            stats = scan_statistics(scan, whole)
        return through_operators(hr, matrices, tissue, corrupt, restandardised=self.kind == "mri", scan=stats)

    def _corrupt(self, t: np.ndarray, bias: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
        lo, hi = np.percentile(t, [1, 99])
        span = max(float(hi - lo), 1e-6)
        sd = span * math.exp(rng.uniform(math.log(self.noise[0]), math.log(self.noise[1])))
        if self.kind == "mri":
            # Magnitude images: the signal sits above the darkest tissue, not around the z-score's 0.
            floor = float(t.min())
            signal = t - floor
            if bias is not None:
                signal = signal * bias
            t = floor + np.hypot(signal + rng.normal(0, sd, t.shape), rng.normal(0, sd, t.shape))
            if rng.random() < self.p_quantise:
                levels = 255 if rng.random() < 0.5 else math.exp(rng.uniform(math.log(256), math.log(4096)))
                t = _round(t, (float(t.max()) - floor) / levels, rng)
        elif self.kind == "uint8":
            t = np.clip(t * (1 + rng.normal(0, sd / max(float(t.mean()), 1e-3), t.shape)), 0, 1)
            t = np.round(t * 255) / 255
        else:
            t = np.clip(t + rng.normal(0, sd, t.shape), 0, 1)
            t = _round(t, 1 / self.ct_window, rng)
        return t.astype(np.float32)


def _round(values: np.ndarray, step: float, rng: np.random.Generator) -> np.ndarray:
    """Rounded to a grid of `step` at a random offset (the raw values' zero is not the normalised 0)."""
    if step <= 0:
        return values
    offset = rng.uniform(0, step)
    return np.round((values - offset) / step) * step + offset


def _smooth_field(shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """A smooth random field over `shape`, scaled to a maximum magnitude of 1: values on a 3-point
    lattice per axis spanning the patch, interpolated linearly."""
    lattice = rng.uniform(-1, 1, (1,) + (3,) * len(shape))
    field = apply_separable(lattice, [interpolation_matrix(np.linspace(0, 2, n), 3) for n in shape])[0]
    return (field / max(float(np.abs(field).max()), 1e-6)).astype(np.float32)
