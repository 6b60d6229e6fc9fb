"""Dice of a 3D model on its validation cases under heavier Rician noise than `evaluate`'s rician-2pct,
and with each LR input smoothed before segmenting (docs/models.md, "Noise was the limit not yet
handled"). `segment` smooths a scan noisier than clean ones itself (inference/noise.py), so since then
the noisy rows at --sigma 0 show what it gives.

    python tools/noise_smoothing.py MODEL DATASET [--noise 5,10] [--sigma 0,0.5,0.7] [--inputs block,...]

Each LR input is made as `evaluate` makes it (`data/lowres.py`), or as the block average with Rician
noise of N % of its range (`--noise`), then smoothed by a Gaussian of each `--sigma` (in LR voxels; 0:
as it is), and scored through `evaluate`'s own code. Prints per case Dice and the mean per input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "SASSRSegment"))

from SASSRSegmentLib.data import datasets, lowres  # noqa: E402
from SASSRSegmentLib.evaluation.scoring import ScoringOptions, score_cases  # noqa: E402
from SASSRSegmentLib.model.bundle import load_bundle  # noqa: E402
from SASSRSegmentLib.runtime.devices import select_device  # noqa: E402
from SASSRSegmentLib.runtime.progress import Progress  # noqa: E402


def smoothed(make, sigma: float):
    def smooth(hr: sitk.Image, scale: int, rng: np.random.Generator) -> sitk.Image:
        lr = make(hr, scale, rng)
        return lr if sigma == 0 else sitk.SmoothingRecursiveGaussian(lr, [sigma * s for s in lr.GetSpacing()])

    return smooth


def numbers(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(usage=__doc__)
    parser.add_argument("model")
    parser.add_argument("dataset")
    parser.add_argument("--noise", type=numbers, default=[5.0, 10.0], help="Rician noise, %% of the range")
    parser.add_argument("--sigma", type=numbers, default=[0.0], help="smoothing, LR voxels")
    parser.add_argument("--inputs", default="", help="evaluate's generators too, comma-separated")
    args = parser.parse_args()
    makers = {f"rician-{p:g}pct": lowres.rician(p) for p in args.noise}
    makers |= {name: lowres.GENERATORS[name][0] for name in args.inputs.split(",") if name}
    names = []
    for name, make in makers.items():
        for sigma in args.sigma:
            label = f"{name}, smoothed {sigma:g}"
            lowres.GENERATORS[label] = (smoothed(make, sigma), (3,))
            names.append(label)
    device = select_device("auto")
    card, net = load_bundle(args.model, device, for_prediction=True)
    dataset = datasets.open_dataset(args.dataset, labels=card["preprocessing"].get("labels"))
    cases = card["training"]["split"]["val"]
    scores = score_cases(dataset, cases, net, card, device, names, ScoringOptions(), Progress("quiet"))
    print("input".ljust(36), *[c[-12:].rjust(12) for c in cases], "mean".rjust(8))
    for name in names:
        dice = [scores["cases"][name][c]["dice"] for c in cases]
        print(name.ljust(36), *[f"{d:12.3f}" for d in dice], f"{np.mean(dice):8.3f}")


if __name__ == "__main__":
    main()
