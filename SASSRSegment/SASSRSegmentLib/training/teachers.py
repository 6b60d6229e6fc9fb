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
# the same HR voxels, of the same size, and the same intensities of the same channels.
SHARED_PREPROCESSING = ("spatial_dims", "scale", "normalization", "lr_spacing", "lr_longer_side", "channels")


class Teachers:
    """The teacher networks, on `device`, in inference form; called on an LR batch, their mean HR lesion
    probability (float32, the HR batch's shape)."""

    def __init__(self, models: list[str], prep: dict, device: torch.device):
        self.device = device
        self.nets, self.sources = [], []
        for model in models:
            try:
                card, net = load_bundle(model, device, for_prediction=True)
            except UserError as exc:
                raise UserError(f"teacher {model}: {exc}") from None
            theirs = card["preprocessing"]
            differ = [k for k in SHARED_PREPROCESSING if theirs.get(k) != prep.get(k)]
            # A card from before the key saw its cases as stored: nothing to compare.
            if theirs.get("orientation") not in (None, prep.get("orientation")):
                differ.append("orientation")
            if differ:
                raise UserError(
                    f"teacher {model}: its {', '.join(differ)} differ from the training data's; a teacher "
                    "must see the same inputs as the network it teaches"
                )
            self._check_runs(model, net, prep)
            self.nets.append(net)
            self.sources.append(
                {"model": str(model), "name": card.get("name"), "weights_sha256": card.get("weights_sha256")}
            )

    def _check_runs(self, model: str, net, prep: dict) -> None:
        """A teacher deeper than the training patch allows fails in its first step, with a traceback."""
        patch = [int(n) for n in prep["patch_size_lr"]]
        try:
            with torch.no_grad(), autocast(self.device):
                net(torch.zeros(1, len(prep["channels"]), *patch, device=self.device))
        except (RuntimeError, ValueError) as exc:
            raise UserError(
                f"teacher {model} cannot run on the training patches ({' x '.join(map(str, patch))} LR voxels): "
                f"{str(exc).splitlines()[0]}"
            ) from None

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        with autocast(self.device):
            total = sum(torch.sigmoid(net(lr).float()) for net in self.nets)
        return total / len(self.nets)


def distillation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the network's HR logits against the teachers' probabilities."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())
