"""Validation during training: HR Dice of whole validation cases."""

from __future__ import annotations

import numpy as np
import torch

from ..runtime.progress import Progress
from .config import TrainConfig


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1 when both are empty."""
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, truth).sum()) / total


def validate(net, cache, names, prep, cfg: TrainConfig, device, amp: bool, progress: Progress) -> dict:
    """HR Dice of whole validation cases, predicted from their block-averaged LR images."""
    from ..data.sampling import lr_from_hr
    from ..inference.windows import sliding_window_predict

    per_case = {}
    for k, name in enumerate(names):
        hr = torch.from_numpy(cache.normalized(np.asarray(cache.image(name))))
        lr = lr_from_hr(hr[None], prep["scale"])[0]
        prob = sliding_window_predict(
            net,
            lr,
            tuple(prep["patch_size_lr"]),
            prep["scale"],
            overlap=cfg.val_overlap,
            batch_size=cfg.val_batch_size,
            device=device,
            amp=amp,
        )
        per_case[name] = round(dice(prob.numpy() >= cfg.threshold, np.asarray(cache.seg(name)) > 0), 5)
        progress.update("validate", (k + 1) / len(names), f"{name}: Dice {per_case[name]:.3f}")
    mean = float(np.mean(list(per_case.values()))) if per_case else float("nan")
    return {"dice_mean": round(mean, 5), "per_case": per_case}
