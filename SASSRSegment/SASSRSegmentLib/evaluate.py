"""The `evaluate` command: HR scores of a model on a dataset, from LR inputs synthesised as in training.

For each case the HR image and label are cropped to a multiple of the scale, the LR input is the
block average of the HR image (`geometry.make_lr_image`), and `segment.segment_image` (the code the
`segment` command runs) predicts the HR mask, which is scored against the HR label.

`--lr-input` names other ways of making the LR input (`lowres.GENERATORS`: Gaussian + linear or
B-spline resampling, k-space truncation, decimation, Lanczos, thick slices, Rician noise, or the HR image
itself); with several, each is scored and a robustness table (mean and worst Dice per generator) follows.

The interpolation baseline (`--baseline-interpolation`) scores what a perfect LR segmentation gives
once interpolated: the HR label block-averaged to LR, upsampled linearly to HR, thresholded at 0.5.
The gap between the two is what super-resolution adds.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import data, geometry, imageio, lowres, metrics
from .errors import UserError
from .geometry import Grid
from .progress import Progress
from .segment import (
    add_prediction_arguments,
    card_threshold,
    check_prediction_arguments,
    same_grid,
    segment_image,
)

# The command line runs this command in a worker thread: a cancel then takes effect within a second at
# every stage (see cli.run_command).
RUNS_IN_WORKER = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="bundled model name or bundle folder")
    parser.add_argument(
        "--dataset", required=True, help="nnU-Net v2 raw dataset folder (dataset.json, imagesTr, labelsTr)"
    )
    parser.add_argument(
        "--split",
        choices=("val", "all"),
        default="val",
        help="val: the card's validation cases (default); all",
    )
    parser.add_argument("--json", metavar="OUT", help="also write every score to this JSON file")
    parser.add_argument(
        "--baseline-interpolation",
        action="store_true",
        help="also score the interpolated perfect LR segmentation",
    )
    parser.add_argument(
        "--lr-input",
        default="block",
        metavar="NAME[,NAME]",
        help=f"how the LR input is made: {', '.join(lowres.GENERATORS)}, or all (default: block, as in training)",
    )
    add_prediction_arguments(parser)
    parser.add_argument("--progress", choices=("bar", "json", "quiet"), default="bar")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")


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


def _case_names(dataset: data.RawDataset, card: dict, split: str) -> list[str]:
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


def _json_safe(value):
    """NaN is not JSON: write null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _fmt(value: float, digits: int = 3) -> str:
    return (
        "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
    )


def format_report(result: dict) -> str:
    """The per-case table, the means and the size strata as text."""
    columns = metrics.CASE_METRICS
    heads = ("Dice", "IoU", "HD95mm", "prec", "recall", "les.sens", "FP les")
    baseline = result.get("baseline")
    width = max([len(n) for n in result["cases"]] + [len("mean")])
    header = (
        f"{'case':<{width}} " + " ".join(f"{h:>8}" for h in heads) + ("  interp.Dice" if baseline else "")
    )
    lines = [header, "-" * len(header)]

    def line(name: str, scores: dict, base: dict | None) -> str:
        cells = [f"{_fmt(scores[c], 0 if c == 'false_positive_lesions' else 3):>8}" for c in columns]
        extra = f"  {_fmt(base['dice']):>11}" if base else ""
        return f"{name:<{width}} " + " ".join(cells) + extra

    for name, scores in result["cases"].items():
        lines.append(line(name, scores, baseline["cases"][name] if baseline else None))
    summary = result["summary"]
    lines.append(line("mean", summary["mean"], baseline["summary"]["mean"] if baseline else None))
    undefined = {k: v for k, v in summary["undefined"].items() if v}
    if undefined:
        lines.append(
            "undefined (NaN, left out of the means): " + ", ".join(f"{k} {v}" for k, v in undefined.items())
        )
    lines.append(f"lesion size strata ({summary['strata_definition']}):")
    for name, stratum in summary["strata"].items():
        text = (
            f"  {name:<7} {stratum['lesions']:>4} lesions, detected {stratum['detected']:>4} "
            f"(sensitivity {_fmt(stratum['sensitivity'])}), mean lesion Dice {_fmt(stratum['mean_lesion_dice'])}"
        )
        if baseline:
            text += f"; interpolation: {_fmt(baseline['summary']['strata'][name]['mean_lesion_dice'])}"
        lines.append(text)
    return "\n".join(lines)


