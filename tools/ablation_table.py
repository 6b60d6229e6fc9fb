"""Markdown table of `evaluate --json` results, one row per run, with the training steps from each card.

python tools/ablation_table.py "label=BUNDLE_DIR:EVAL.json" ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(label: str, bundle: Path, evaluation: Path) -> str:
    card = json.loads((bundle / "model.json").read_text())
    s = json.loads(evaluation.read_text())["summary"]
    m, strata = s["mean"], s["strata"]
    steps = card["training"].get("steps")
    cells = [label, str(steps), f"{m['dice']:.3f}", f"{m['iou']:.3f}", f"{m['hd95_mm']:.1f}"]
    cells += [f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['lesion_sensitivity']:.3f}"]
    cells += [f"{m['false_positive_lesions']:.2f}"]
    cells += [
        f"{strata[k]['mean_lesion_dice']:.3f} ({strata[k]['lesions']})" for k in ("small", "medium", "large")
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str]) -> int:
    head = ["run", "steps", "Dice", "IoU", "HD95 mm", "precision", "recall", "lesion sens.", "FP/case"]
    head += ["small: lesion Dice (n)", "medium", "large"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    definition = None
    for arg in argv:
        label, paths = arg.split("=", 1)
        bundle, evaluation = paths.split(":", 1)
        print(row(label, Path(bundle), Path(evaluation)))
        definition = json.loads(Path(evaluation).read_text())["summary"]["strata_definition"]
    print(f"\nStrata: {definition}.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
