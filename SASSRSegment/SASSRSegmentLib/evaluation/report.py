"""Evaluation reports: the per-case and summary table, the robustness table, JSON-safe results."""

from __future__ import annotations

import math

from . import metrics


def json_safe(value):
    """NaN is not JSON: write null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
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

    def line(name: str, scores: dict, base: dict | None, per_case: bool = True) -> str:
        # A case's false positives are a count; their mean is not (0.3 had printed as 0).
        counted = 0 if per_case else 2
        cells = [f"{_fmt(scores[c], counted if c == 'false_positive_lesions' else 3):>8}" for c in columns]
        extra = f"  {_fmt(base['dice']):>11}" if base else ""
        return f"{name:<{width}} " + " ".join(cells) + extra

    for name, scores in result["cases"].items():
        lines.append(line(name, scores, baseline["cases"][name] if baseline else None))
    summary = result["summary"]
    lines.append(line("mean", summary["mean"], baseline["summary"]["mean"] if baseline else None, False))
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


def format_robustness(result: dict) -> str:
    lines = ["LR input             mean Dice  worst case", "-" * 42]
    for name, row in result["robustness"].items():
        lines.append(f"{name:<20} {_fmt(row['mean_dice']):>9}  {_fmt(row['min_dice']):>10}")
    return "\n".join(lines)


def format_reports(result: dict, generators: list[str]) -> str:
    """The report of each generator, then the robustness table when there are several."""
    parts = []
    for g in generators:
        shown = result
        if len(generators) > 1:
            scored = result["generators"][g]
            shown = dict(result, cases=scored["cases"], summary=scored["summary"])
        parts.append((f"\nLR input: {g}\n" if len(generators) > 1 else "") + format_report(shown))
    if len(generators) > 1:
        parts.append("\n" + format_robustness(result))
    return "\n".join(parts)
