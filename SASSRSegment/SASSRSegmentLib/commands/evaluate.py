"""The `evaluate` command: HR scores of a model on a dataset (see evaluation/scoring.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..data import datasets, lowres
from ..evaluation.card import TOLERANCE, check_against_card, check_settings
from ..evaluation.report import format_reports, json_safe
from ..evaluation.scoring import ScoringOptions, assemble_result, case_names, lr_inputs, score_cases
from ..inference.pipeline import card_threshold
from ..io import imageio
from ..runtime.errors import UserError
from ..runtime.progress import Progress
from .segment import add_prediction_arguments, check_prediction_arguments

# The command line runs this command in a worker thread: a cancel then takes effect within a second at
# every stage (see commands/runner.run_command).
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
        "--check-card",
        action="store_true",
        help=f"compare every case's Dice with the model card's robustness table (within {TOLERANCE}); "
        "exit status 1 where they differ",
    )
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


def _labels(labels: list[int] | None, meta: dict, progress: Progress) -> list[int] | None:
    """The card's lesion labels where this dataset declares them; else every value > 0, said in the log
    (a card records its training data's values: another dataset may call its lesion 255 or 2)."""
    if not labels:
        return None
    declared = datasets.declared_values(meta)
    if set(labels) <= declared:
        return labels
    progress.log(
        f"the model's lesion label(s) {labels} are not in this dataset.json ({sorted(declared)}): every label "
        "value > 0 is scored as lesion"
    )
    return None


def run(args: argparse.Namespace) -> int:
    from ..model.bundle import load_bundle
    from ..runtime.devices import describe, select_device

    check_prediction_arguments(args)
    if args.json:
        imageio.check_output_path(args.json, args.overwrite, (".json",))
    progress = Progress(args.progress)
    device = select_device(args.device)
    card, net = load_bundle(args.model, device, for_prediction=True)
    prep = card["preprocessing"]
    dims = int(prep["spatial_dims"])
    generators = lr_inputs(args.lr_input, dims)
    dataset = datasets.open_dataset(args.dataset)
    labels = _labels(prep.get("labels"), dataset.meta, progress)
    dataset = dataclasses.replace(dataset, lesion_values=datasets.resolve_lesion_values(dataset.meta, labels))
    if dataset.spatial_dims != dims:
        raise UserError(
            f"dataset {dataset.name} is {dataset.spatial_dims}D but model {card.get('name', args.model)!r} is "
            f"{prep['spatial_dims']}D"
        )
    names = case_names(dataset, card, args.split)
    if args.check_card:
        settings = {"split": args.split, "threshold": card_threshold(card, args.threshold), "tta": args.tta}
        check_settings(card, settings)
    progress.log(f"device: {describe(device)}; {len(names)} case(s) of {dataset.name}")
    options = ScoringOptions(
        tta=args.tta,
        threshold=args.threshold,
        fully_connected=not args.face_connected,
        baseline_interpolation=args.baseline_interpolation,
    )
    scores = score_cases(dataset, names, net, card, device, generators, options, progress)
    result = assemble_result(scores, card, generators, options, args.model, args.dataset, args.split)
    if args.progress != "json":
        print(format_reports(result, generators))
    if args.json:
        imageio.write_text(json.dumps(json_safe(result), indent=2) + "\n", args.json, args.overwrite)
    return _report_check(result, card, progress) if args.check_card else 0


def _report_check(result: dict, card: dict, progress: Progress) -> int:
    compared, differences = check_against_card(result, card)
    if differences:
        shown = "; ".join(differences[:4]) + (" ..." if len(differences) > 4 else "")
        print(
            f"the model card's robustness table differs from this evaluation in {len(differences)} of "
            f"{compared} case scores (tolerance {TOLERANCE}): {shown}",
            file=sys.stderr,
        )
        return 1
    agrees = f"the model card's robustness table agrees with this evaluation: {compared} case scores within {TOLERANCE}"
    if progress.mode == "json":  # stdout carries one JSON record per line there
        progress.log(agrees)
    else:
        print(agrees)
    return 0
