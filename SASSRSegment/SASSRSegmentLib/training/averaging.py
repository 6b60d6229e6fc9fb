"""An exponential moving average of the network's weights (`"ema_decay"` in the config): validated,
kept as the best and shipped instead of the weights of the last step.

Why: the batch-normalised brain fine-tune scored 0.666, 0.840, 0.683, 0.733 and 0.740 at validations
200 steps apart, so which weights shipped was decided by where a validation happened to fall. An
average over the last 1 / (1 - decay) steps moves with the trend and not with the last few batches.
Batch-norm running statistics are averaged with the weights; integer buffers are copied.
"""

from __future__ import annotations

import copy

import torch


class WeightAverage:
    def __init__(self, net: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.net = copy.deepcopy(net)
        for p in self.net.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        # Early on a fixed decay would average mostly the starting weights (a fresh network's noise):
        # the decay ramps up to the configured one, as in timm's and TensorFlow's averages.
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> None:
        decay = self.current_decay()
        self.updates += 1
        for average, current in zip(self.net.state_dict().values(), net.state_dict().values()):
            if average.is_floating_point():
                average.lerp_(current, 1 - decay)
            else:
                average.copy_(current)

    def state_dict(self) -> dict:
        return {"weights": self.net.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
