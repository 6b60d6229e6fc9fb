"""Convolutions that train faster on a CPU than PyTorch's own and predict with the native kernels: the
same weights and the same numbers either way (`network.py` builds its dilated and 1x1 output
convolutions from these)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def atrous_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int
) -> torch.Tensor:
    """A 'same'-padded dilated convolution computed as a plain one on the `dilation`^d interleaved
    sub-grids of `x` (space-to-batch): the same numbers, but oneDNN's backward of a dilated 3D
    convolution is 4-8x slower on CPU than that of an undilated one on the same voxels, which made
    the SDC branches the most expensive part of a training step."""
    b, c, *size = x.shape
    d, nd = dilation, len(size)
    pads = []
    for n in reversed(size):
        pads += [0, (-n) % d]
    if any(pads):
        x = F.pad(x, pads)  # zeros, as the convolution's own padding
    padded = x.shape[2:]
    m = [n // d for n in padded]
    # (B, C, m_1, d, ..., m_n, d) -> (B, d, ..., d, C, m_1, ..., m_n): one batch entry per sub-grid.
    x = x.reshape(b, c, *[v for n in m for v in (n, d)])
    x = x.permute(0, *[3 + 2 * i for i in range(nd)], 1, *[2 + 2 * i for i in range(nd)])
    conv = F.conv3d if nd == 3 else F.conv2d
    y = conv(x.reshape(b * d**nd, c, *m), weight, bias, padding=weight.shape[-1] // 2)
    out = y.shape[1]
    y = y.reshape(b, *([d] * nd), out, *m)
    y = y.permute(0, nd + 1, *[a for i in range(nd) for a in (nd + 2 + i, 1 + i)])
    return y.reshape(b, out, *padded)[(..., *(slice(0, n) for n in size))]


class _Atrous:
    """A dilated convolution that trains through `atrous_conv` (same weights, same outputs); in eval()
    it runs the native kernel, whose forward is the faster one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.dilation[0] > 1:
            return atrous_conv(x, self.weight, self.bias, self.dilation[0])
        return super().forward(x)


class _Pointwise:
    """A 1x1 convolution to one or a few channels that trains as a weighted channel sum: the same
    numbers, but oneDNN's version cost 3x as much (forward and backward) at HR on CPU. In eval() it
    runs the native kernel, which needs no temporary the size of its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        shape = (1, *self.weight.shape[:2], *[1] * (x.dim() - 2))
        return (x.unsqueeze(1) * self.weight.view(shape)).sum(2) + self.bias.view(shape[:2] + shape[3:])


class PointwiseConv2d(_Pointwise, nn.Conv2d):
    pass


class PointwiseConv3d(_Pointwise, nn.Conv3d):
    pass


class AtrousConv2d(_Atrous, nn.Conv2d):
    pass


class AtrousConv3d(_Atrous, nn.Conv3d):
    pass
