"""What a run trains: the network and loss of an ablation, the random LR synthesis, the learning-rate schedule, and initial weights from a bundle."""

from __future__ import annotations

import math
from collections.abc import Callable

from ..model.bundle import load_bundle
from ..model.losses import LossWeights, SASRLoss
from ..runtime.errors import UserError
from .config import ABLATIONS, TrainConfig


def build_network(cfg: TrainConfig, prep: dict, ablation: str):
    from ..model.network import SASRConfig, SASRNet

    switches, _ = ABLATIONS[ablation]
    net_cfg = SASRConfig(
        spatial_dims=prep["spatial_dims"],
        in_channels=len(prep["channels"]),
        scale=prep["scale"],
        features=tuple(cfg.features),
        norm=cfg.norm,
        dropout=cfg.dropout,
        dilations=tuple(cfg.dilations),
        hr_head=cfg.hr_head,
        hr_channels=cfg.hr_channels,
        reduce_before_upsampling=cfg.reduce_before_upsampling,
        sdc_squeeze=cfg.sdc_squeeze,
        sr_width=cfg.sr_width,
        **switches,
    )
    return SASRNet(net_cfg)


def hr_spacing(prep: dict) -> list[float]:
    """HR voxel size in mm, numpy axis order (1 mm where the data sets none: 2D)."""
    return [s / prep["scale"] for s in prep["lr_spacing"][::-1]] if prep.get("lr_spacing") else [1.0] * 2


def degradation_for(prep: dict, cfg: TrainConfig):
    """The random LR synthesis (degrade.py) for this preprocessing's modality and HR voxel size, with the
    configuration's thick slices; None where the configuration makes LR by block averages."""
    from ..data.degrade import Degradation

    if cfg.degradation != "random":
        return None

    norm = prep["normalization"]
    window = norm.get("window", (-1000.0, 400.0))
    return Degradation(
        kind=norm["kind"],
        hr_spacing=hr_spacing(prep),
        p_thick=cfg.p_thick_slices,
        slice_gap=tuple(cfg.thick_slice_gap),
        ct_window=float(window[1] - window[0]),
    )


def build_loss(cfg: TrainConfig, ablation: str) -> SASRLoss:
    _, zeroed = ABLATIONS[ablation]
    weights = {"seg": cfg.loss_seg, "rec": cfg.loss_rec, "fa": cfg.loss_fa, "sa": cfg.loss_sa, **zeroed}
    return SASRLoss(LossWeights(**weights, background_weight=cfg.rec_background_weight))


def lr_lambda(cfg: TrainConfig, total: int, time_fraction: Callable[[], float] | None = None):
    """Warm-up, then decay over whichever budget runs out first: steps, or `time_fraction()` of
    --max-minutes, so a time-limited run still ends at a low learning rate."""
    warmup = min(cfg.warmup_steps, max(0, total // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        if time_fraction is not None:
            t = max(t, min(1.0, time_fraction()))
        if cfg.schedule == "poly":
            decay = (1 - t) ** 0.9
        else:
            decay = 0.5 * (1 + math.cos(math.pi * t))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return factor


def initialise_from(net, bundle: str, *, shared_only: bool = False) -> dict:
    """Start from a bundle's weights; returns its provenance for the new card.

    Fine-tuning (the default) needs the same network. ``shared_only`` is a warm start of a different
    network: every tensor with the same name and shape is copied (the shared encoder of a baseline
    bundle into the full network) and the rest keeps its fresh initialisation.
    """
    card, source = load_bundle(bundle)
    keep = ("command", "dataset", "steps", "steps_total", "wall_time_s", "hardware", "precision", "torch")
    provenance = {
        "bundle": str(bundle),
        "training": {k: card.get("training", {}).get(k) for k in keep},
        "validation_dice": card.get("validation", {}).get("dice_mean"),
        "initialised_from": card.get("training", {}).get("initialised_from"),
    }
    if shared_only:
        provenance["warm_start"] = _copy_shared_layers(net, source, bundle)
        return provenance
    # Compared as configs: a card written before a network option existed holds no key for it.
    if source.config != net.config:
        raise UserError(
            f"--init {bundle}: its network differs from this run's (config or --ablation); "
            "use a bundle trained with the same network settings, or --warm-start"
        )
    net.load_state_dict(source.state_dict())
    return provenance


def _copy_shared_layers(net, source, bundle: str) -> dict:
    """Copy `source`'s tensors whose name and shape `net` has too; returns how many of `net`'s."""
    if (source.config.spatial_dims, source.config.in_channels) != (
        net.config.spatial_dims,
        net.config.in_channels,
    ):
        raise UserError(f"--warm-start {bundle}: its input (dimensions, channels) differs from this run's")
    own = net.state_dict()
    copied = {k: v for k, v in source.state_dict().items() if k in own and own[k].shape == v.shape}
    # A bias or a norm scale alone (the LR head's single bias) is no warm start.
    if not any(v.dim() > 1 for v in copied.values()):
        raise UserError(f"--warm-start {bundle}: it shares no layer with this run's network")
    net.load_state_dict(copied, strict=False)
    return {"tensors_copied": len(copied), "tensors_total": len(own)}
