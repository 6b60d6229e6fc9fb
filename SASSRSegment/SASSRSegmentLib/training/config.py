"""Training options: `TrainConfig` (every key of a config JSON, checked with the key's name in each message), the ablations, and loading a config file."""

from __future__ import annotations

import difflib
import json
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

from ..data.degrade import DEGRADATIONS, FIXED_INPUTS
from ..io.files import read_json
from ..model.losses import LossWeights
from ..model.network import HR_HEADS
from ..runtime.errors import UserError

ABLATIONS: dict[str, tuple[dict, dict]] = {
    # name: (SASRConfig switches, loss weights forced to 0)
    "full": ({}, {}),
    "no-image-sr": ({"image_sr": False}, {"rec": 0.0, "fa": 0.0, "sa": 0.0}),
    "no-sdc": ({"sdc": False}, {"sa": 0.0}),
    "no-fa": ({}, {"fa": 0.0}),
    "no-sa": ({}, {"sa": 0.0}),
    "no-learned-upsampling": ({"learned_upsampling": False}, {}),
    # A plain U-Net on the LR input whose LR logits are interpolated to HR.
    "baseline": (
        {"image_sr": False, "sdc": False, "learned_upsampling": False},
        {"rec": 0.0, "fa": 0.0, "sa": 0.0},
    ),
    # The cumulative ladder from the baseline to the full method, one module added per step:
    # baseline -> sr (image-SR branch) -> sr-fa (+FA) -> sr-fa-sdc (+SDC) -> no-learned-upsampling
    # (+SA) -> full (+learned HR upsampling of the mask).
    "sr": ({"sdc": False, "learned_upsampling": False}, {"fa": 0.0, "sa": 0.0}),
    "sr-fa": ({"sdc": False, "learned_upsampling": False}, {"sa": 0.0}),
    "sr-fa-sdc": ({"learned_upsampling": False}, {"sa": 0.0}),
}


CLI_OVERRIDES = ("max_steps", "max_minutes", "batch_size", "workers", "val_every", "seed")
# numpy's and torch's seeds are unsigned 32-bit integers.
MAX_SEED = 2**32 - 1


