"""Dice of a model at several probability thresholds, on every case of a dataset (training and validation),
per LR input (docs/models.md, "Is the threshold a lever?").

    python tools/threshold_sweep.py MODEL DATASET [OUT.json]

Each case's LR input is made as `evaluate` makes it; the probabilities are predicted once and thresholded
at each value, then the card's small-component removal runs, as `segment` does. The last lines give the
mean per threshold over the card's training and validation cases: a threshold chosen on the training cases
is not tuned to the validation split.
"""

import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "SASSRSegment"))

from SASSRSegmentLib.data import datasets  # noqa: E402
from SASSRSegmentLib.evaluation import metrics  # noqa: E402
from SASSRSegmentLib.evaluation.scoring import synthesise_case  # noqa: E402
from SASSRSegmentLib.inference.lesions import drop_small_components  # noqa: E402
from SASSRSegmentLib.inference.pipeline import segment_image  # noqa: E402
from SASSRSegmentLib.model.bundle import load_bundle  # noqa: E402
from SASSRSegmentLib.runtime.devices import select_device  # noqa: E402

THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6)
INPUTS = ("block", "gaussian-linear", "thick-slice-5mm")


def sweep(probabilities: np.ndarray, label: np.ndarray, min_fraction: float) -> dict[float, float]:
    """Dice at each threshold, as `evaluate` scores it, after the card's component removal."""
    dice = {}
    for t in THRESHOLDS:
        mask = sitk.GetImageFromArray((probabilities >= t).astype(np.uint8))
        dice[t] = metrics.overlap(drop_small_components(mask, min_fraction), label)["dice"]
    return dice


def main() -> None:
    device = select_device("cpu")
    card, net = load_bundle(sys.argv[1], device, for_prediction=True)
    dataset = datasets.open_dataset(sys.argv[2], labels=card["preprocessing"].get("labels"))
    scale = int(card["preprocessing"]["scale"])
    min_fraction = float(card.get("postprocess", {}).get("min_component_fraction", 0))
    val = set(card["training"]["split"]["val"])
    scores: dict = {}
    for k, case in enumerate(dataset.cases):
        images, label = datasets.read_case(dataset, case)
        image = images[0] if len(images) == 1 else sitk.Compose(images)
        for g in INPUTS:
            lr, hr_label, _ = synthesise_case(image, label, scale, g, seed=k)
            _, probabilities = segment_image(lr, net, card, device, probabilities="float32")
            row = sweep(
                sitk.GetArrayFromImage(probabilities), sitk.GetArrayViewFromImage(hr_label) > 0, min_fraction
            )
            scores.setdefault(case.name, {})[g] = row
            print(
                case.name,
                "val" if case.name in val else "train",
                g,
                " ".join(f"{v:.3f}" for v in row.values()),
            )
    for part in ("train", "val"):
        names = [n for n in scores if (n in val) == (part == "val")]
        for g in INPUTS:
            means = [np.mean([scores[n][g][t] for n in names]) for t in THRESHOLDS]
            print(part, len(names), g, " ".join(f"{t}: {m:.4f}" for t, m in zip(THRESHOLDS, means)))
    if len(sys.argv) > 3:
        Path(sys.argv[3]).write_text(json.dumps(scores, indent=1))


if __name__ == "__main__":
    main()
