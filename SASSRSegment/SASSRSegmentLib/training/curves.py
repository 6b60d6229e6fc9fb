"""The training curves figure (curves.png): loss and validation Dice against step, drawn with Pillow."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..runtime.fonts import font
from ..runtime.progress import Progress


def _number(v: float) -> str:
    return f"{v:.3g}".replace("+", "")


def render_curves(rows: list[dict], width: int = 720, height: int = 400) -> np.ndarray:
    """RGB image: training loss (blue, left axis) and validation Dice (red, right axis, 0-1) against step.

    Steps whose loss was not finite (skipped, see the training loop) are left out of the curve."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    face = font(13)
    left, right, top, bottom = 70, width - 60, 30, height - 40
    draw.line([(left, top), (left, bottom), (right, bottom), (right, top)], fill=(0, 0, 0))
    logged = [(float(r["step"]), float(r["loss"])) for r in rows if r.get("loss") not in ("", None)]
    logged = [(s, v) for s, v in logged if math.isfinite(v)]
    val = [(float(r["step"]), float(r["val_dice"])) for r in rows if r.get("val_dice") not in ("", None)]
    max_step = max([1.0, *[s for s, _ in logged], *[s for s, _ in val]])
    top_loss = max([v for _, v in logged], default=1.0)

    def point(step: float, fraction: float) -> tuple[float, float]:
        return left + (right - left) * step / max_step, bottom - (bottom - top) * min(max(fraction, 0.0), 1.0)

    blue, red, grey = (30, 80, 200), (200, 40, 40), (120, 120, 120)
    for x, y, text, colour in (
        (left, 8, "loss", blue),
        (right - 40, 8, "dice", red),
        ((left + right) // 2 - 16, height - 18, "step", grey),
        (left - 4, bottom + 6, "0", grey),
        (right - 40, bottom + 6, _number(max_step), grey),
        (4, top, _number(top_loss), blue),
        (4, bottom - 12, "0", blue),
        (right + 6, top, "1", red),
        (right + 6, bottom - 12, "0", red),
    ):
        draw.text((x, y), text, fill=colour, font=face)
    if len(logged) > 1:
        draw.line([point(s, v / max(top_loss, 1e-12)) for s, v in logged], fill=blue, width=2)
    if len(val) > 1:
        draw.line([point(s, v) for s, v in val], fill=red, width=2)
    for s, v in val:
        x, y = point(s, v)
        draw.rectangle([x - 2, y - 2, x + 2, y + 2], fill=red)
    return np.asarray(canvas)


def write_plot(path: Path, rows: list[dict], progress: Progress) -> None:
    try:
        from PIL import Image
    except ImportError:
        progress.log("Pillow is not installed here: curves.png skipped (log.csv has the numbers)")
        return
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    Image.fromarray(render_curves(rows)).save(tmp, format="PNG")
    os.replace(tmp, path)
