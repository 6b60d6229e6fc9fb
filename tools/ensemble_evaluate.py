"""Score two brain (or any two same-input) bundles averaged, as `evaluate` scores one: the measurement
behind distillation (docs/models.md, "Two models averaged, and a network taught by them").

    python tools/ensemble_evaluate.py MODEL_A MODEL_B DATASET [--weight 0.5] [--lr-input block,...] [--json OUT]

The networks' HR logits are averaged (`weight` on MODEL_A) and the result goes through `evaluate`'s
own scoring (`evaluation.scoring.score_cases`) with MODEL_A's card: its preprocessing, threshold and
post-processing, on the card's validation split. Per case and generator Dice, then the report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "SASSRSegment"))

from SASSRSegmentLib.commands.evaluate import lr_inputs  # noqa: E402
from SASSRSegmentLib.data import datasets  # noqa: E402
from SASSRSegmentLib.evaluation.report import format_reports  # noqa: E402
from SASSRSegmentLib.evaluation.scoring import ScoringOptions, assemble_result, score_cases  # noqa: E402
from SASSRSegmentLib.model.bundle import load_bundle  # noqa: E402
from SASSRSegmentLib.runtime.devices import select_device  # noqa: E402
from SASSRSegmentLib.runtime.progress import Progress  # noqa: E402


class Averaged(torch.nn.Module):
    """Weighted mean of the networks' HR logits; the first network's config (its window rules)."""

    def __init__(self, nets, weights):
        super().__init__()
        self.nets, self.weights, self.config = torch.nn.ModuleList(nets), weights, nets[0].config

    def forward(self, x):
        return sum(w * net(x) for w, net in zip(self.weights, self.nets))


def main() -> None:
    parser = argparse.ArgumentParser(usage=__doc__)
    parser.add_argument("model_a")
    parser.add_argument("model_b")
    parser.add_argument("dataset")
    parser.add_argument("--weight", type=float, default=0.5)
    parser.add_argument("--lr-input", default="block")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = select_device("auto")
    card, a = load_bundle(args.model_a, device, for_prediction=True)
    _, b = load_bundle(args.model_b, device, for_prediction=True)
    net = Averaged([a, b], [args.weight, 1 - args.weight]).eval()
    prep = card["preprocessing"]
    generators = lr_inputs(args.lr_input, int(prep["spatial_dims"]))
    dataset = datasets.open_dataset(args.dataset, labels=prep.get("labels"))
    names = card["training"]["split"]["val"]
    options = ScoringOptions()
    scores = score_cases(dataset, names, net, card, device, generators, options, Progress("quiet"))
    result = assemble_result(scores, card, generators, options, "averaged", args.dataset, "val")
    print(format_reports(result, generators))
    per_case = {g: {c: s.get("dice") for c, s in scores["cases"][g].items()} for g in generators}
    if args.json:
        args.json.write_text(json.dumps(per_case, indent=1) + "\n")


if __name__ == "__main__":
    main()
