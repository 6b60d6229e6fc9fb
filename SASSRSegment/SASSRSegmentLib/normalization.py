"""Intensity normalisation, described by a small JSON-able dict stored in the model card.

kinds:
- "mri": z-score over the foreground. The foreground is every voxel that differs from the background
  value (the most frequent value on the volume's border), so skull-stripped scans with a background of
  0 and pre-normalised scans with a background of, say, -1.2 are treated alike. Intensities are first
  clipped to the foreground's 0.5 / 99.5 percentiles so a few hot voxels do not set the scale.
  Background voxels are set to 0 (the foreground mean) after normalisation.
  Voxels on the foreground's rim are partial volumes of background and tissue. Training normalises the
  HR image and then block-averages it, which mixes a rim voxel's tissue with 0; an LR scan arrives
  already mixed with the raw background. So rim voxels are normalised as `f * z(tissue)`, with the
  tissue fraction f estimated from the voxel's value and the mean of the interior voxels around it:
  the two orders then agree, and an LR input looks to the network like what it was trained on.
- "ct": clip to `window` [lo, hi] HU, scale to [0, 1].
- "uint8": 8-bit images (ultrasound, photographs): value / 255.
"""

from __future__ import annotations

import numpy as np

KINDS = ("mri", "ct", "uint8")


def _border_mode(array: np.ndarray) -> float:
    border = np.concatenate([np.take(array, [0, -1], axis=a).ravel() for a in range(array.ndim)])
    values, counts = np.unique(border, return_counts=True)
    return float(values[np.argmax(counts)])


def foreground_mask(array: np.ndarray) -> np.ndarray:
    """Voxels that differ from the background value; the whole image if that leaves too little."""
    mask = array != _border_mode(array)
    if mask.sum() < max(16, 0.01 * array.size):
        return np.ones(array.shape, dtype=bool)
    return mask


def erode(mask: np.ndarray) -> np.ndarray:
    """Binary erosion by the full 3^d neighbourhood (edges count as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    out = np.ones_like(mask)
    for offset in np.ndindex(*(3,) * mask.ndim):
        out &= padded[tuple(slice(o, o + n) for o, n in zip(offset, mask.shape, strict=True))]
    return out


def _rim_tissue_fraction(
    data: np.ndarray, interior: np.ndarray, rim: tuple[np.ndarray, ...], background: float, mean: float
) -> np.ndarray:
    """Tissue fraction of the rim voxels (index arrays `rim`), each between 0 and 1.

    A rim voxel's value is f * tissue + (1 - f) * background; its tissue value is taken as the mean of
    the interior voxels within 2 voxels (the global foreground mean where there are none). Only the
    rim is visited, so memory scales with the rim, not the volume.
    """
    count = np.zeros(len(rim[0]))
    total = np.zeros(len(rim[0]))
    for offset in np.ndindex(*(5,) * data.ndim):
        index = tuple(r + (o - 2) for r, o in zip(rim, offset, strict=True))
        inside = np.all([(i >= 0) & (i < n) for i, n in zip(index, data.shape, strict=True)], axis=0)
        index = tuple(np.where(inside, i, 0) for i in index)
        hit = inside & interior[index]
        count += hit
        total += np.where(hit, data[index], 0.0)
    local = np.where(count > 0, total / np.maximum(count, 1), mean)
    contrast = local - background
    safe = np.where(np.abs(contrast) > 1e-6, contrast, 1.0)
    return np.clip((data[rim] - background) / safe, 0.0, 1.0)


def normalize(array: np.ndarray, spec: dict) -> np.ndarray:
    """Normalise one channel (any dims) as `spec` says; returns float32. Constant images give zeros."""
    kind = spec.get("kind")
    data = np.asarray(array, dtype=np.float32)
    if kind == "uint8":
        return data / 255.0
    if kind == "ct":
        lo, hi = (float(v) for v in spec.get("window", (-1000.0, 400.0)))
        return (np.clip(data, lo, hi) - lo) / (hi - lo)
    if kind == "mri":
        background = _border_mode(data)
        mask = foreground_mask(data)
        # Statistics of the interior only: rim voxels are partial volumes, and there are more of them
        # at LR than at HR, which would make the two scales disagree.
        interior = erode(mask)
        stats = interior if interior.sum() >= max(16, 0.25 * mask.sum()) else mask
        lo, hi = np.percentile(data[stats], [0.5, 99.5])
        values = np.clip(data[stats], lo, hi)
        std = float(values.std())
        if std < 1e-8:
            return np.zeros_like(data)
        mean = float(values.mean())
        # value = f * tissue + (1 - f) * background: clip and standardise the tissue part only
        # (f = 1 in the interior, 0 outside the foreground).
        out = np.zeros_like(data)
        out[interior] = (np.clip(data[interior], lo, hi) - mean) / std
        rim = np.nonzero(mask & ~interior)
        fraction = _rim_tissue_fraction(data, interior, rim, background, mean)
        tissue = background + (data[rim] - background) / np.maximum(fraction, 1e-6)
        out[rim] = fraction * (np.clip(tissue, lo, hi) - mean) / std
        return out
    raise ValueError(f"unknown normalisation kind {kind!r}; expected one of {KINDS}")


def choose_normalization(dataset_json: dict) -> dict:
    """Pick a normalisation from an nnU-Net dataset.json's channel names (first channel)."""
    names = " ".join(str(v) for v in dataset_json.get("channel_names", {}).values()).lower()
    if "ct" in names.split() or names.strip() == "ct":
        return {"kind": "ct", "window": [-1000.0, 400.0]}
    if any(k in names for k in ("ultrasound", "us", "rgb", "photo", "dermoscop", "endoscop")):
        return {"kind": "uint8"}
    return {"kind": "mri"}
