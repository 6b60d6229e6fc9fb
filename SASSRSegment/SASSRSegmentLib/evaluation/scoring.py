"""HR scores of a model on a dataset, from LR inputs synthesised as in training.

For each case the HR image and label are cropped to a multiple of the scale, the LR input is the
block average of the HR image (`geometry.make_lr_image`), and `pipeline.segment_image` (the code the
`segment` command runs) predicts the HR mask, which is scored against the HR label.

`--lr-input` names other ways of making the LR input (`lowres.GENERATORS`: Gaussian + linear or
B-spline resampling, k-space truncation, decimation, Lanczos, thick slices, Rician noise, or the HR image
itself); with several, each is scored and a robustness table (mean and worst Dice per generator) follows.

The interpolation baseline (`--baseline-interpolation`) scores what a perfect LR segmentation gives
once interpolated: the HR label block-averaged to LR, upsampled linearly to HR, thresholded at 0.5.
The gap between the two is what super-resolution adds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..data import datasets, lowres
from ..inference.pipeline import card_threshold, segment_image
from ..io import geometry
from ..io.geometry import Grid, same_grid
from ..runtime.errors import UserError
from . import metrics


def synthesise_case(
    image: sitk.Image, label: sitk.Image, scale: int, generator: str = "block", seed: int = 0
) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """(LR input made by `generator`, cropped HR label, cropped HR image); "block" is exactly as training
    makes its inputs."""
    hr_image = geometry.crop_to_multiple(image, scale)
    hr_label = geometry.crop_to_multiple(label, scale)
    return lowres.make_lr(generator, hr_image, scale, seed), hr_label, hr_image


def interpolation_baseline(hr_label: sitk.Image, scale: int) -> sitk.Image:
    """The HR mask that linear interpolation of a perfect LR segmentation gives (uint8, on the HR label's
    grid cropped to a multiple of the scale)."""
    hr_label = geometry.crop_to_multiple(hr_label, scale)
    hr_grid = Grid.from_image(hr_label)
    fraction = geometry.downsample_block(sitk.GetArrayFromImage(hr_label).astype(np.float32), scale)
    lr = geometry.lr_grid(hr_grid, scale).image_from_array(fraction)
    upsampled = geometry.resample(lr, hr_grid, "linear", antialias=False)
    return sitk.Cast(upsampled >= 0.5, sitk.sitkUInt8)


def case_names(dataset: datasets.RawDataset, card: dict, split: str) -> list[str]:
    names = [c.name for c in dataset.cases]
    if split == "all":
        return names
    val = ((card.get("training") or {}).get("split") or {}).get("val")
    if not val:
        raise UserError("the model card lists no validation cases (training.split.val); use --split all")
    missing = [n for n in val if n not in names]
    if missing:
        raise UserError(
            f"{len(missing)} validation case(s) of the card are not in {dataset.root}: {', '.join(missing[:5])}; "
            "is this the dataset the model was trained on? (--split all scores every case)"
        )
    return list(val)


def lr_inputs(text: str, dims: int) -> list[str]:
    """The generator names of `--lr-input` for a `dims`-D model."""
    names = (
        lowres.names_for(dims) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    )
    if "all" in names:
        raise UserError("--lr-input: all stands alone (every input); or list the names without it")
    unknown = [n for n in names if n not in lowres.GENERATORS]
    if unknown or not names:
        raise UserError(
            f"--lr-input: unknown generator {', '.join(unknown) or repr(text)}; choose from "
            f"{', '.join(lowres.names_for(dims))} or all"
        )
    wrong = [n for n in names if dims not in lowres.GENERATORS[n][1]]
    if wrong:
        raise UserError(f"--lr-input: {', '.join(wrong)} applies to 3D models only")
    return list(dict.fromkeys(names))  # a name given twice had been scored twice, reported once


@dataclass(frozen=True)
class ScoringOptions:
    tta: bool = False
    threshold: float | None = None
    fully_connected: bool = True
    baseline_interpolation: bool = False


def score_cases(dataset, names, net, card, device, generators, options: ScoringOptions, progress) -> dict:
    """{"cases": {generator: {case: scores}}, "baseline": {case: scores}, "wall_time_s"} for `names`."""
    scale = int(card["preprocessing"]["scale"])
    cases = {g: {} for g in generators}
    baseline = {}
    started = time.monotonic()
    for k, name in enumerate(names):
        images, label = datasets.read_case(dataset, dataset.case(name))
        image = images[0] if len(images) == 1 else sitk.Compose(images)
        for g in generators:
            where = f"{name} ({k + 1}/{len(names)}, {g})"
            lr, hr_label, _ = synthesise_case(image, label, scale, g, seed=k)
            mask = _segment(lr, hr_label, net, card, device, g, options, where, progress)
            cases[g][name] = metrics.score_case(mask, hr_label, options.fully_connected)
            progress.log(f"{where}: Dice {cases[g][name]['dice']:.3f}")
        if options.baseline_interpolation:
            baseline[name] = metrics.score_case(
                interpolation_baseline(hr_label, scale), hr_label, options.fully_connected
            )
        progress.update("evaluate", (k + 1) / len(names), name)
    return {"cases": cases, "baseline": baseline, "wall_time_s": round(time.monotonic() - started, 1)}


def _segment(lr, hr_label, net, card, device, generator, options, where, progress) -> sitk.Image:
    """The HR mask `segment` gives for `lr`, on the HR label's grid."""
    mask, _ = segment_image(
        lr,
        net,
        card,
        device,
        tta=options.tta,
        threshold=options.threshold,
        batch_size=1 if device.type == "cpu" else 4,
        progress=lambda stage, f: progress.update(stage, f, where),
        probabilities="none",
        # The HR image is segmented at the model's working resolution, onto its own grid.
        output_grid="input" if generator == "hr" else "hr",
    )
    if not same_grid(Grid.from_image(mask), Grid.from_image(hr_label)):
        raise RuntimeError(
            f"{where}: the HR mask's grid differs from the HR label's; the geometry rule is broken"
        )
    mask.CopyInformation(hr_label)  # equal up to float rounding
    return mask


def assemble_result(
    scores: dict, card: dict, generators, options: ScoringOptions, model, dataset, split
) -> dict:
    """The evaluation result: the first generator's cases and summary; with several generators each one's
    and the robustness table; the interpolation baseline when scored."""
    prep = card["preprocessing"]
    dims = int(prep["spatial_dims"])
    cases = scores["cases"]
    first = generators[0]
    result = {
        "model": card.get("name", str(model)),
        "dataset": str(Path(dataset).resolve()),
        "split": split,
        "scale": int(prep["scale"]),
        "threshold": card_threshold(card, options.threshold),
        "tta": options.tta,
        "lr_input": first,
        "wall_time_s": scores["wall_time_s"],
        "cases": cases[first],
        "summary": metrics.summarise(cases[first], dims),
    }
    if len(generators) > 1:
        result["generators"] = {
            g: {"cases": cases[g], "summary": metrics.summarise(cases[g], dims)} for g in generators
        }
        result["robustness"] = {
            g: {
                "mean_dice": result["generators"][g]["summary"]["mean"]["dice"],
                "min_dice": float(min(c["dice"] for c in cases[g].values())),
                "cases": {n: c["dice"] for n, c in cases[g].items()},
            }
            for g in generators
        }
    if options.baseline_interpolation:
        result["baseline"] = {
            "method": "HR label block-averaged to LR, upsampled linearly, thresholded at 0.5",
            "cases": scores["baseline"],
            "summary": metrics.summarise(scores["baseline"], dims),
        }
    return result
