"""Losses: Dice+BCE, weighted reconstruction, FA and SA behaviour."""

import resource

import pytest
import torch

from SASSRSegmentLib.model.losses import (
    LossWeights,
    SASRLoss,
    affinity_loss,
    dice_bce_loss,
    weighted_reconstruction_loss,
)
from SASSRSegmentLib.model.network import SASROutput


def test_dice_bce_is_small_for_confident_correct_logits_and_large_otherwise():
    target = torch.zeros(1, 1, 16, 16)
    target[..., 4:10, 4:10] = 1
    good = (target * 2 - 1) * 20
    assert dice_bce_loss(good, target) < 1e-3
    assert dice_bce_loss(-good, target) > 1.5


def test_reconstruction_weights_lesion_errors_more():
    target = torch.zeros(1, 1, 8, 8)
    mask = torch.zeros_like(target)
    mask[..., :4, :] = 1
    err_in, err_out = target.clone(), target.clone()
    err_in[..., 0, 0] = 1  # an error inside the lesion
    err_out[..., 7, 7] = 1  # the same error outside
    assert weighted_reconstruction_loss(err_in, target, mask) > weighted_reconstruction_loss(
        err_out, target, mask
    )
    assert weighted_reconstruction_loss(target, target, mask) == 0


@pytest.mark.parametrize("shape", [(2, 5, 20, 24), (2, 5, 10, 12, 14)])
def test_affinity_loss_zero_for_identical_positive_otherwise(shape):
    torch.manual_seed(0)
    a, b = torch.randn(shape), torch.randn(shape)
    assert affinity_loss(a, a.clone(), grid=8) < 1e-6
    assert affinity_loss(a, b, grid=8) > 0.05
    # Scaling a branch's features does not change its affinity (L2 normalisation per position).
    assert affinity_loss(a, 7 * a, grid=8) < 1e-5


def test_affinity_loss_is_a_batch_mean_not_a_sum():
    torch.manual_seed(1)
    a, b = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    single = affinity_loss(a, b, grid=8)
    doubled = affinity_loss(torch.cat([a, a]), torch.cat([b, b]), grid=8)
    assert torch.allclose(single, doubled, atol=1e-6)


def test_affinity_loss_teacher_gets_no_gradient():
    a = torch.randn(1, 3, 8, 8, requires_grad=True)
    b = torch.randn(1, 3, 8, 8, requires_grad=True)
    affinity_loss(a, b, grid=4).backward()
    assert a.grad is not None and b.grad is None


def test_affinity_memory_is_bounded_for_a_96_cubed_hr_patch():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    a = torch.randn(1, 16, 96, 96, 96, requires_grad=True)
    b = torch.randn(1, 16, 96, 96, 96)
    loss = affinity_loss(a, b, grid=LossWeights().affinity_grid_3d)
    loss.backward()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    # Inputs and their gradient are ~170 MiB; a full 96^3 x 96^3 affinity would need ~3 TB.
    assert grown_mib < 600
    assert torch.isfinite(loss)


def test_combined_loss_skips_disabled_and_missing_terms():
    mask = torch.zeros(1, 1, 8, 8)
    out = SASROutput(mask=torch.zeros(1, 1, 8, 8), seg_features=torch.randn(1, 4, 8, 8))
    total, terms = SASRLoss()(out, mask, torch.zeros(1, 1, 8, 8))
    assert set(terms) == {"seg"}
    full = SASROutput(
        mask=torch.zeros(1, 1, 8, 8),
        image=torch.zeros(1, 1, 8, 8),
        seg_features=torch.randn(1, 4, 8, 8),
        sr_features=torch.randn(1, 4, 8, 8),
        seg_scales=torch.rand(1, 4, 4, 4),
        sr_scales=torch.rand(1, 4, 4, 4),
    )
    _, terms = SASRLoss()(full, mask, torch.zeros(1, 1, 8, 8))
    assert set(terms) == {"seg", "rec", "fa", "sa"}
    _, terms = SASRLoss(fa=0.0, sa=0.0)(full, mask, torch.zeros(1, 1, 8, 8))
    assert set(terms) == {"seg", "rec"}
