"""Dice of a 3D model against the expert on the card's validation cases, each made into the kinds of scan
a clinic sends (docs/models.md, "How the brain model meets scans made other ways").

    python tools/scan_variants.py MODEL DATASET [OUT.json] [--as-stored] [--only=TEXT]

Each 1 mm case becomes: a 2 mm scan as common tools make one (Gaussian anti-aliasing, sigma
sqrt(2^2 - 1^2) / 2.355 mm, then linear resampling onto the corner-aligned grid), that scan stored in
other axis orders (a sagittal or coronal 3D acquisition, a RAS-stored NIfTI) or with a smooth bias
field, other isotropic spacings, 1 x 1 x 3 mm, and 5 mm slices in each plane (given as they are, or
resampled linearly to 2 mm), and clinical 2D stacks: thick slices with gaps between them, fine pixels,
upright or tilted as an oblique prescription is. The mask, on the input's HR grid as `segment` makes it, is brought onto
the expert's 1 mm grid (nearest neighbour) and scored there. `--as-stored` shows the network every
input in its stored axis order, as `segment` did before it reordered them (the card's `orientation`
dropped). `--only=TEXT` runs the kinds whose name holds TEXT.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "SASSRSegment"))

from SASSRSegmentLib.inference.pipeline import segment_image  # noqa: E402
from SASSRSegmentLib.model.bundle import load_bundle  # noqa: E402
from SASSRSegmentLib.runtime.devices import select_device  # noqa: E402


def resampled(image: sitk.Image, spacing, smooth: bool = True) -> sitk.Image:
    """Onto the grid of `spacing` that starts at the image's extent corner (Gaussian anti-aliasing first)."""
    old, new = np.asarray(image.GetSpacing()), np.asarray(spacing, dtype=float)
    if smooth:
        sigma = np.maximum(np.sqrt(np.maximum(new**2 - old**2, 0)) / 2.355, 1e-3)
        image = sitk.SmoothingRecursiveGaussian(image, [float(s) for s in sigma])
    size = [int(n) for n in np.ceil(np.asarray(image.GetSize()) * old / new)]
    matrix = np.asarray(image.GetDirection()).reshape(3, 3)
    origin = np.asarray(image.GetOrigin()) - matrix @ (old / 2) + matrix @ (new / 2)
    return sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkLinear, [float(v) for v in origin],
        [float(s) for s in new], image.GetDirection(), 0.0, sitk.sitkFloat32,
    )  # fmt: skip


def thick_slices(image: sitk.Image, axis: int, mm: int = 5) -> sitk.Image:
    """Slices of `mm` voxels along `axis` (x, y, z), each the mean of the 1 mm voxels it covers."""
    array = sitk.GetArrayFromImage(image)
    numpy_axis = 2 - axis
    n = array.shape[numpy_axis] // mm
    array = np.take(array, range(n * mm), axis=numpy_axis)
    shape = list(array.shape)
    shape[numpy_axis : numpy_axis + 1] = [n, mm]
    out = sitk.GetImageFromArray(array.reshape(shape).mean(axis=numpy_axis + 1).astype(np.float32))
    spacing = list(image.GetSpacing())
    spacing[axis] = float(mm)
    matrix = np.asarray(image.GetDirection()).reshape(3, 3)
    corner = np.asarray(image.GetOrigin()) - matrix @ (np.asarray(image.GetSpacing()) / 2)
    out.SetSpacing(spacing)
    out.SetDirection(image.GetDirection())
    out.SetOrigin([float(v) for v in corner + matrix @ (np.asarray(spacing) / 2)])
    return out


def clinical_stack(
    image: sitk.Image, in_plane: float, thickness: float, spacing: float, tilt: float = 0.0
) -> sitk.Image:
    """A 2D clinical acquisition: slices `thickness` mm thick (Gaussian profile of that FWHM) every
    `spacing` mm (a gap between them), `in_plane` mm pixels, the stack tilted by `tilt` degrees about the
    left-right axis as an oblique prescription is (the grid's direction carries the tilt). What lies
    outside the 1 mm scan is its background, as air is in a real field of view."""
    angle = np.deg2rad(tilt)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    direction = np.asarray(image.GetDirection()).reshape(3, 3) @ rotation
    extent = np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
    extent[1:] = np.hypot(extent[1], extent[2]) if tilt else extent[1:]
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    background = float(np.median(sitk.GetArrayViewFromImage(image)[0]))

    def onto(source: sitk.Image, step) -> sitk.Image:
        step = np.asarray(step, dtype=float)
        size = np.ceil(extent / step).astype(int)
        origin = centre - direction @ ((size - 1) / 2 * step)
        return sitk.Resample(
            source, [int(n) for n in size], sitk.Transform(), sitk.sitkLinear, origin.tolist(),
            step.tolist(), direction.ravel().tolist(), background, sitk.sitkFloat32,
        )  # fmt: skip

    fine = onto(image, [1.0, 1.0, 1.0])
    sigma = [np.sqrt(max(in_plane**2 - 1, 0)) / 2.355] * 2 + [thickness / 2.355]
    return onto(
        sitk.SmoothingRecursiveGaussian(fine, [max(float(v), 1e-3) for v in sigma]),
        [in_plane, in_plane, spacing],
    )


