"""Render the extension's screenshot from a real result: the bundled model run on the bundled sample.

Segments SASSRSegment/Resources/Samples/brats_2013_pat0005_1_flair_2mm.nrrd with the engine (CPU), then
draws axial, coronal and sagittal slices through the largest lesion: the 2 mm input resampled onto the
1 mm output grid, with the 1 mm lesion mask over it (filled, outlined). Writes
Resources/SASSRSegment-screenshot.png, the image the extension catalog shows (EXTENSION_SCREENSHOTURLS).
It is drawn with numpy and Pillow (Slicer's Python has both), not captured from Slicer's views.

Usage: python tools/make_screenshot.py   (about a minute on a laptop CPU)
"""

import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "SASSRSegment"
SAMPLE = MODULE_DIR / "Resources" / "Samples" / "brats_2013_pat0005_1_flair_2mm.nrrd"
TARGET = ROOT / "Resources" / "SASSRSegment-screenshot.png"
MODEL = "brain-tumour-flair-3d"
PANEL_PIXELS = 330
CAPTION_PIXELS = 64
LESION = np.array([242, 115, 38], dtype=float)
OUTLINE = np.array([255, 214, 150], dtype=float)
FILL_OPACITY = 0.35


def segment(sample: Path, folder: Path) -> tuple[Path, Path]:
    """Run the engine's command line, as the Slicer module does; returns the mask and lesion table."""
    mask, table = folder / "lesions.nrrd", folder / "lesions.csv"
    command = [sys.executable, "-m", "SASSRSegmentLib", "segment", str(sample), "-o", str(mask)]
    command += ["--model", MODEL, "--device", "cpu", "--lesion-table", str(table)]
    subprocess.run(command, check=True, cwd=MODULE_DIR)
    return mask, table


def on_output_grid(image: sitk.Image, mask: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Input and mask as arrays indexed [S, P, L] (superior, posterior, left increase with the index)."""
    resampled = sitk.Resample(image, mask, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    volume = sitk.GetArrayFromImage(sitk.DICOMOrient(resampled, "LPS"))
    labels = sitk.GetArrayFromImage(sitk.DICOMOrient(mask, "LPS"))
    return volume, labels


def largest_lesion_centre(labels: np.ndarray) -> tuple[int, int, int]:
    components = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(labels)))
    zs, ys, xs = np.nonzero(sitk.GetArrayFromImage(components) == 1)
    return int(np.median(zs)), int(np.median(ys)), int(np.median(xs))


def views(volume: np.ndarray, labels: np.ndarray, centre: tuple[int, int, int]) -> list:
    """(title, slice, mask) per view, oriented as Slicer's slice views show them: patient left (axial,
    coronal) or anterior (sagittal) to the right, anterior (axial) or superior up."""
    z, y, x = centre
    return [
        ("Axial", volume[z], labels[z]),
        ("Coronal", volume[::-1, y, :], labels[::-1, y, :]),
        ("Sagittal", volume[::-1, :, x][:, ::-1], labels[::-1, :, x][:, ::-1]),
    ]


def render_panel(slice_: np.ndarray, mask: np.ndarray, window: tuple[float, float]) -> Image.Image:
    low, high = window
    grey = np.clip((slice_ - low) / (high - low), 0.0, 1.0)[..., None] * 255.0 * np.ones(3)
    inside = mask > 0
    interior = inside.copy()
    interior[1:-1, 1:-1] = (
        inside[1:-1, 1:-1] & inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
    )
    rgb = grey.copy()
    rgb[inside] = (1 - FILL_OPACITY) * grey[inside] + FILL_OPACITY * LESION
    rgb[inside & ~interior] = OUTLINE
    panel = Image.fromarray(rgb.astype(np.uint8))
    scale = PANEL_PIXELS / max(panel.size)
    size = (round(panel.size[0] * scale), round(panel.size[1] * scale))
    return panel.resize(size, Image.Resampling.NEAREST)


def compose(panels: list, caption: str) -> Image.Image:
    font = ImageFont.load_default(size=17)
    small = ImageFont.load_default(size=14)
    width = len(panels) * PANEL_PIXELS
    sheet = Image.new("RGB", (width, PANEL_PIXELS + CAPTION_PIXELS), (22, 34, 52))
    draw = ImageDraw.Draw(sheet)
    for index, (title, panel) in enumerate(panels):
        left = index * PANEL_PIXELS + (PANEL_PIXELS - panel.size[0]) // 2
        top = (PANEL_PIXELS - panel.size[1]) // 2
        sheet.paste(panel, (left, top))
        draw.text((index * PANEL_PIXELS + 8, 6), title, fill=(230, 230, 230), font=small)
    draw.text((10, PANEL_PIXELS + 10), caption.splitlines()[0], fill=(255, 214, 150), font=font)
    draw.text((10, PANEL_PIXELS + 36), caption.splitlines()[1], fill=(200, 210, 220), font=small)
    return sheet


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        mask_path, table_path = segment(SAMPLE, Path(folder))
        image, mask = sitk.ReadImage(str(SAMPLE)), sitk.ReadImage(str(mask_path))
        with open(table_path, newline="", encoding="utf-8") as stream:
            lesions = list(csv.DictReader(stream))
    volume, labels = on_output_grid(image, mask)
    window = tuple(np.percentile(volume[volume > 0], [1, 99.5]))
    centre = largest_lesion_centre(labels)
    panels = [(title, render_panel(s, m, window)) for title, s, m in views(volume, labels, centre)]
    total = sum(float(row["volume_mm3"]) for row in lesions) / 1000.0
    caption = (
        f"SASSR Segment: lesions at 1 mm from a 2 mm FLAIR MRI (x2), model {MODEL}\n"
        f"BraTS sample shipped with the extension: {len(lesions)} lesion(s), {total:.1f} ml; "
        f"input {' x '.join(str(n) for n in image.GetSize())} voxels, mask {' x '.join(str(n) for n in mask.GetSize())}"
    )
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    compose(panels, caption).save(TARGET, optimize=True)
    print(f"wrote {TARGET} ({TARGET.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