def lr_inputs(text: str, dims: int) -> list[str]:
    """The generator names of `--lr-input` for a `dims`-D model."""
    names = (
        lowres.names_for(dims) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    )
    unknown = [n for n in names if n not in lowres.GENERATORS]
    if unknown or not names:
        raise UserError(
            f"--lr-input: unknown generator {', '.join(unknown) or repr(text)}; choose from "
            f"{', '.join(lowres.names_for(dims))} or all"
        )
    wrong = [n for n in names if dims not in lowres.GENERATORS[n][1]]
    if wrong:
        raise UserError(f"--lr-input: {', '.join(wrong)} applies to 3D models only")
    return names


def format_robustness(result: dict) -> str:
    lines = ["LR input             mean Dice  worst case", "-" * 42]
    for name, row in result["robustness"].items():
        lines.append(f"{name:<20} {_fmt(row['mean_dice']):>9}  {_fmt(row['min_dice']):>10}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from .bundle import load_bundle
    from .devices import describe, select_device

    check_prediction_arguments(args)
    if args.json:
        imageio.check_output_path(args.json, args.overwrite, (".json",))
    progress = Progress(args.progress)
    device = select_device(args.device)
    card, net = load_bundle(args.model, device)
    prep = card["preprocessing"]
    scale = int(prep["scale"])
    dims = int(prep["spatial_dims"])
    generators = lr_inputs(args.lr_input, dims)
    dataset = data.open_dataset(args.dataset, labels=prep.get("labels"))
    if dataset.spatial_dims != dims:
        raise UserError(
            f"dataset {dataset.name} is {dataset.spatial_dims}D but model {card.get('name', args.model)!r} is "
            f"{prep['spatial_dims']}D"
        )
    names = _case_names(dataset, card, args.split)
    progress.log(f"device: {describe(device)}; {len(names)} case(s) of {dataset.name}")
    fully = not args.face_connected
    cases = {g: {} for g in generators}
    baseline_cases = {}
    started = time.monotonic()
    for k, name in enumerate(names):
        images, label = data.read_case(dataset, dataset.case(name))
        image = images[0] if len(images) == 1 else sitk.Compose(images)
        for g in generators:
            where = f"{name} ({k + 1}/{len(names)}, {g})"
            lr, hr_label, _ = synthesise_case(image, label, scale, g, seed=k)
            mask, _ = segment_image(
                lr,
                net,
                card,
                device,
                tta=args.tta,
                threshold=args.threshold,
                batch_size=1 if device.type == "cpu" else 4,
                progress=lambda stage, f, where=where: progress.update(stage, f, where),
                probabilities="none",
                # The HR image is segmented at the model's working resolution, onto its own grid.
                output_grid="input" if g == "hr" else "hr",
            )
            if not same_grid(Grid.from_image(mask), Grid.from_image(hr_label)):
                raise RuntimeError(
                    f"{name}: the HR mask's grid differs from the HR label's; the geometry rule is broken"
                )
            mask.CopyInformation(hr_label)  # equal up to float rounding
            cases[g][name] = metrics.score_case(mask, hr_label, fully)
            progress.log(f"{where}: Dice {cases[g][name]['dice']:.3f}")
        if args.baseline_interpolation:
            baseline_cases[name] = metrics.score_case(
                interpolation_baseline(hr_label, scale), hr_label, fully
            )
        progress.update("evaluate", (k + 1) / len(names), name)
    first = generators[0]
    result = {
        "model": card.get("name", str(args.model)),
        "dataset": str(Path(args.dataset).resolve()),
        "split": args.split,
        "scale": scale,
        "threshold": card_threshold(card, args.threshold),
        "tta": args.tta,
        "lr_input": first,
        "wall_time_s": round(time.monotonic() - started, 1),
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
    if args.baseline_interpolation:
        result["baseline"] = {
            "method": "HR label block-averaged to LR, upsampled linearly, thresholded at 0.5",
            "cases": baseline_cases,
            "summary": metrics.summarise(baseline_cases, dims),
        }
    if args.progress != "json":
        for g in generators:
            if len(generators) > 1:
                print(f"\nLR input: {g}")
            shown = dict(result, cases=cases[g], summary=metrics.summarise(cases[g], dims))
            print(format_report(shown))
        if len(generators) > 1:
            print("\n" + format_robustness(result))
    if args.json:
        imageio.write_text(json.dumps(_json_safe(result), indent=2) + "\n", args.json, args.overwrite)
    return 0