def stored(image: sitk.Image, order, flips) -> sitk.Image:
    """The same voxels in the same places, stored in another axis order (and direction)."""
    return sitk.Flip(sitk.PermuteAxes(image, order), flips, flipAboutOrigin=False)


def bias_field(image: sitk.Image) -> sitk.Image:
    """A smooth multiplicative field of 0.6-1.7 across the volume, as a receive coil leaves, on the signal
    above the background (`pat0005` is stored z-scored, its background a constant -3.55)."""
    array = sitk.GetArrayFromImage(image)
    background = float(np.median(array[0]))
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in array.shape], indexing="ij")
    field = np.exp(0.3 * x + 0.2 * y * z - 0.15 * z)
    out = sitk.GetImageFromArray((background + (array - background) * field).astype(np.float32))
    out.CopyInformation(image)
    return out


TWO_MM = [2.0, 2.0, 2.0]
VARIANTS = {
    "2 mm": lambda hr: resampled(hr, TWO_MM),
    "2 mm, stored sagittal": lambda hr: stored(resampled(hr, TWO_MM), [1, 2, 0], [False, True, False]),
    "2 mm, stored coronal": lambda hr: stored(resampled(hr, TWO_MM), [0, 2, 1], [False, False, True]),
    "2 mm, stored RAS": lambda hr: stored(resampled(hr, TWO_MM), [0, 1, 2], [True, True, False]),
    "2 mm, bias field": lambda hr: bias_field(resampled(hr, TWO_MM)),
    "1.5 mm": lambda hr: resampled(hr, [1.5] * 3),
    "2.5 mm": lambda hr: resampled(hr, [2.5] * 3),
    "3 mm": lambda hr: resampled(hr, [3.0] * 3),
    "1 x 1 x 3 mm": lambda hr: resampled(hr, [1.0, 1.0, 3.0]),
    "5 mm axial slices": lambda hr: thick_slices(hr, 2),
    "5 mm axial slices, to 2 mm": lambda hr: resampled(thick_slices(hr, 2), TWO_MM, smooth=False),
    "5 mm coronal slices, to 2 mm": lambda hr: resampled(thick_slices(hr, 1), TWO_MM, smooth=False),
    "5 mm sagittal slices, to 2 mm": lambda hr: resampled(thick_slices(hr, 0), TWO_MM, smooth=False),
    "5 mm sagittal slices, stored sagittal": lambda hr: stored(thick_slices(hr, 0), [1, 2, 0], [False] * 3),
    "clinical 2D: 5 mm slices every 6.5 mm, 0.9 mm pixels": lambda hr: clinical_stack(hr, 0.9, 5.0, 6.5),
    "clinical 2D: the same, tilted 20 degrees": lambda hr: clinical_stack(hr, 0.9, 5.0, 6.5, tilt=20.0),
    "clinical 2D: 3 mm slices every 3.3 mm, 0.45 mm pixels": lambda hr: clinical_stack(hr, 0.45, 3.0, 3.3),
}


def dice_on(label: sitk.Image, mask: sitk.Image) -> float:
    on_label = sitk.Resample(mask, label, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    got, want = sitk.GetArrayViewFromImage(on_label) > 0, sitk.GetArrayViewFromImage(label) > 0
    return 2.0 * float((got & want).sum()) / max(1, int(got.sum() + want.sum()))


def main(model: str, dataset: str, out: str | None, as_stored: bool, only: str | None) -> None:
    device = select_device("auto")
    card, net = load_bundle(model, device, for_prediction=True)
    if as_stored:
        card["preprocessing"].pop("orientation", None)
    root = Path(dataset)
    chosen = {name: make for name, make in VARIANTS.items() if only is None or only in name}
    scores: dict[str, dict[str, float]] = {name: {} for name in chosen}
    for case in card["training"]["split"]["val"]:
        hr = sitk.ReadImage(str(root / "imagesTr" / f"{case}_0000.nii.gz"), sitk.sitkFloat32)
        label = sitk.ReadImage(str(root / "labelsTr" / f"{case}.nii.gz"))
        for name, make in chosen.items():
            mask, _ = segment_image(make(hr), net, card, device, probabilities="none")
            scores[name][case] = round(dice_on(label, mask), 4)
            print(f"{case}, {name}: {scores[name][case]:.3f}", file=sys.stderr, flush=True)
    for name, per_case in scores.items():
        values = list(per_case.values())
        print(
            f"{name:40s} {np.mean(values):.3f} (worst {min(values):.3f})  "
            + " ".join(f"{v:.3f}" for v in values)
        )
    if out:
        Path(out).write_text(json.dumps(scores, indent=1))


if __name__ == "__main__":
    flags = [a for a in sys.argv[1:] if a.startswith("--")]
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    only = next((f.split("=", 1)[1] for f in flags if f.startswith("--only=")), None)
    if len(args) not in (2, 3) or set(flags) - {"--as-stored"} - {
        f for f in flags if f.startswith("--only=")
    }:
        raise SystemExit(__doc__)
    main(args[0], args[1], args[2] if len(args) == 3 else None, "--as-stored" in flags, only)
