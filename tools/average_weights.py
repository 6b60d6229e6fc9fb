"""Average the weights of several checkpoints of one run into a model bundle (stochastic weight
averaging, Izmailov et al. 2018): points along a run at a constant learning rate lie around a minimum,
and their mean is often nearer its centre than any of them.

    python tools/average_weights.py RUN/checkpoint_a.pt RUN/checkpoint_b.pt ... \
        --card RUN/model.json --output runs/averaged

Each checkpoint contributes its exponential average of the weights where it keeps one, else its
weights. Batch-norm running statistics are averaged like the weights (as `training/averaging.py`
does); integer buffers come from the last checkpoint. The bundle's card is `--card` with the averaged
checkpoints' steps recorded under "training"; evaluate it before installing it (tools/install_model.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "SASSRSegment"))

from SASSRSegmentLib.model.bundle import save_bundle  # noqa: E402
from SASSRSegmentLib.model.network import SASRConfig, SASRNet  # noqa: E402


def checkpoint_weights(path: Path) -> tuple[dict, int]:
    """(the weights a checkpoint ships: its average where it keeps one, the step)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    average = state.get("average")
    return (average["weights"] if average else state["model"]), int(state["step"])


def average(states: list[dict]) -> dict:
    out = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            out[key] = torch.stack([s[key].float() for s in states]).mean(0)
        else:
            out[key] = last.clone()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--card", type=Path, required=True, help="the run's model.json")
    parser.add_argument("--output", type=Path, required=True, help="bundle folder to write")
    args = parser.parse_args(argv)
    if args.output.exists():
        raise SystemExit(f"error: {args.output} exists; choose a new folder")
    loaded = [checkpoint_weights(p) for p in args.checkpoints]
    card = json.loads(args.card.read_text())
    net = SASRNet(SASRConfig.from_dict(card["network"]))
    net.load_state_dict(average([weights for weights, _ in loaded]))
    card.setdefault("training", {})["weight_average_of_steps"] = [step for _, step in loaded]
    save_bundle(args.output, net.eval(), card)
    print(f"averaged {len(loaded)} checkpoints (steps {[s for _, s in loaded]}) into {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
