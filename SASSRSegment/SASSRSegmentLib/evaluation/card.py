"""A model card's robustness table: made from an `evaluate` result, and checked against a new one.

The card keeps the Dice of every validation case for every LR input that `evaluate --lr-input all`
scored, with the command and settings that produced them, so that anyone holding the dataset can
rerun the command (`evaluate --check-card`) and see the card's numbers come out again.
"""

from __future__ import annotations

from ..runtime.errors import UserError

# A case's Dice on another machine: the same CPU code gives the same numbers to 1e-5, but a GPU's
# reduced-precision convolutions flip a few boundary voxels, a few thousandths of Dice at most.
TOLERANCE = 0.005

_SETTINGS = ("split", "threshold", "tta")


def scored_inputs(result: dict) -> dict[str, dict[str, float]]:
    """{LR input: {case: Dice}} of an `evaluate` result, one input or several."""
    if "robustness" in result:
        return {g: dict(row["cases"]) for g, row in result["robustness"].items()}
    return {result["lr_input"]: {name: scores["dice"] for name, scores in result["cases"].items()}}


def robustness_section(result: dict, command: str, held_out: list[str]) -> dict:
    """The card's `robustness` entry for `result`: per input its mean, worst case and every case."""
    inputs = {}
    for g, cases in scored_inputs(result).items():
        values = list(cases.values())
        inputs[g] = {
            "mean_dice": round(sum(values) / len(values), 4),
            "min_dice": round(min(values), 4),
            "cases": {name: round(float(d), 4) for name, d in cases.items()},
        }
    unknown = sorted(set(held_out) - set(inputs))
    if unknown:
        raise UserError(f"held-out input(s) {', '.join(unknown)} were not scored in this result")
    return {
        "command": command,
        **{key: result[key] for key in _SETTINGS},
        "held_out_of_training": sorted(held_out),
        "inputs": inputs,
    }


def check_settings(card: dict, settings: dict) -> None:
    """Refuse, before any scoring, a check the card's table cannot answer: no table, or other settings."""
    table = card.get("robustness")
    if not table:
        raise UserError(f"the card of {card.get('name', 'this model')!r} holds no robustness table to check")
    changed = [key for key in _SETTINGS if table.get(key) != settings.get(key)]
    if changed:
        wanted = ", ".join(f"{key} {table.get(key)!r}" for key in changed)
        raise UserError(f"--check-card: the card's table was measured with {wanted}; evaluate with the same")


def check_against_card(result: dict, card: dict, tolerance: float = TOLERANCE) -> tuple[int, list[str]]:
    """(numbers compared, the differences in words) between `result` and the card's robustness table,
    over the inputs and cases both hold."""
    check_settings(card, result)
    compared, differences = 0, []
    for g, cases in scored_inputs(result).items():
        recorded = card["robustness"]["inputs"].get(g, {}).get("cases", {})
        for name, dice in cases.items():
            if name not in recorded:
                continue
            compared += 1
            if abs(dice - recorded[name]) > tolerance:
                differences.append(f"{g} {name} {dice:.3f} (card {recorded[name]:.3f})")
    if compared == 0:
        raise UserError(
            "--check-card: the card's robustness table holds none of the inputs and cases scored here"
        )
    return compared, differences
