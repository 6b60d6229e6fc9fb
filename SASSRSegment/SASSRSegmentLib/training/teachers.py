"""Distillation: trained networks (`teachers` in a config) whose averaged lesion probabilities the
network also learns, beside the expert's mask.

Why: the shipped brain model and the one it replaced, averaged, score 0.008-0.011 higher than the
shipped one alone on every LR input of the validation table, but running both would double the cost of
`segment`; a network taught by their average costs what one does (docs/training.md, "Distillation")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.bundle import load_bundle
from ..runtime.devices import autocast
from ..runtime.errors import UserError

# What a teacher must share with the trained network for its predictions on the same LR patch to mean
# the same HR voxels and the same intensities.
SHARED_PREPROCESSING = ("spatial_dims", "scale", "normalization")


class Teachers:
    """The teacher networks, on `device`, in inference form; called on an LR batch, their mean HR lesion
    probability (float32, the HR batch's shape)."""

    def __init__(self, models: list[str], prep: dict, device: torch.device):
        self.device = device
        self.nets, self.sources = [], []
        for model in models:
            card, net = load_bundle(model, device, for_prediction=True)
            theirs = card["preprocessing"]
            differ = [k for k in SHARED_PREPROCESSING if theirs.get(k) != prep.get(k)]
            if len(theirs.get("channels", [])) != len(prep.get("channels", [])):
                differ.append("channels")
            if differ:
                raise UserError(
                    f"teacher {model}: its {', '.join(differ)} differ from the training data's; a teacher "
                    "must see the same inputs as the network it teaches"
                )
            self.nets.append(net)
            self.sources.append(
                {"model": str(model), "name": card.get("name"), "weights_sha256": card.get("weights_sha256")}
            )

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        with autocast(self.device):
            total = sum(torch.sigmoid(net(lr).float()) for net in self.nets)
        return total / len(self.nets)


def distillation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the network's HR logits against the teachers' probabilities."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())
