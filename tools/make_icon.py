"""Draw the SASSRSegment icon (128x128 PNG): a lesion, blocky at low resolution on the left half and
smooth at super-resolution on the right half, over the two pixel grids.

Usage: python tools/make_icon.py   (writes SASSRSegment/Resources/Icons/SASSRSegment.png and
Resources/SASSRSegment.png)
"""

from pathlib import Path

import numpy as np
import SimpleITK as sitk

SIZE = 128
COARSE = 16  # low-resolution pixel, in icon pixels
FINE = 8  # super-resolution pixel
SUPERSAMPLE = 4
BACKGROUND = np.array([22, 34, 52], dtype=float)
GRID = np.array([60, 84, 112], dtype=float)
LESION = np.array([242, 115, 38], dtype=float)
OUTLINE = np.array([255, 214, 150], dtype=float)
ROOT = Path(__file__).resolve().parents[1]
TARGETS = [
    ROOT / "SASSRSegment" / "Resources" / "Icons" / "SASSRSegment.png",
    ROOT / "Resources" / "SASSRSegment.png",
]


def lesion_coverage(size: int) -> np.ndarray:
    """Fraction of each icon pixel inside the lesion (supersampled, so edges are anti-aliased)."""
    n = size * SUPERSAMPLE
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / SUPERSAMPLE
    dx, dy = x - size / 2, y - size / 2
    theta = np.arctan2(dy, dx)
    radius = 0.31 * size + 0.05 * size * np.sin(3 * theta) + 0.03 * size * np.cos(5 * theta + 1.0)
    inside = (np.hypot(dx, dy) <= radius).astype(float)
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def block_average(coverage: np.ndarray, block: int) -> np.ndarray:
    """What a low-resolution scanner sees: the mean over each block, repeated back to icon pixels."""
    h, w = coverage.shape
    means = coverage.reshape(h // block, block, w // block, block).mean(axis=(1, 3))
    return np.repeat(np.repeat(means, block, axis=0), block, axis=1)


def grid_mask(size: int, step: int) -> np.ndarray:
    lines = (np.arange(size) % step) == 0
    return lines[None, :] | lines[:, None]


def draw() -> np.ndarray:
    coverage = lesion_coverage(SIZE)
    left = np.arange(SIZE)[None, :] < SIZE // 2
    fill = np.where(left, block_average(coverage, COARSE), coverage)
    grid = np.where(left, grid_mask(SIZE, COARSE), grid_mask(SIZE, FINE))
    # The smooth half gets a bright rim: the boundary the super-resolved mask recovers.
    rim = (coverage > 0.05) & (coverage < 0.95) & ~left
    image = np.broadcast_to(BACKGROUND, (SIZE, SIZE, 3)).copy()
    image[grid] = 0.6 * image[grid] + 0.4 * GRID
    image = (1 - 0.9 * fill[..., None]) * image + 0.9 * fill[..., None] * LESION
    image[rim] = OUTLINE
    image[:, SIZE // 2 - 1 : SIZE // 2 + 1] = OUTLINE * 0.8
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def main() -> None:
    icon = sitk.GetImageFromArray(draw(), isVector=True)
    for target in TARGETS:
        target.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(icon, str(target))
        print(target.relative_to(ROOT))


if __name__ == "__main__":
    main()
