"""Intensity normalisation, described by a small JSON-able dict stored in the model card.

kinds:
- "mri": z-score over the foreground. The foreground is every voxel that differs from the background
  value (the most frequent value on the volume's border), so skull-stripped scans with a background of
  0 and pre-normalised scans with a background of, say, -1.2 are treated alike. Intensities are first
  clipped to the foreground's 0.5 / 99.5 percentiles so a few hot voxels do not set the scale.
  Background voxels are set to 0 (the foreground mean) after normalisation.
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
        mask = foreground_mask(data)
        values = data[mask]
        lo, hi = np.percentile(values, [0.5, 99.5])
        clipped = np.clip(data, lo, hi)
        values = clipped[mask]
        std = float(values.std())
        if std < 1e-8:
            return np.zeros_like(data)
        out = (clipped - float(values.mean())) / std
        out[~mask] = 0.0
        return out.astype(np.float32)
    raise ValueError(f"unknown normalisation kind {kind!r}; expected one of {KINDS}")


def choose_normalization(dataset_json: dict) -> dict:
    """Pick a normalisation from an nnU-Net dataset.json's channel names (first channel)."""
    names = " ".join(str(v) for v in dataset_json.get("channel_names", {}).values()).lower()
    if "ct" in names.split() or names.strip() == "ct":
        return {"kind": "ct", "window": [-1000.0, 400.0]}
    if any(k in names for k in ("ultrasound", "us", "rgb", "photo", "dermoscop", "endoscop")):
        return {"kind": "uint8"}
    return {"kind": "mri"}
