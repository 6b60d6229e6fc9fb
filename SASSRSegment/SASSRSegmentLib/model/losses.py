"""Losses of the SASR network: Dice + BCE on the HR mask, lesion-weighted reconstruction of the HR image,
feature affinity (FA) and scale affinity (SA)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .network import ChildFeatures, SASROutput


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Soft Dice (over the whole batch, so lesion-free patches do not produce 0/0) plus BCE."""
    logits = logits.float()
    target = target.float()
    prob = torch.sigmoid(logits)
    intersection = (prob * target).sum()
    dice = (2 * intersection + smooth) / (prob.sum() + target.sum() + smooth)
    return (1 - dice) + F.binary_cross_entropy_with_logits(logits, target)


def weighted_reconstruction_loss(
    image: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, background_weight: float = 0.2
) -> torch.Tensor:
    """L1 between reconstructed and true HR image, weighted 1 inside lesions and less outside.

    L1 rather than the released code's MSE: it keeps edges sharper in SR (EDSR) and does not let a few
    bright outliers dominate. The weighting spends the branch's capacity where segmentation needs detail.
    """
    weight = background_weight + (1 - background_weight) * mask.float()
    diff = (image.float() - target.float()).abs() * weight
    return diff.sum() / (weight.sum() * image.shape[1])


def affinity_matrix(features: torch.Tensor | ChildFeatures, grid: int) -> torch.Tensor:
    """Pairwise cosine affinity (B, N, N) of feature vectors on a pooled grid of at most `grid` per axis.

    Adaptive average pooling bounds N (grid**dims positions) whatever the patch size, so memory stays
    small for large HR patches; L2 normalisation per position makes the affinity independent of feature
    magnitude, which differs between the two branches.
    """
    if isinstance(features, ChildFeatures):
        pooled = features.pooled(grid)
    else:
        pool = F.adaptive_avg_pool3d if features.dim() == 5 else F.adaptive_avg_pool2d
        pooled = pool(features.float(), tuple(min(grid, s) for s in features.shape[2:]))
    flat = F.normalize(pooled.flatten(2), dim=1, eps=1e-6)  # (B, C, N)
    return flat.transpose(1, 2) @ flat


def affinity_loss(
    student: torch.Tensor | ChildFeatures, teacher: torch.Tensor | ChildFeatures, grid: int
) -> torch.Tensor:
    """Mean absolute difference between the two affinity matrices, averaged over the batch.

    The teacher (the image-SR branch) is detached: the affinity terms pull the segmentation branch
    toward the structure the SR branch found, not the other way around.
    """
    with torch.no_grad():
        target = affinity_matrix(teacher, grid)
    return (affinity_matrix(student, grid) - target).abs().mean()


@dataclass
class LossWeights:
    """Default weights: the segmentation term dominates; FA and SA are regularisers of similar size."""

    seg: float = 1.0
    rec: float = 1.0
    fa: float = 1.0
    sa: float = 0.5
    background_weight: float = 0.2
    affinity_grid_2d: int = 32
    affinity_grid_3d: int = 6

    def to_dict(self) -> dict:
        return asdict(self)


class SASRLoss(nn.Module):
    """Combined loss. Terms whose weight is 0, or whose inputs the network does not produce, are skipped.

    `forward(output, hr_mask, hr_image)` returns (total, {"seg", "rec", "fa", "sa"} as floats) so every
    term can be logged separately.
    """

    def __init__(self, weights: LossWeights | None = None, **kwargs):
        super().__init__()
        self.weights = weights if weights is not None else LossWeights(**kwargs)

    def forward(
        self, output: SASROutput, hr_mask: torch.Tensor, hr_image: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        w = self.weights
        grid = w.affinity_grid_3d if output.mask.dim() == 5 else w.affinity_grid_2d
        terms: dict[str, torch.Tensor] = {"seg": dice_bce_loss(output.mask, hr_mask)}
        total = w.seg * terms["seg"]
        if output.image is not None and w.rec > 0:
            terms["rec"] = weighted_reconstruction_loss(output.image, hr_image, hr_mask, w.background_weight)
            total = total + w.rec * terms["rec"]
        if output.sr_features is not None and w.fa > 0:
            terms["fa"] = affinity_loss(output.seg_features, output.sr_features, grid)
            total = total + w.fa * terms["fa"]
        if output.seg_scales is not None and output.sr_scales is not None and w.sa > 0:
            terms["sa"] = affinity_loss(output.seg_scales, output.sr_scales, grid)
            total = total + w.sa * terms["sa"]
        return total, {k: float(v.detach()) for k, v in terms.items()}
