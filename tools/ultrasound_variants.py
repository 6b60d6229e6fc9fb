"""Dice of a 2D 8-bit model against the expert on the card's validation images, each made into the kinds
of image a clinic exports (docs/models.md, "The ultrasound model on images exported other ways").

    python tools/ultrasound_variants.py MODEL DATASET [OUT.json] [--whole-image] [--only NAME,...]

Each validation image is segmented as it is and as: JPEG at quality 30, half and 1.5 times its size,
inside a black frame a quarter of its size wide (also JPEG-compressed at quality 50), inside a white or
mid-grey frame an eighth of its size wide or a white edge 2 pixels wide (padding), gamma 0.6 and
1.6, contrast 0.6, multiplicative speckle, flipped left-right, transposed, upside down; and its pixels stored as 16 bits
(x 257, the PNG convention), 12 bits (x 16), float32 0-255, 0-1, z-scored, centred on 0 and less its mean;
shown in a sepia tint. The
mask is brought back onto the
image's pixels (nearest neighbour; the frame cut off, the flip undone) and scored there.
`--whole-image` shows the network the whole framed image, as `segment` did before it looked for the
scan inside a black frame.
"""

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "SASSRSegment"))

from SASSRSegmentLib.inference import inputs  # noqa: E402
from SASSRSegmentLib.inference.pipeline import segment_image  # noqa: E402
from SASSRSegmentLib.model.bundle import load_bundle  # noqa: E402
from SASSRSegmentLib.runtime.devices import select_device  # noqa: E402

FRAME = 0.25  # of the image's size, on each side


def jpeg(array: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())))


def resized(array: np.ndarray, shape) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((shape[1], shape[0]), Image.BILINEAR))


# Frames: (width, a share of the image's size or whole pixels, and grey value) by variant name.
FRAMES = {
    "black frame": (FRAME, 0),
    "black frame, JPEG quality 50": (FRAME, 0),
    "white frame an eighth of its size wide": (0.125, 255),
    "mid-grey frame an eighth of its size wide": (0.125, 128),
    "white edge 2 pixels wide": (2, 255),
}


def _frame_width(shape, width) -> tuple[int, int]:
    return (width, width) if width >= 1 else (int(shape[0] * width), int(shape[1] * width))


def framed(array: np.ndarray, width=FRAME, value=0) -> np.ndarray:
    top, left = _frame_width(array.shape, width)
    return np.pad(array, ((top,) * 2, (left,) * 2), constant_values=value)


def speckle(array: np.ndarray) -> np.ndarray:
    gain = np.random.default_rng(0).rayleigh(1.0, array.shape) / np.sqrt(np.pi / 2)
    return np.clip(array * gain, 0, 255).astype(np.uint8)


def gamma(g: float):
    return lambda a: np.clip(255 * (a / 255.0) ** g, 0, 255).astype(np.uint8)


def scale(f: float):
    return lambda a: resized(a, (round(a.shape[0] * f), round(a.shape[1] * f)))


VARIANTS = {
    "as it is": lambda a: a,
    "JPEG quality 30": lambda a: jpeg(a, 30),
    "half size": scale(0.5),
    "1.5 x size": scale(1.5),
    "black frame": framed,
    "black frame, JPEG quality 50": lambda a: jpeg(framed(a), 50),
    **{
        name: (lambda w, v: lambda a: framed(a, w, v))(width, value)
        for name, (width, value) in FRAMES.items()
        if not name.startswith("black")
    },
    "gamma 0.6": gamma(0.6),
    "gamma 1.6": gamma(1.6),
    "contrast 0.6": lambda a: (a * 0.6 + 20).astype(np.uint8),
    "speckle": speckle,
    "flipped left-right": lambda a: a[:, ::-1].copy(),
    "transposed": lambda a: a.T.copy(),
    "upside down": lambda a: a[::-1].copy(),
    # The same pixels stored in other types, as conversions and research pipelines store them.
    "16 bits (x 257)": lambda a: a.astype(np.uint16) * 257,
    "12 bits (x 16)": lambda a: a.astype(np.uint16) * 16,
    "float32 0-255": lambda a: a.astype(np.float32),
    "float32 0-1": lambda a: a.astype(np.float32) / 255,
    "float32 z-scored": lambda a: (a - a.mean(dtype=np.float64)).astype(np.float32) / a.std(),
    "float32 centred (value - 127.5)": lambda a: a.astype(np.float32) - 127.5,
    "float32 mean subtracted": lambda a: (a - a.mean(dtype=np.float64)).astype(np.float32),
    "sepia tint (RGB)": lambda a: np.rint(np.stack([a, 0.9 * a, 0.75 * a], -1)).astype(np.uint8),
}


def on_image(mask: np.ndarray, name: str, shape) -> np.ndarray:
    """The mask of a variant on the original image's pixels."""
    if name in FRAMES:
        top, left = _frame_width(shape, FRAMES[name][0])
        size = (shape[0] + 2 * top, shape[1] + 2 * left)
        return resized(mask, size)[top : top + shape[0], left : left + shape[1]] > 0
    if name == "transposed":
        return resized(mask, shape[::-1]).T > 0
    out = resized(mask, shape) > 0
    if name == "upside down":
        return out[::-1]
    return out[:, ::-1] if name == "flipped left-right" else out


def main(model: str, dataset: str, out: str | None, whole_image: bool, only: list[str]) -> None:
    variants = {name: make for name, make in VARIANTS.items() if not only or name in only}
    if whole_image:
        inputs.CONTENT_SHARE = 0.0  # every scan "fills" its image
    device = select_device("auto")
    card, net = load_bundle(model, device, for_prediction=True)
    root = Path(dataset)
    scores: dict[str, list[float]] = {name: [] for name in variants}
    for case in card["training"]["split"]["val"]:
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "imagesTr" / f"{case}_0000.png")))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "labelsTr" / f"{case}.png"))) > 0
        for name, make in variants.items():
            made = make(image)
            mask, _ = segment_image(
                sitk.GetImageFromArray(made, isVector=made.ndim == 3), net, card, device, probabilities="none"
            )
            got = on_image(sitk.GetArrayFromImage(mask).astype(np.uint8) * 255, name, image.shape)
            scores[name].append(2.0 * float((got & label).sum()) / max(1, int(got.sum() + label.sum())))
    for name, values in scores.items():
        print(f"{name:30s} {np.mean(values):.3f} ({sum(v < 0.1 for v in values)} images under 0.1)")
    if out:
        Path(out).write_text(json.dumps(scores))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(usage=__doc__)
    parser.add_argument("model")
    parser.add_argument("dataset")
    parser.add_argument("out", nargs="?")
    parser.add_argument("--whole-image", action="store_true")
    parser.add_argument(
        "--only", type=lambda t: t.split(","), default=[], help="variants by name, comma-separated"
    )
    a = parser.parse_args()
    unknown = set(a.only) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; choose from {sorted(VARIANTS)}")
    main(a.model, a.dataset, a.out, a.whole_image, a.only)