@dataclass
class TrainConfig:
    """Training hyper-parameters; a config JSON may override any field (unknown keys are an error)."""

    # model card
    name: str = "sassr-model"
    description: str = ""
    modality: str = ""
    task: str = "lesion segmentation"
    licence_note: str = ""
    threshold: float = 0.5
    # preprocessing (the card's "preprocessing")
    scale: int = 2
    lr_spacing: Optional[list[float]] = None  # 3D; None: scale x the data's median spacing
    lr_longer_side: Optional[int] = None  # 2D; None: 160
    normalization: Optional[dict] = None  # None: chosen from dataset.json channel names
    labels: Optional[list[Union[int, str]]] = None  # lesion label values or names; None: every label > 0
    patch_size_lr: Optional[list[int]] = None  # None: 48^3 (3D), lr_longer_side^2 (2D)
    crop_margin_lr: int = 8
    groups: list[list[str]] = field(default_factory=list)  # same-patient cases, kept on one side
    # network
    features: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    norm: str = "instance"
    dropout: float = 0.0
    dilations: list[int] = field(default_factory=lambda: [1, 2, 5])
    hr_head: str = "interpolate"  # or "subpixel" (network.py)
    hr_channels: int = 8  # HR features of a "subpixel" head
    reduce_before_upsampling: bool = False  # network.py: what a training step costs
    sdc_squeeze: bool = False
    sr_width: float = 1.0
    # loss weights (defaults: those of losses.LossWeights)
    loss_seg: float = LossWeights.seg
    loss_rec: float = LossWeights.rec
    loss_fa: float = LossWeights.fa
    loss_sa: float = LossWeights.sa
    rec_background_weight: float = LossWeights.background_weight
    # distillation (teachers.py): bundles (names or folders) whose mean probabilities are also learnt
    teachers: list[str] = field(default_factory=list)
    loss_kd: float = 1.0
    # optimisation
    max_steps: int = 10000
    max_minutes: Optional[float] = None
    batch_size: int = 2
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # or "poly"
    warmup_steps: int = 200
    min_lr_ratio: float = 0.01
    grad_clip: float = 12.0
    # validate and ship an exponential moving average of the weights (averaging.py); None: the last
    ema_decay: Optional[float] = None
    amp: str = "auto"  # auto | off | bf16 | fp16
    channels_last: str = "auto"  # auto | on | off
    seed: int = 0
    # sampling and augmentation
    workers: int = 2
    p_fg: float = 0.5
    # HR voxels; smaller label islands are never a lesion-centred patch's target (None: one LR voxel)
    min_lesion_voxels: Optional[int] = None
    flip_axes: Optional[list[int]] = None  # None: every axis
    rot90: bool = False
    p_intensity: float = 0.5
    intensity_scale: list[float] = field(default_factory=lambda: [0.75, 1.25])
    intensity_shift: float = 0.1
    p_gamma: float = 0.3
    gamma: list[float] = field(default_factory=lambda: [0.7, 1.5])
    p_affine: float = 0.0
    affine_degrees: float = 15.0
    affine_scale: list[float] = field(default_factory=lambda: [0.85, 1.15])
    p_lesion_fade: float = 0.0  # the share of patches whose lesion keeps only part of its contrast
    lesion_fade: list[float] = field(default_factory=lambda: [0.3, 1.0])
    # how the LR input is made of the HR patch: "block" (block average) or "random" (degrade.py)
    degradation: str = "block"
    p_thick_slices: float = 0.2  # 3D "random": the share of patches with thick slices along one axis
    # their spacing over their thickness, drawn uniformly: [1, 1] no gaps; [1, 1.4] a 2D FLAIR's
    thick_slice_gap: list[float] = field(default_factory=lambda: [1.0, 1.0])
    # validation
    val_fraction: float = 0.2
    split_seed: int = 0
    split_file: Optional[str] = None
    val_every: int = 500
    # LR inputs validation makes of each case (degrade.FIXED_INPUTS); the best mean over all is kept
    val_lr_inputs: list[str] = field(default_factory=lambda: ["block"])
    val_overlap: float = 0.5
    val_batch_size: int = 4
    log_every: int = 10
    # also write checkpoint_last.pt every this many minutes (None: only at validations and the end)
    checkpoint_minutes: Optional[float] = None

    def patch_size(self, spatial_dims: int, lr_longer_side: int | None = None) -> list[int]:
        if self.patch_size_lr:
            return [int(v) for v in self.patch_size_lr]
        return [48] * 3 if spatial_dims == 3 else [int(lr_longer_side or 160)] * 2

    def problems(self) -> list[str]:
        """Value checks beyond types (dimension-dependent ones happen once the data is known)."""
        p = [
            f"{f.name} must be finite, got {json.dumps(getattr(self, f.name))}"
            for f in fields(self)
            if not _finite(getattr(self, f.name))
        ]
        if p:
            return p  # NaN fails or passes the range checks by accident
        return self._range_problems() + self._choice_problems()

    def _range_problems(self) -> list[str]:
        p = []
        if self.scale not in (2, 4):
            p.append(f"scale must be 2 or 4, got {self.scale}")
        for key in ("max_steps", "batch_size", "val_every", "log_every", "val_batch_size"):
            if getattr(self, key) < 1:
                p.append(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in (
            "p_fg",
            "p_intensity",
            "p_gamma",
            "p_affine",
            "val_overlap",
            "min_lr_ratio",
            "p_thick_slices",
            "p_lesion_fade",
        ):
            if not 0.0 <= getattr(self, key) <= 1.0:
                p.append(f"{key} must be in [0, 1], got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:  # 1 would drop every feature
            p.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.dilations or min(self.dilations) < 1:
            p.append(f"dilations must be a list of positive integers, got {self.dilations}")
        for key in ("loss_seg", "loss_rec", "loss_fa", "loss_sa", "loss_kd", "crop_margin_lr"):
            if getattr(self, key) < 0:
                p.append(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.grad_clip <= 0:
            p.append(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.min_lesion_voxels is not None and self.min_lesion_voxels < 1:
            p.append(f"min_lesion_voxels must be >= 1 (or null: one LR voxel), got {self.min_lesion_voxels}")
        if self.lr_longer_side is not None and self.lr_longer_side < 8:  # 0 had read as the default, 160
            p.append(f"lr_longer_side must be at least 8 (or null: 160), got {self.lr_longer_side}")
        if not 0.0 < self.threshold < 1.0:
            p.append(f"threshold must lie strictly between 0 and 1, got {self.threshold}")
        for key in ("seed", "split_seed"):
            if not 0 <= getattr(self, key) <= MAX_SEED:
                p.append(f"{key} must be between 0 and {MAX_SEED}, got {getattr(self, key)}")
        if not 0.0 <= self.val_fraction < 1.0:
            p.append(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            p.append("learning_rate must be > 0, weight_decay and warmup_steps >= 0")
        if len(self.features) < 2 or min(self.features) < 1:
            p.append(f"features needs at least two positive widths, got {self.features}")
        if self.patch_size_lr and min(self.patch_size_lr) < 4:
            p.append(f"patch_size_lr must be at least 4 per axis, got {self.patch_size_lr}")
        # A lesion faded to no contrast at all would be a label on healthy-looking tissue.
        if len(self.lesion_fade) != 2 or not 0.0 < self.lesion_fade[0] <= self.lesion_fade[1] <= 1.0:
            p.append(f"lesion_fade must be [low, high] with 0 < low <= high <= 1, got {self.lesion_fade}")
        gap = self.thick_slice_gap
        if len(gap) != 2 or not 1.0 <= gap[0] <= gap[1] <= 2.0:
            p.append(f"thick_slice_gap must be [low, high] with 1 <= low <= high <= 2, got {gap}")
        for key in ("intensity_scale", "gamma", "affine_scale"):
            value = getattr(self, key)
            if len(value) != 2 or value[0] > value[1] or value[0] <= 0:
                p.append(f"{key} must be [low, high] with 0 < low <= high, got {value}")
        if self.workers < 0:
            p.append(f"workers must be >= 0, got {self.workers}")
        for key in ("max_minutes", "checkpoint_minutes"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                p.append(f"{key} must be > 0, got {getattr(self, key)}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            p.append(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.hr_channels < 1:
            p.append(f"hr_channels must be >= 1, got {self.hr_channels}")
        if not 0.0 < self.sr_width <= 1.0:
            p.append(f"sr_width must be in (0, 1], got {self.sr_width}")
        return p

    def _choice_problems(self) -> list[str]:
        p = []
        if self.norm not in ("instance", "batch"):
            p.append(f'norm must be "instance" or "batch", got {self.norm!r}')
        if self.schedule not in ("cosine", "poly"):
            p.append(f'schedule must be "cosine" or "poly", got {self.schedule!r}')
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            p.append(f'amp must be "auto", "off", "bf16" or "fp16", got {self.amp!r}')
        if self.channels_last not in ("auto", "on", "off"):
            p.append(f'channels_last must be "auto", "on" or "off", got {self.channels_last!r}')
        if self.normalization is not None and self.normalization.get("kind") not in ("mri", "ct", "uint8"):
            p.append(
                f'normalization kind must be "mri", "ct" or "uint8", got {self.normalization.get("kind")!r}'
            )
        if self.hr_head not in HR_HEADS:
            p.append(f"hr_head must be one of {', '.join(map(json.dumps, HR_HEADS))}, got {self.hr_head!r}")
        if self.degradation not in DEGRADATIONS:
            p.append(
                f"degradation must be one of {', '.join(map(json.dumps, DEGRADATIONS))}, got {self.degradation!r}"
            )
        unknown = [v for v in self.val_lr_inputs if v not in FIXED_INPUTS]
        if unknown or not self.val_lr_inputs:
            p.append(
                f"val_lr_inputs must be a non-empty list of {', '.join(map(json.dumps, FIXED_INPUTS))}, "
                f"got {self.val_lr_inputs}"
            )
        return p


def _finite(value) -> bool:
    """Whether every number in a config value (nested lists and dicts too) is finite: JSON readers
    accept NaN and Infinity."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(map(_finite, value))
    if isinstance(value, dict):
        return all(map(_finite, value.values()))
    return True


def _type_ok(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    """A hint as a user reads it: `list[float] | None`, whatever Python spells it."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union:
        return " | ".join(_type_name(a) for a in args)
    if hint is type(None):
        return "None"
    if args:
        return f"{typing.get_origin(hint).__name__}[{', '.join(_type_name(a) for a in args)}]"
    return hint.__name__


def config_from_dict(values: dict, where: str = "config") -> TrainConfig:
    hints = typing.get_type_hints(TrainConfig)
    names = [f.name for f in fields(TrainConfig)]
    problems = []
    for k in values:
        if k not in names:
            close = difflib.get_close_matches(k, names, 1)
            problems.append(
                f"unknown key {k!r}"
                + (f" (did you mean {close[0]!r}?)" if close else " (see docs/training.md)")
            )
    problems += [
        f"{k}: {json.dumps(v)} is not a valid {_type_name(hints[k])}"
        for k, v in values.items()
        if k in names and not _type_ok(v, hints[k])
    ]
    from ..data.datasets import fail

    fail(problems, where)
    cfg = TrainConfig(**values)
    fail(cfg.problems(), where)
    return cfg


def _teacher_path(teacher: str, folder: Path) -> str:
    from ..model.bundle import bundled_models

    if teacher in bundled_models() or Path(teacher).expanduser().is_absolute():
        return teacher
    return str((folder / teacher).resolve())


def load_config(path: str | Path | None = None, group_file: str | Path | None = None) -> TrainConfig:
    """Defaults, overridden by a JSON config file; `explicit` lists the keys the file set."""
    values: dict = {}
    if path:
        path = Path(path)
        values = read_json(
            path,
            lambda exc: f"config file {path} is not valid JSON ({exc})",
            missing=f"config file {path} does not exist",
        )
        if not isinstance(values, dict):
            raise UserError(f"config file {path} must hold a JSON object of hyper-parameters")
        values = {k: v for k, v in values.items() if not k.startswith("_")}  # "_comment" keys
    cfg = config_from_dict(values, f"config {path}" if path else "config")
    if cfg.groups:
        from ..data.datasets import check_groups

        check_groups(cfg.groups, f"config {path}: groups")
    if group_file:
        from ..data.datasets import read_groups

        cfg.groups = cfg.groups + read_groups(group_file)
    if path and cfg.split_file and not Path(cfg.split_file).is_absolute():
        cfg.split_file = str(Path(path).parent / cfg.split_file)  # relative to the config file
    if path:
        # A teacher folder is relative to the config file too, and kept absolute, so that a resumed
        # run finds it from anywhere; a bundled model's name stays a name.
        cfg.teachers = [_teacher_path(t, Path(path).parent) for t in cfg.teachers]
    cfg.explicit = set(values)  # type: ignore[attr-defined]
    return cfg
