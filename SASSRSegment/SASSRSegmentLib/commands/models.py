"""The `models` command: the bundled models and their card summaries."""

from __future__ import annotations

import argparse
import json

from ..model.bundle import (
    MODELS_DIR,
    bundled_models,
    load_bundle,
    read_card,
    robustness_dice,
    validation_dice,
    weights_state,
)
from ..runtime.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the summaries as JSON")


def summarise(name: str, card: dict) -> dict:
    """The few card fields a user picks a model by; `name` is what `--model` takes (the folder's)."""
    prep = card.get("preprocessing", {})
    return {
        "name": name,
        "card_name": card.get("name", name),
        "modality": card.get("modality"),
        "task": card.get("task"),
        "spatial_dims": prep.get("spatial_dims"),
        "scale": prep.get("scale"),
        "lr_spacing_mm": prep.get("lr_spacing"),
        "lr_longer_side": prep.get("lr_longer_side"),
        "threshold": card.get("threshold"),
        "validation_dice": validation_dice(card),
        "robustness_dice": robustness_dice(card),
        "description": card.get("description"),
    }


def _spread(robustness: dict) -> str:
    values = list(robustness.values())
    if len(values) < 2:
        return ""
    return f" ({min(values):.3f}-{max(values):.3f} over {len(values)} LR inputs)"


def _input_policy(summary: dict) -> str:
    if summary["lr_spacing_mm"]:
        return "LR " + "x".join(f"{s:g}" for s in summary["lr_spacing_mm"]) + " mm"
    if summary["lr_longer_side"]:
        return f"LR longer side {summary['lr_longer_side']} px"
    return "?"


def _load_error(folder) -> str | None:
    """Why weights without a checksum do not load into the card's network; None where they do."""
    try:
        load_bundle(folder)
    except UserError as exc:
        return str(exc)
    return None


def run(args: argparse.Namespace) -> int:
    rows = []
    for name, folder in bundled_models().items():
        try:
            card = read_card(folder)
            summary = summarise(name, card)
        except UserError as exc:
            card, summary = {}, {"name": name, "error": str(exc)}
        summary["folder"] = str(folder)
        # A broken copy listed as healthy was refused only once used.
        summary["weights"] = weights_state(folder, card)
        if summary["weights"] == "unchecked" and "error" not in summary:
            error = _load_error(folder)
            summary["weights"] = "ok" if error is None else "damaged"
            if error:
                summary["weights_error"] = error
        rows.append(summary)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no bundled models in {MODELS_DIR}; pass --model with a bundle folder written by `train`")
        return 0
    for row in rows:
        if "error" in row:
            print(f"{row['name']}: unusable ({row['error']})")
            continue
        dice = row["validation_dice"]
        named = "" if row["card_name"] == row["name"] else f" (card name {row['card_name']!r})"
        weights = "" if row["weights"] == "ok" else f", WEIGHTS {row['weights'].upper()}"
        if "weights_error" in row:
            weights += f" ({row['weights_error']})"
        print(
            f"{row['name']}{named}: {row['spatial_dims']}D, x{row['scale']}, {_input_policy(row)}, "
            f"{row['modality'] or 'modality not stated'}, validation Dice "
            f"{'n/a' if dice is None else f'{dice:.3f}'}{_spread(row['robustness_dice'])}{weights}"
        )
        if row["description"]:
            print(f"    {row['description']}")
    return 0
