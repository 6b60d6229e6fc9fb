"""Write a model card's robustness table from `evaluate --json` results (docs/models.md).

    python tools/card_robustness.py BUNDLE EVALUATE.json --command "python -m SASSRSegmentLib evaluate ..." \
        --held-out lanczos [--peer PEER.json --peer-command "python benchmarks/monai_peer_train.py ..."]
    python tools/card_robustness.py BUNDLE --peer PEER.json --peer-command "..."   (the card's table kept)

EVALUATE.json is `evaluate --lr-input all --json` of the bundle; PEER.json the same table for the MONAI
U-Net peer (`benchmarks/monai_peer_train.py evaluate --json`), kept beside it for comparison. The card's
other entries are left as they are; `evaluate --check-card` then reruns the bundle's numbers.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "SASSRSegment"))

from SASSRSegmentLib.evaluation.card import robustness_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("result", type=Path, nargs="?", help="without it the card's table is kept")
    parser.add_argument("--command", help="the evaluate command that wrote RESULT")
    parser.add_argument("--held-out", default="", help="LR inputs of no kind the training synthesis makes")
    parser.add_argument("--peer", type=Path)
    parser.add_argument("--peer-command")
    args = parser.parse_args()
    card_path = args.bundle / "model.json"
    card = json.loads(card_path.read_text())
    held_out = [g for g in args.held_out.split(",") if g]
    if args.result is not None:
        if not args.command:
            parser.error("--command is required with RESULT")
        section = robustness_section(json.loads(args.result.read_text()), args.command, held_out)
    elif args.peer and "robustness" in card:
        section = card["robustness"]
        held_out = held_out or section.get("held_out_of_training", [])
    else:
        parser.error("give RESULT, or --peer for a card that has a robustness table")
    if args.peer:
        peer = json.loads(args.peer.read_text())
        section["peer"] = {"model": peer["model"], **robustness_section(peer, args.peer_command, held_out)}
    card["robustness"] = section
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    for g, row in section["inputs"].items():
        peer_row = section.get("peer", {}).get("inputs", {}).get(g)
        beside = f"   peer {peer_row['mean_dice']:.4f} ({peer_row['min_dice']:.4f})" if peer_row else ""
        print(f"{g:<18} {row['mean_dice']:.4f} ({row['min_dice']:.4f}){beside}")


if __name__ == "__main__":
    main()
