"""How noisy a scan is, beside the noise its model was trained on, and the smoothing that brings a
noisier one back within it (docs/models.md, "Noise was the limit not yet handled").

The brain model was trained with noise of 0.5-8 % of the tissue's range (log-uniform, so the top of it
is rare): Rician noise of 5 / 8 / 10 % of a scan's range took its validation Dice from 0.818 (2 %) to
0.776 / 0.617 / 0.558, and a Gaussian smoothing of 0.7 voxel brought them back to 0.824 / 0.817 / 0.789.
Smoothing every scan is no remedy (faint lesions gain, bright ones lose), so only a scan whose noise
lies beyond what clean inputs show is smoothed.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..data.normalization import erode

# `relative_noise` of the 19 BraTS cases made 2 mm by block averaging, Gaussian + linear resampling,
# 5 mm slices, decimation, k-space truncation and Lanczos: at most 0.056; with Rician noise of 5 % of
# the range, at least 0.072 (2 %: 0.035-0.061).
NOISE_LIMIT = 0.065
SMOOTHING_VOXELS = 0.7


def relative_noise(values: np.ndarray, tissue: np.ndarray | None) -> float:
    """The noise's standard deviation over the tissue's intensity range (its 1st to 99th percentile),
    from the finest-scale residual inside the eroded tissue: each voxel minus the mean of its face
    neighbours, scaled so that white noise keeps its deviation, then a median absolute deviation,
    which the tissue's edges and lesions do not move. Unchanged by any linear map of the values.
    0 without a tissue mask (kinds that trace none, an image without contrast)."""
    if tissue is None:
        return 0.0
    inner = erode(tissue)[(slice(1, -1),) * values.ndim]
    if inner.sum() < 100:
        return 0.0
    core = values[(slice(1, -1),) * values.ndim]
    neighbours = np.zeros_like(core)
    for axis in range(values.ndim):
        for shift in (0, 2):
            index = [slice(1, -1)] * values.ndim
            index[axis] = slice(shift, shift + core.shape[axis])
            neighbours += values[tuple(index)]
    count = 2 * values.ndim
    residual = (core - neighbours / count)[inner] / np.sqrt(1 + 1 / count)
    spread = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))
    low, high = np.percentile(values[tissue], [1, 99])
    return spread / float(high - low) if high > low else 0.0


def smoothed(array: np.ndarray) -> np.ndarray:
    """`array` smoothed by a Gaussian of SMOOTHING_VOXELS voxels (on a unit-spaced copy, so in voxels
    whatever their size)."""
    image = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(array), SMOOTHING_VOXELS)
    return sitk.GetArrayFromImage(image)
