"""Sliding-window HR prediction: LR windows in, Gaussian-blended HR lesion probabilities out."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch

from .devices import autocast
from .network import SASRNet


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start positions covering [0, size) with windows of `window` overlapping by about `overlap`."""
    if size <= window:
        return [0]
    step = max(1, int(round(window * (1 - overlap))))
    count = int(np.ceil((size - window) / step)) + 1
    return sorted({int(round(v)) for v in np.linspace(0, size - window, count)})


def gaussian_importance(shape: tuple[int, ...], sigma_scale: float = 0.125) -> torch.Tensor:
    """Weights that trust window centres more than borders (borders lack context)."""
    axes = []
    for n in shape:
        x = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        axes.append(torch.exp(-0.5 * (x / max(n * sigma_scale, 1e-3)) ** 2))
    weight = axes[0]
    for a in axes[1:]:
        weight = weight[..., None] * a
    weight = weight / weight.max()
    return weight.clamp_min(1e-3)


def _flips(spatial_dims: int, tta: bool) -> list[tuple[int, ...]]:
    if not tta:
        return [()]
    dims = range(2, 2 + spatial_dims)
    return [c for r in range(spatial_dims + 1) for c in itertools.combinations(dims, r)]


@torch.no_grad()
def sliding_window_predict(
    net: SASRNet,
    lr: torch.Tensor,
    window_lr: tuple[int, ...],
    scale: int,
    overlap: float = 0.5,
    batch_size: int = 4,
    device: torch.device | None = None,
    tta: bool = False,
    progress: Callable[[float], None] | None = None,
    amp: bool = True,
    output: str = "mask",
) -> torch.Tensor:
    """HR lesion probabilities (float32, CPU, shape spatial * scale) for one LR image (C, *spatial).

    With output="image", the image-SR decoder's HR image (C, *spatial * scale) instead: only then
    does that decoder run. Windows larger than the image shrink to it (the network pads internally).
    With `tta`, every combination of axis flips is averaged. `progress(fraction)` is called after each
    batch; a KeyboardInterrupt raised there (or anywhere) stops the work at once.
    """
    if output == "mask":
        channels = 1

        def predict(x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(net(x).float())
    elif output == "image":
        channels = lr.shape[0]

        def predict(x: torch.Tensor) -> torch.Tensor:
            return net.super_resolve_image(x).float()
    else:
        raise ValueError(f"output must be 'mask' or 'image', got {output!r}")
    was_training = net.training
    net.eval()
    device = device or next(net.parameters()).device
    spatial = tuple(lr.shape[1:])
    d = len(spatial)
    window = tuple(min(w, n) for w, n in zip(window_lr, spatial, strict=True))
    hr_window = tuple(w * scale for w in window)
    importance = gaussian_importance(hr_window)
    accumulated = torch.zeros((channels, *(n * scale for n in spatial)), dtype=torch.float32)
    weights = torch.zeros(accumulated.shape[1:], dtype=torch.float32)
    starts = list(
        itertools.product(*(window_starts(n, w, overlap) for n, w in zip(spatial, window, strict=True)))
    )
    flips = _flips(d, tta)
    try:
        for b in range(0, len(starts), batch_size):
            chunk = starts[b : b + batch_size]
            batch = torch.stack(
                [
                    lr[(slice(None), *(slice(s, s + w) for s, w in zip(st, window, strict=True)))]
                    for st in chunk
                ]
            ).to(device)
            pred = torch.zeros((len(chunk), channels, *hr_window), device=device)
            for axes in flips:
                x = torch.flip(batch, axes) if axes else batch
                with autocast(device, amp):
                    y = predict(x)
                pred += torch.flip(y, axes) if axes else y
            pred = (pred / len(flips)).cpu()
            for st, p in zip(chunk, pred, strict=True):
                region = tuple(slice(s * scale, (s + w) * scale) for s, w in zip(st, window, strict=True))
                accumulated[(slice(None), *region)] += p * importance
                weights[region] += importance
            if progress is not None:
                progress(min(1.0, (b + len(chunk)) / len(starts)))
    finally:
        net.train(was_training)
    accumulated /= weights  # in place: the HR volume is the largest thing held
    return accumulated[0] if output == "mask" else accumulated
