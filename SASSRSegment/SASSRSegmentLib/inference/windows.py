"""Sliding-window HR prediction: LR windows in, Gaussian-blended HR lesion probabilities out."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from ..model.network import SASRNet
from ..runtime.devices import autocast
from ..runtime.errors import UserError


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start positions covering [0, size) with windows of `window` overlapping by about `overlap`."""
    if size <= window:
        return [0]
    step = max(1, int(round(window * (1 - overlap))))
    count = int(np.ceil((size - window) / step)) + 1
    return sorted({int(round(v)) for v in np.linspace(0, size - window, count)})


def gaussian_weights(n: int, sigma_scale: float = 0.125) -> torch.Tensor:
    """Weights along one window axis that trust the centre more than the borders (borders lack context)."""
    x = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
    weight = torch.exp(-0.5 * (x / max(n * sigma_scale, 1e-3)) ** 2)
    return (weight / weight.max()).clamp_min(1e-3)


def _outer(vectors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The outer product of 1D tensors."""
    product = torch.ones(())
    for v in vectors:
        product = product[..., None] * v
    return product


def gaussian_importance(shape: tuple[int, ...], sigma_scale: float = 0.125) -> torch.Tensor:
    """A window's blending weights: the outer product of `gaussian_weights` along each axis."""
    return _outer(gaussian_weights(n, sigma_scale) for n in shape)


def _flips(spatial_dims: int, tta: bool, axes: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    if not tta:
        return [()]
    dims = [2 + a for a in (range(spatial_dims) if axes is None else axes)]
    return [c for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]


class _SlabBlender:
    """Gaussian blending of HR window predictions, finished slab by slab along the first axis.

    Windows arrive ordered by their start on the first axis (the outer loop of the start grid). Once
    the next start on that axis is reached, the rows before it get no more contributions: they are
    divided by their blending weight and handed to `sink(first_row, block)`. Only one window's depth
    of HR rows is ever accumulated. The starts form a Cartesian product, so the summed weight at a
    voxel is the product of per-axis sums and needs no HR-sized array of its own.
    """

    def __init__(self, channels, hr_shape, hr_window, starts_per_axis, scale, sink):
        self.sink = sink
        axis_weights = [gaussian_weights(w) for w in hr_window]
        sums = []
        for n, starts, w in zip(hr_shape, starts_per_axis, axis_weights):
            total = torch.zeros(n)
            for s in starts:
                total[s * scale : s * scale + len(w)] += w
            sums.append(total)
        self.row_sums = sums[0]
        self.plane_sums = _outer(sums[1:])
        self.importance = _outer(axis_weights)
        self.first_row = 0  # the HR row that buffer[:, 0] holds
        self.n_rows = hr_shape[0]
        # One window is the whole volume: nothing to blend, and it goes to the sink as it is (weighting
        # and unweighting it cost 20 ms of the brain sample's prediction).
        self.single = all(len(starts) == 1 for starts in starts_per_axis)
        self.buffer = None if self.single else torch.zeros((channels, hr_window[0], *hr_shape[1:]))

    def add(self, hr_start: tuple[int, ...], prediction: torch.Tensor) -> None:
        if self.single:
            self.sink(0, prediction)
            self.first_row = self.n_rows
            return
        if hr_start[0] > self.first_row:
            self.finish(hr_start[0])
        region = tuple(slice(s, s + n) for s, n in zip(hr_start[1:], prediction.shape[2:]))
        self.buffer[(slice(None), slice(0, prediction.shape[1]), *region)] += prediction * self.importance

    def finish(self, upto: int | None = None) -> None:
        """Hand rows [first_row, upto) (all remaining rows by default) to the sink."""
        upto = self.n_rows if upto is None else upto
        count = upto - self.first_row
        if count <= 0:
            return
        weights = self.row_sums[self.first_row : upto].reshape(-1, *([1] * self.plane_sums.dim()))
        self.sink(self.first_row, self.buffer[:, :count] / (weights * self.plane_sums))
        kept = self.buffer[:, count:].clone()
        self.buffer.zero_()
        self.buffer[:, : kept.shape[1]] = kept
        self.first_row = upto


class _BoxSink:
    """Hands `sink` the whole HR volume's slabs when only an LR box of it is predicted: the box's
    slabs padded in plane, and zero rows (probability 0) before, between and after them."""

    # Rows per slab handed on: a few full HR planes at a time (32 MiB for 1024^2 planes), so that padding
    # adds no window-deep copy of the volume's width to what the blender holds.
    ROWS = 8

    def __init__(self, support, scale, hr_shape, channels, sink):
        self.sink = sink
        self.offset = [s.start * scale for s in support]
        self.hr_shape = hr_shape
        self.channels = channels
        self.next_row = 0

    def __call__(self, first_row: int, block: torch.Tensor) -> None:
        self._zeros(self.offset[0] + first_row)
        region = tuple(slice(o, o + n) for o, n in zip(self.offset[1:], block.shape[2:]))
        for start in range(0, block.shape[1], self.ROWS):
            rows = block[:, start : start + self.ROWS]
            padded = torch.zeros((self.channels, rows.shape[1], *self.hr_shape[1:]))
            padded[(slice(None), slice(None), *region)] = rows
            self.sink(self.next_row, padded)
            self.next_row += rows.shape[1]

    def finish(self) -> None:
        self._zeros(self.hr_shape[0])

    def _zeros(self, upto: int) -> None:
        while self.next_row < upto:
            rows = min(self.ROWS, upto - self.next_row)
            self.sink(self.next_row, torch.zeros((self.channels, rows, *self.hr_shape[1:])))
            self.next_row += rows


def _window_batch(
    lr: torch.Tensor, starts: list, window: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    batch = torch.stack(
        [lr[(slice(None), *(slice(s, s + w) for s, w in zip(st, window)))] for st in starts]
    ).to(device)
    if batch.dim() == 5 and device.type == "cpu":
        # oneDNN's trilinear upsampling (the decoder's) runs 3x faster on channels-last tensors; a
        # network loaded for prediction has channels-last weights, so its convolutions keep the layout.
        batch = batch.contiguous(memory_format=torch.channels_last_3d)
    return batch


def _predictor(net: SASRNet, output: str, in_channels: int) -> tuple[int, Callable]:
    """(output channels, the function of a window batch) for `output`: "mask" or "image"."""
    if output == "mask":
        return 1, lambda x: torch.sigmoid(net(x).float())
    if output == "image":
        return in_channels, lambda x: net.super_resolve_image(x).float()
    raise ValueError(f"output must be 'mask' or 'image', got {output!r}")


def _flip_averaged(predict: Callable, batch: torch.Tensor, flips: list, device, amp: bool) -> torch.Tensor:
    """The prediction for `batch` averaged over `flips`, on the CPU."""
    pred = None
    for axes in flips:
        x = torch.flip(batch, axes) if axes else batch
        with autocast(device, amp):
            y = predict(x)
        y = torch.flip(y, axes) if axes else y
        pred = y if pred is None else pred + y
    pred = (pred / len(flips)).cpu()
    if not bool(torch.isfinite(pred).all()):
        # NaN probabilities threshold to an empty mask: "no lesion", said of broken weights.
        raise UserError(
            "the model's output is not a number: its weights are broken (from a training run that "
            "diverged?); use another model"
        )
    return pred


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
    sink: Callable[[int, torch.Tensor], None] | None = None,
    tta_axes: Sequence[int] | None = None,
    support: tuple[slice, ...] | None = None,
) -> torch.Tensor | None:
    """HR lesion probabilities (float32, CPU, shape spatial * scale) for one LR image (C, *spatial).

    With output="image", the image-SR decoder's HR image (C, *spatial * scale) instead: only then
    does that decoder run. Windows larger than the image shrink to it (the network pads internally).
    With `tta`, every combination of flips of `tta_axes` (spatial axes in tensor order; all by default)
    is averaged. `progress(fraction)` is called after each
    batch; a KeyboardInterrupt raised there (or anywhere) stops the work at once.

    With `sink`, nothing is returned: finished slabs of HR rows along the first spatial axis are passed
    to `sink(first_row, block)` in order (block: float32 (channels, rows, ...)), so memory holds one
    window's depth of HR values instead of the whole HR volume.

    With `support` (output="mask"; a slice of LR indices per axis), only that box of `lr` is predicted and
    the HR voxels outside it get probability 0 (`prepare_input`'s box of the tissue: no lesion outside).
    """
    channels, predict = _predictor(net, output, lr.shape[0])
    was_training = net.training
    net.eval()
    device = device or next(net.parameters()).device
    result = None
    if sink is None:
        result = torch.empty((channels, *(n * scale for n in lr.shape[1:])), dtype=torch.float32)

        def sink(first_row: int, block: torch.Tensor) -> None:
            result[:, first_row : first_row + block.shape[1]] = block

    box_sink = None
    if support is not None:
        if output != "mask":
            raise ValueError("support applies to lesion probabilities only")
        sink = box_sink = _BoxSink(support, scale, tuple(n * scale for n in lr.shape[1:]), channels, sink)
        lr = lr[(slice(None), *support)]
    spatial = tuple(lr.shape[1:])
    window = tuple(min(w, n) for w, n in zip(window_lr, spatial))
    hr_shape = tuple(n * scale for n in spatial)
    starts_per_axis = [window_starts(n, w, overlap) for n, w in zip(spatial, window)]
    starts = list(itertools.product(*starts_per_axis))

    blender = _SlabBlender(channels, hr_shape, tuple(w * scale for w in window), starts_per_axis, scale, sink)
    flips = _flips(len(spatial), tta, tta_axes)
    try:
        for b in range(0, len(starts), batch_size):
            chunk = starts[b : b + batch_size]
            pred = _flip_averaged(predict, _window_batch(lr, chunk, window, device), flips, device, amp)
            for st, p in zip(chunk, pred):
                blender.add(tuple(s * scale for s in st), p)
            if progress is not None:
                progress(min(1.0, (b + len(chunk)) / len(starts)))
        blender.finish()
        if box_sink is not None:
            box_sink.finish()
    finally:
        net.train(was_training)
    if result is None:
        return None
    return result[0] if output == "mask" else result
