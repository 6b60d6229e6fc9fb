"""Batch norm folded into the convolution before it, for prediction only.

In eval mode a batch norm is a fixed per-channel affine map, so it can live in the preceding
convolution's weights and bias instead of being a pass of its own over every voxel: on the brain
model at the sample's size the norms were about 7 % of the forward pass on CPU. Instance norm
depends on the image and cannot be folded; those layers are left as they are.

A folded network has no norm layers left to train or save: only the commands that predict fold.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .network import ConvNormAct, SASRNet, SubpixelHead


def _fold_subpixel(head: SubpixelHead) -> None:
    # The head's norm acts per HR channel on the conv's output, in which HR channel c is conv
    # channels c * children ... (c + 1) * children - 1: the norm's parameters repeat to match.
    children = head.conv.out_channels // head.out_channels
    norm = head.norm

    def repeat(t):
        return None if t is None else t.repeat_interleave(children)

    weight, bias = fuse_conv_bn_weights(
        head.conv.weight,
        head.conv.bias,
        repeat(norm.running_mean),
        repeat(norm.running_var),
        norm.eps,
        repeat(norm.weight),
        repeat(norm.bias),
    )
    head.conv.weight, head.conv.bias = weight, bias
    head.norm = nn.Identity()


def fold_batch_norm(net: SASRNet) -> SASRNet:
    """Fold every batch norm of `net` (in eval mode) into its convolution, in place; returns `net`."""
    if net.training:
        raise ValueError("batch norm folds only in eval mode (its running statistics)")
    for module in net.modules():
        if isinstance(module, ConvNormAct) and isinstance(module[1], _BatchNorm):
            # In place: fuse_conv_bn_eval deep-copies each convolution (10 ms of a run's start-up).
            conv, norm = module[0], module[1]
            conv.weight, conv.bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
            )
            module[1] = nn.Identity()
        elif isinstance(module, SubpixelHead) and isinstance(module.norm, _BatchNorm):
            _fold_subpixel(module)
    return net
