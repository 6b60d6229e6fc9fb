"""Text for the figures (the segmentation figure, the training curves): Pillow only, no SimpleITK, so
that training from a cache draws its curves on hosts without it."""

from __future__ import annotations


def font(size: int):
    """Pillow's scalable default font at `size` pixels (a fixed bitmap font before Pillow 10.1)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()
