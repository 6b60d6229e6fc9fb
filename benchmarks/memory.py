"""Peak memory of `segment`'s core on a large volume for each way of keeping probabilities.

    python benchmarks/memory.py [--size X Y Z]

Each row runs in its own process (peak RSS is per process) through `pipeline.segment_image` with the
bundled brain model's card, on the shipped brain sample tiled to the size asked for (default: the
issue's 512x512x300 at 2 mm). The network is a stand-in that upsamples its input (no convolutions),
so a row takes a minute or two instead of the real network's 13: memory outside the network (input,
normalisation, blending slab, mask, probabilities, post-processing, lesion table) is what this
measures, and it does not depend on the weights. Rows:
  none      mask only (`evaluate`; `segment` without --probabilities or --lesion-table)
  uint8     8-bit probabilities (`segment --lesion-table`, what the Slicer module runs)
  float32   float32 probabilities (`segment --probabilities`)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

KINDS = ("none", "uint8", "float32")


class Upsampler(torch.nn.Module):
    """HR logits from the linearly upsampled, normalised input: bright tissue becomes 'lesion'."""

    def __init__(self, scale: int):
        super().__init__()
        self.scale = scale
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = "trilinear" if x.dim() == 5 else "bilinear"
        return (F.interpolate(x, scale_factor=self.scale, mode=mode) - 2.0) * 4.0


def run_one(kind: str, size: list[int]) -> dict:
    from inference import tiled_sample  # benchmarks/inference.py, beside this file

    from SASSRSegmentLib.inference import lesions
    from SASSRSegmentLib.inference.pipeline import segment_image
    from SASSRSegmentLib.model.bundle import bundled_models, read_card

    card = read_card(bundled_models()["brain-tumour-flair-3d"])
    image = tiled_sample(tuple(size))
    net = Upsampler(int(card["preprocessing"]["scale"]))
    start = time.perf_counter()
    mask, probabilities = segment_image(image, net, card, torch.device("cpu"), probabilities=kind)
    rows = lesions.lesion_table(mask, probabilities) if kind != "none" else []
    wall = time.perf_counter() - start
    return {
        "kind": kind,
        "output": "x".join(map(str, mask.GetSize())),
        "lesions": len(rows),
        "wall_s": wall,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs=3, type=int, default=[512, 512, 300], metavar=("X", "Y", "Z"))
    parser.add_argument("--one", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.size)))
        return
    print(f"LR input {'x'.join(map(str, args.size))} at 2 mm (brain sample tiled), stand-in network, CPU")
    print(f"{'probabilities':<14} {'HR output':<16} {'lesions':>8} {'wall s':>8} {'peak RSS GiB':>13}")
    for kind in KINDS:
        command = [sys.executable, __file__, "--one", kind, "--size", *map(str, args.size)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{kind}: failed\n{done.stderr}", file=sys.stderr)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{kind:<14} {r['output']:<16} {r['lesions']:>8} {r['wall_s']:>8.1f} {r['peak_rss_gib']:>13.2f}"
        )


if __name__ == "__main__":
    main()
