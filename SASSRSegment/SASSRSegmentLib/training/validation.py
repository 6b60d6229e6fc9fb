"""Validation during training: HR Dice of whole validation cases, from each LR input the config names."""

from __future__ import annotations

import numpy as np
import torch

from ..runtime.progress import Progress
from .config import TrainConfig


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1 when both are empty."""
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, truth).sum()) / total


def lr_input(hr: torch.Tensor, name: str, prep: dict) -> torch.Tensor:
    """The LR input `name` (degrade.FIXED_INPUTS) of a normalised HR case (C, *spatial). For MRI, the
    background is 0 and the tissue re-standardised as the normaliser does to an LR scan and as training
    does to its patches (degrade.restandardise)."""
    from ..data.degrade import fixed_matrices, through_operators
    from ..data.sampling import lr_from_hr
    from .build import hr_spacing

    if name == "block" and prep["normalization"]["kind"] != "mri":
        return lr_from_hr(hr[None], prep["scale"])[0]
    image = hr.numpy()
    matrices = fixed_matrices(name, image.shape[1:], prep["scale"], hr_spacing(prep))
    tissue = np.any(image != 0, axis=0) if prep["normalization"]["kind"] == "mri" else None
    return torch.from_numpy(through_operators(image, matrices, tissue))


def validate(net, cache, names, prep, cfg: TrainConfig, device, amp: bool, progress: Progress) -> dict:
    """Per case the mean HR Dice over the config's LR inputs; with more than one input, each input's
    Dice per case as well. The mean over cases is what `train` keeps the best of."""
    from ..inference.windows import sliding_window_predict

    inputs = list(cfg.val_lr_inputs)
    per_input: dict[str, dict[str, float]] = {name: {} for name in inputs}
    done, total = 0, len(names) * len(inputs)
    for case in names:
        hr = torch.from_numpy(cache.normalized(np.asarray(cache.image(case))))
        truth = np.asarray(cache.seg(case)) > 0
        for name in inputs:
            prob = sliding_window_predict(
                net,
                lr_input(hr, name, prep),
                tuple(prep["patch_size_lr"]),
                prep["scale"],
                overlap=cfg.val_overlap,
                batch_size=cfg.val_batch_size,
                device=device,
                amp=amp,
            )
            per_input[name][case] = round(dice(prob.numpy() >= cfg.threshold, truth), 5)
            done += 1
            progress.update("validate", done / total, f"{case} ({name}): Dice {per_input[name][case]:.3f}")
    per_case = {case: round(float(np.mean([per_input[n][case] for n in inputs])), 5) for case in names}
    mean = float(np.mean(list(per_case.values()))) if per_case else float("nan")
    result = {"dice_mean": round(mean, 5), "per_case": per_case}
    if len(inputs) > 1:
        result["per_input"] = {
            name: {"dice_mean": round(float(np.mean(list(d.values()))), 5), "per_case": d}
            for name, d in per_input.items()
        }
    return result
