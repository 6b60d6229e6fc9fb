"""Install a trained bundle as a bundled model, with the numbers `evaluate` measured in its card.

    python tools/install_model.py BUNDLE NAME --evaluation EVAL.json --evaluate-command "..." [--provenance TEXT]
        [--peer PEER.json ... --peer-command "..."]

Copies model.pt unchanged (its checksum stays valid) and writes model.json = the training card plus an
"evaluation" section (the summary `evaluate --json` wrote; with several --lr-input generators, the
first one's and the robustness table), the MONAI peer's robustness table beside it (--peer: the JSONs
`benchmarks/monai_peer_train.py evaluate --json` wrote; without --peer, the replaced card's) and
free-text provenance. What a card says about the model's use rather than its training (`postprocess`,
`plausibility`) is kept from the model it replaces.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "SASSRSegment"))

from SASSRSegmentLib.io.files import sha256_file  # noqa: E402
from SASSRSegmentLib.model.bundle import MODELS_DIR  # noqa: E402

MAX_BYTES = 20 * 1024 * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("name")
    parser.add_argument("--evaluation", type=Path, required=True, help="JSON written by `evaluate --json`")
    parser.add_argument("--evaluate-command", required=True, help="the evaluate command that wrote it")
    parser.add_argument("--provenance", default="", help="how the weights were produced, in words")
    parser.add_argument("--peer", type=Path, nargs="+", default=[], help="the MONAI peer's evaluate JSONs")
    parser.add_argument("--peer-command", default="", help="the commands that trained and scored the peer")
    args = parser.parse_args()

    card = json.loads((args.bundle / "model.json").read_text())
    weights = args.bundle / "model.pt"
    if sha256_file(weights) != card["weights_sha256"]:
        sys.exit(f"error: {weights} does not match its card's checksum")
    if weights.stat().st_size > MAX_BYTES:
        sys.exit(f"error: {weights} is larger than 20 MB")
    evaluation = json.loads(args.evaluation.read_text())
    card["name"] = args.name
    card["evaluation"] = {
        "command": args.evaluate_command,
        "split": evaluation["split"],
        "lr_input": evaluation["lr_input"],
        "tta": evaluation["tta"],
        "threshold": evaluation["threshold"],
        "summary": evaluation["summary"],
        "interpolation_of_perfect_lr_mask": evaluation.get("baseline", {}).get("summary"),
        "per_case_dice": {k: round(v["dice"], 4) for k, v in evaluation["cases"].items()},
    }
    if "robustness" in evaluation:
        card["evaluation"]["robustness"] = _robustness(evaluation)
    if args.peer:
        rows = {}
        for path in args.peer:
            rows.update(_robustness(json.loads(path.read_text())))
        card["evaluation"]["monai_peer"] = {"command": args.peer_command, "robustness": rows}
    if args.provenance:
        card["provenance"] = args.provenance
    target = MODELS_DIR / args.name
    if (target / "model.json").is_file():
        replaced = json.loads((target / "model.json").read_text())
        for key in ("postprocess", "plausibility"):
            if key in replaced and key not in card:
                card[key] = replaced[key]
        # The peer is the same trained U-Net whichever model it stands beside.
        peer = replaced.get("evaluation", {}).get("monai_peer")
        if peer and not args.peer:
            card["evaluation"]["monai_peer"] = peer
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, target / "model.pt")
    (target / "model.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"installed {args.name}: validation Dice {evaluation['summary']['mean']['dice']:.3f} -> {target}")
    return 0


def _robustness(evaluation: dict) -> dict:
    """Mean and worst-case Dice per LR generator of an `evaluate --json` result."""
    return {
        name: {"mean_dice": round(row["mean_dice"], 4), "min_dice": round(row["min_dice"], 4)}
        for name, row in evaluation["robustness"].items()
    }


if __name__ == "__main__":
    sys.exit(main())
