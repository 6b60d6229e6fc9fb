"""Parameter counts and forward+backward time of the default 2D and 3D networks, beside the plain
U-Net baseline (no image-SR branch, no SDC, no learned upsampling) of the same widths.

    python benchmarks/network.py [--device cpu|cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from SASSRSegmentLib.model.losses import SASRLoss
from SASSRSegmentLib.model.network import SASRConfig, SASRNet

CASES = {
    "3D, LR 48^3 -> HR 96^3, batch 2": (dict(spatial_dims=3, features=(16, 32, 64, 128)), (2, 1, 48, 48, 48)),
    "2D, LR 160x160 -> HR 320x320, batch 16": (
        dict(spatial_dims=2, features=(16, 32, 64, 128, 256)),
        (16, 1, 160, 160),
    ),
}
BASELINE = dict(image_sr=False, sdc=False, learned_upsampling=False)


def time_step(
    net: SASRNet, shape: tuple[int, ...], device: torch.device, repeats: int
) -> tuple[float, float]:
    x = torch.randn(shape, device=device)
    hr = tuple(s * net.config.scale for s in shape[2:])
    mask = (torch.rand(shape[0], 1, *hr, device=device) > 0.9).float()
    image = torch.randn(shape[0], 1, *hr, device=device)
    loss_fn = SASRLoss()
    times = {}
    for mode in ("train", "eval"):
        getattr(net, mode)()
        best = float("inf")
        for _ in range(repeats + 1):  # the first run warms up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            if mode == "train":
                loss, _ = loss_fn(net(x), mask, image)
                loss.backward()
            else:
                with torch.no_grad():
                    net(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        times[mode] = best
    return times["train"], times["eval"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'configuration':44} {'network':10} {'params':>10} {'fwd+bwd s':>10} {'eval fwd s':>10}")
    for name, (kw, shape) in CASES.items():
        for label, extra in (("SASR full", {}), ("U-Net", BASELINE)):
            torch.manual_seed(0)
            net = SASRNet(SASRConfig(**kw, **extra)).to(device)
            params = sum(p.numel() for p in net.parameters())
            train_s, eval_s = time_step(net, shape, device, args.repeats)
            print(f"{name:44} {label:10} {params:>10,} {train_s:>10.2f} {eval_s:>10.2f}")


if __name__ == "__main__":
    main()
