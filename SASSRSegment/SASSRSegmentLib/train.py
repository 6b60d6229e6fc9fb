"""The `train` command: SASR training from an nnU-Net raw dataset or a preprocessed cache, to a model bundle.

Every hyper-parameter has its default in `TrainConfig`; a JSON config overrides any of them. Runs under
`torchrun --nproc_per_node N` with DistributedDataParallel (gloo on CPU, nccl on CUDA): every rank draws
its own patches, rank 0 logs, validates and writes. Training from a cache folder never imports
SimpleITK, so a cache made on one machine trains on another that has only torch and numpy.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import io
import json
import math
import os
import platform
import random
import shlex
import signal
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from .bundle import atomic_write_bytes, load_bundle, read_json, save_bundle
from .degrade import DEGRADATIONS
from .errors import UserError
from .losses import LossWeights, SASRLoss
from .network import HR_HEADS
from .progress import Progress

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
CSV_COLUMNS = ["step", "time_s", "lr", "loss", "seg", "rec", "fa", "sa", "steps_per_s", "val_dice"]


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
    # loss weights (defaults: those of losses.LossWeights)
    loss_seg: float = LossWeights.seg
    loss_rec: float = LossWeights.rec
    loss_fa: float = LossWeights.fa
    loss_sa: float = LossWeights.sa
    rec_background_weight: float = LossWeights.background_weight
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
    # how the LR input is made of the HR patch: "block" (block average) or "random" (degrade.py)
    degradation: str = "block"
    # validation
    val_fraction: float = 0.2
    split_seed: int = 0
    split_file: Optional[str] = None
    val_every: int = 500
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
        p = []
        if self.scale not in (2, 4):
            p.append(f"scale must be 2 or 4, got {self.scale}")
        for key in ("max_steps", "batch_size", "val_every", "log_every", "val_batch_size"):
            if getattr(self, key) < 1:
                p.append(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("p_fg", "p_intensity", "p_gamma", "p_affine", "val_overlap", "dropout"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                p.append(f"{key} must be in [0, 1], got {getattr(self, key)}")
        if not 0.0 <= self.val_fraction < 1.0:
            p.append(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.schedule not in ("cosine", "poly"):
            p.append(f'schedule must be "cosine" or "poly", got {self.schedule!r}')
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            p.append(f'amp must be "auto", "off", "bf16" or "fp16", got {self.amp!r}')
        if self.channels_last not in ("auto", "on", "off"):
            p.append(f'channels_last must be "auto", "on" or "off", got {self.channels_last!r}')
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            p.append("learning_rate must be > 0, weight_decay and warmup_steps >= 0")
        if len(self.features) < 2 or min(self.features) < 1:
            p.append(f"features needs at least two positive widths, got {self.features}")
        if self.patch_size_lr and min(self.patch_size_lr) < 4:
            p.append(f"patch_size_lr must be at least 4 per axis, got {self.patch_size_lr}")
        for key in ("intensity_scale", "gamma", "affine_scale"):
            value = getattr(self, key)
            if len(value) != 2 or value[0] > value[1] or value[0] <= 0:
                p.append(f"{key} must be [low, high] with 0 < low <= high, got {value}")
        if self.normalization is not None and self.normalization.get("kind") not in ("mri", "ct", "uint8"):
            p.append(
                f'normalization kind must be "mri", "ct" or "uint8", got {self.normalization.get("kind")!r}'
            )
        if self.workers < 0:
            p.append(f"workers must be >= 0, got {self.workers}")
        if self.checkpoint_minutes is not None and self.checkpoint_minutes <= 0:
            p.append(f"checkpoint_minutes must be > 0, got {self.checkpoint_minutes}")
        if self.hr_head not in HR_HEADS:
            p.append(f"hr_head must be one of {', '.join(map(json.dumps, HR_HEADS))}, got {self.hr_head!r}")
        if self.hr_channels < 1:
            p.append(f"hr_channels must be >= 1, got {self.hr_channels}")
        if self.degradation not in DEGRADATIONS:
            p.append(
                f"degradation must be one of {', '.join(map(json.dumps, DEGRADATIONS))}, got {self.degradation!r}"
            )
        return p


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
    from .data import fail

    fail(problems, where)
    cfg = TrainConfig(**values)
    fail(cfg.problems(), where)
    return cfg


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
        from .data import check_groups

        check_groups(cfg.groups, f"config {path}: groups")
    if group_file:
        from .data import read_groups

        cfg.groups = cfg.groups + read_groups(group_file)
    if path and cfg.split_file and not Path(cfg.split_file).is_absolute():
        cfg.split_file = str(Path(path).parent / cfg.split_file)  # relative to the config file
    cfg.explicit = set(values)  # type: ignore[attr-defined]
    return cfg


# ----------------------------------------------------------------------------------------------- setup


@dataclass
class Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(device_name: str) -> Runtime:
    from .devices import select_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Runtime(0, 1, 0, select_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Rank 0 may preprocess the dataset while the others wait: allow for it.
    dist.init_process_group(backend, timeout=timedelta(hours=3))
    return Runtime(rank, world, local_rank, device)


def amp_settings(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed)."""
    mode = cfg.amp
    if mode == "auto":
        if device.type == "cuda":
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            # CPUs with bf16 instructions ran the default configs 1.5-1.6x faster in bf16
            # (benchmarks/training.py); elsewhere bf16 is emulated and slower.
            from .devices import cpu_has_native_bf16

            mode = "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "off"
    if mode == "off":
        return None, False
    if mode == "fp16":
        if device.type != "cuda":
            raise UserError('amp "fp16" needs a CUDA GPU; use "bf16" or "off" on this device')
        return torch.float16, True
    return torch.bfloat16, False


def use_channels_last(cfg: TrainConfig, device: torch.device, spatial_dims: int) -> bool:
    if cfg.channels_last == "auto":
        # Measured (benchmarks/training.py): +10% for 3D on CPU; no gain in 2D nor on the GPU,
        # where these networks are bound by kernel launches rather than memory layout.
        return device.type == "cpu" and spatial_dims == 3
    return cfg.channels_last == "on"


def memory_format(spatial_dims: int, channels_last: bool):
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def build_network(cfg: TrainConfig, prep: dict, ablation: str):
    from .network import SASRConfig, SASRNet

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
        **switches,
    )
    return SASRNet(net_cfg)


def degradation_for(prep: dict):
    """The random LR synthesis (degrade.py) for this preprocessing's modality and HR voxel size."""
    from .degrade import Degradation

    norm = prep["normalization"]
    spacing = [s / prep["scale"] for s in prep["lr_spacing"][::-1]] if prep.get("lr_spacing") else [1.0] * 2
    window = norm.get("window", (-1000.0, 400.0))
    return Degradation(kind=norm["kind"], hr_spacing=spacing, ct_window=float(window[1] - window[0]))


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


def hardware(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    text = f"{cpu}, {os.cpu_count()} CPU cores"
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


# ------------------------------------------------------------------------------------------ validation


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1 when both are empty."""
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, truth).sum()) / total


def validate(net, cache, names, prep, cfg: TrainConfig, device, amp: bool, progress: Progress) -> dict:
    """HR Dice of whole validation cases, predicted from their block-averaged LR images."""
    from .inference import sliding_window_predict
    from .sampling import lr_from_hr

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


# ----------------------------------------------------------------------------------------------- state


def _atomic_torch_save(obj, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CsvLog:
    """log.csv, rewritten on resume to drop the rows after the resumed checkpoint."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        rows = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        text = io.StringIO()
        writer = csv.DictWriter(text, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(path, text.getvalue().encode())
        self.rows = rows

    def add(self, row: dict) -> None:
        row = {k: row.get(k, "") for k in CSV_COLUMNS}
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, CSV_COLUMNS).writerow(row)
        self.rows.append({k: str(v) for k, v in row.items()})


class StopFlag:
    """Ctrl-C / SIGTERM during training: finish the step, checkpoint, exit 130. A second one stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------- train


def open_training_cache(args, cfg: TrainConfig, runtime: Runtime, progress: Progress):
    """The cache to train from: `--dataset` itself when it is a cache, else built from the raw dataset."""
    from .preprocess import is_cache, open_cache

    dataset = Path(args.dataset)
    if is_cache(dataset):
        cache = open_cache(dataset)
        # Only keys the config file sets: the defaults of the others do not describe this cache.
        differ = [
            f"{k} {json.dumps(getattr(cfg, k))} vs {json.dumps(cache.prep[k])}"
            for k in ("scale", "lr_spacing", "lr_longer_side", "normalization")
            if k in getattr(cfg, "explicit", ()) and getattr(cfg, k) != cache.prep[k]
        ]
        if differ:
            raise UserError(
                f"cache {dataset} was preprocessed differently from the config ({'; '.join(differ)}); "
                "run `preprocess` with this config or drop those keys"
            )
        return cache
    if not dataset.is_dir():
        raise UserError(f"--dataset {dataset} does not exist")
    cache_dir = Path(args.cache) if args.cache else Path(args.output) / "cache"
    if runtime.main:
        from .preprocess import prepare

        prepare(cfg, dataset, cache_dir, progress)
    if runtime.world > 1:
        dist.barrier()
    return open_cache(cache_dir)


def choose_split(cfg: TrainConfig, cache, split_file: str | None) -> dict:
    from .data import make_split, read_split_file

    groups = list(cfg.groups) + list(cache.meta.get("groups", []))
    split_file = split_file or cfg.split_file
    if split_file:
        split = read_split_file(split_file, cache.names, groups)
    else:
        split = make_split(cache.names, cfg.val_fraction, cfg.split_seed, groups)
    if not split["train"]:
        raise UserError("no training cases after the split; lower val_fraction or add cases")
    return split


def check_output(output: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None; refuses to mix a new run into an old one."""
    last = output / "checkpoint_last.pt"
    if resume:
        if not last.is_file():
            raise UserError(f"--resume: {output} has no checkpoint_last.pt to continue from")
        return last
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; choose a folder")
    if output.is_dir() and any(p.name != "cache" for p in output.iterdir()):
        raise UserError(
            f"--output {output} already holds files; pass --resume to continue that run or choose a new folder"
        )
    return None


def run(args: argparse.Namespace) -> int:
    progress = Progress(args.progress)
    output = Path(args.output)
    runtime = setup_runtime(args.device)
    if not runtime.main:
        progress = Progress("quiet")
    try:
        return _run(args, output, runtime, progress)
    finally:
        if runtime.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _run(args, output: Path, runtime: Runtime, progress: Progress) -> int:
    resume_from = check_output(output, args.resume)
    checkpoint = None
    if resume_from is not None:
        checkpoint = torch.load(resume_from, map_location="cpu", weights_only=False)
        cfg = config_from_dict(checkpoint["config"], f"config saved in {resume_from}")
        if args.config:
            given = asdict(load_config(args.config, args.group_file))
            saved = dict(checkpoint["config"])
            for key in CLI_OVERRIDES:
                given.pop(key), saved.pop(key)
            if given != saved:
                raise UserError(
                    f"--config differs from the config of the run in {output}; drop --config to resume it"
                )
        if args.ablation and args.ablation != checkpoint["ablation"]:
            raise UserError(
                f"the run in {output} is ablation {checkpoint['ablation']!r}; drop --ablation to resume it"
            )
        ablation = checkpoint["ablation"]
    else:
        cfg = load_config(args.config, args.group_file)
        ablation = args.ablation or "full"
    for key in CLI_OVERRIDES:
        value = getattr(args, key)
        if value is not None:
            setattr(cfg, key, value)
    from .data import fail

    fail(cfg.problems(), "the options")
    if runtime.world > 1:
        dist.barrier()  # every rank has checked --output before rank 0 writes into it
    if runtime.main:
        output.mkdir(parents=True, exist_ok=True)

    cache = open_training_cache(args, cfg, runtime, progress)
    prep = dict(cache.prep)
    prep["patch_size_lr"] = cfg.patch_size(prep["spatial_dims"], prep.get("lr_longer_side"))
    d = prep["spatial_dims"]
    problems = []
    if len(prep["patch_size_lr"]) != d:
        problems.append(
            f"patch_size_lr {prep['patch_size_lr']} has {len(prep['patch_size_lr'])} axes; the data is {d}D"
        )
    flip_axes = list(range(d)) if cfg.flip_axes is None else cfg.flip_axes
    if any(not 0 <= a < d for a in flip_axes):
        problems.append(f"flip_axes {flip_axes} must be axes 0..{d - 1} (numpy order)")
    if cfg.rot90 and len(set(prep["patch_size_lr"][-2:])) != 1:
        problems.append(f"rot90 needs a square patch in the last two axes, got {prep['patch_size_lr']}")
    if ABLATIONS[ablation][0].get("image_sr", True) and cfg.loss_rec <= 0:
        problems.append(
            "loss_rec must be > 0 while the image-SR branch exists (or use --ablation no-image-sr)"
        )
    fail(problems, "the options")
    split = checkpoint["split"] if checkpoint else choose_split(cfg, cache, args.split_file)

    seed = cfg.seed
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    device = runtime.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch shapes: pick the fastest convolution once
    net = build_network(cfg, prep, ablation)
    init = checkpoint.get("init") if checkpoint else (initialise_from(net, args.init) if args.init else None)
    loss_fn = build_loss(cfg, ablation)
    amp_dtype, needs_scaler = amp_settings(cfg, device)
    channels_last = use_channels_last(cfg, device, d)
    precision = str(amp_dtype).removeprefix("torch.") if amp_dtype else "fp32"
    fmt = memory_format(d, channels_last)
    net.to(device=device, memory_format=fmt)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    clock = {"start": time.monotonic(), "before": 0.0}  # set for real when the loop starts

    def time_fraction() -> float:
        minutes = (clock["before"] + time.monotonic() - clock["start"]) / 60
        return minutes / cfg.max_minutes if cfg.max_minutes else 0.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, cfg.max_steps, time_fraction))
    scaler = torch.amp.GradScaler("cuda", enabled=needs_scaler)
    step, best, best_step, elapsed_before = 0, -1.0, 0, 0.0
    best_validation: dict = {}
    if checkpoint:
        net.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        step, best, best_step = checkpoint["step"], checkpoint["best_metric"], checkpoint["best_step"]
        best_validation = checkpoint.get("best_validation", {})
        elapsed_before = checkpoint["elapsed_s"]
        if runtime.world == checkpoint.get("world", 1):
            set_rng_state(
                checkpoint["rng"][runtime.rank]
                if runtime.rank < len(checkpoint["rng"])
                else checkpoint["rng"][0]
            )
        progress.log(f"resuming {output} at step {step}")
    model = net
    if runtime.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    from .sampling import Augmentation, PatchSampler, batches, lr_from_hr

    scale = prep["scale"]
    sampler = PatchSampler(
        cache,
        split["train"],
        [p * scale for p in prep["patch_size_lr"]],
        cfg.p_fg,
        min_lesion_voxels=cfg.min_lesion_voxels,
        degradation=degradation_for(prep) if cfg.degradation == "random" else None,
        augmentation=Augmentation(
            flip_axes=flip_axes,
            rot90=cfg.rot90,
            p_intensity=cfg.p_intensity,
            intensity_scale=cfg.intensity_scale,
            intensity_shift=cfg.intensity_shift,
            p_gamma=cfg.p_gamma,
            gamma=cfg.gamma,
            p_affine=cfg.p_affine,
            affine_degrees=cfg.affine_degrees,
            affine_scale=cfg.affine_scale,
        ),
    )
    # A resumed run draws a fresh (still reproducible) patch stream: worker generators cannot be saved.
    stream = batches(
        sampler, cfg.batch_size, cfg.workers, seed + 7919 * step, runtime.rank, device.type == "cuda"
    )
    log = CsvLog(output / "log.csv", step if checkpoint else None) if runtime.main else None

    def save(name: str, collective: bool = True) -> None:
        """Rank 0 writes `name`; with `collective` every rank must call it (their RNG states are gathered)."""
        rngs = [rng_state()]
        if collective and runtime.world > 1:
            rngs = [None] * runtime.world
            dist.all_gather_object(rngs, rng_state())
        if not runtime.main:
            return
        state = {
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "best_metric": best,
            "best_step": best_step,
            "best_validation": best_validation,
            "elapsed_s": elapsed_before + time.monotonic() - start_time,
            "rng": rngs,
            "world": runtime.world,
            "config": asdict(cfg),
            "ablation": ablation,
            "split": split,
            "prep": prep,
            "init": init,
        }
        _atomic_torch_save(state, output / name)

    start_time = time.monotonic()
    clock.update(start=start_time, before=elapsed_before)
    progress.log(
        f"training {ablation} on {len(split['train'])} cases (validating on {len(split['val'])}), "
        f"{d}D patches {prep['patch_size_lr']} LR -> x{scale}, batch {cfg.batch_size}"
        f"{f' x {runtime.world} processes' if runtime.world > 1 else ''}, device {device}, "
        f"amp {precision}, channels-last {'on' if channels_last else 'off'}"
    )
    sums: dict[str, float] = {}
    window_start, window_steps = time.monotonic(), 0
    stopped = timed_out = False
    last_save = time.monotonic()
    model.train()
    with StopFlag() as stop:
        while step < cfg.max_steps:
            hr_image, hr_mask, *made = next(stream)
            hr_image = hr_image.to(device, non_blocking=True)
            hr_mask = hr_mask.to(device, non_blocking=True)
            lr = made[0].to(device, non_blocking=True) if made else lr_from_hr(hr_image, scale)
            lr = lr.contiguous(memory_format=fmt)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = model(lr)
                loss, terms = loss_fn(out, hr_mask, hr_image)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            # A non-finite loss or gradient (a bf16 overflow, a degenerate batch) is not applied: one
            # such step would turn every weight into NaN for the rest of the run. (fp16's scaler skips
            # these steps itself.)
            if scaler.is_enabled() or bool(torch.isfinite(norm) and torch.isfinite(loss.detach())):
                scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            window_steps += 1
            terms["loss"] = float(loss.detach())
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            minutes = (elapsed_before + time.monotonic() - start_time) / 60
            since_save = (time.monotonic() - last_save) / 60
            flags = torch.tensor(
                [
                    float(stop.requested),
                    float(cfg.max_minutes is not None and minutes >= cfg.max_minutes),
                    float(cfg.checkpoint_minutes is not None and since_save >= cfg.checkpoint_minutes),
                ]
            )
            if runtime.world > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stopped, timed_out, save_due = (bool(f) for f in flags)
            speed = window_steps / max(1e-9, time.monotonic() - window_start)
            if runtime.main:
                fraction = step / cfg.max_steps
                if cfg.max_minutes:
                    fraction = max(fraction, minutes / cfg.max_minutes)
                shown = " ".join(f"{k} {v:.3f}" for k, v in terms.items() if k != "loss")
                progress.update(
                    "train",
                    fraction,
                    f"step {step}/{cfg.max_steps} loss {terms['loss']:.3f} ({shown}) {speed:.2f} steps/s",
                )
            last_step = step >= cfg.max_steps or timed_out
            row = None
            if step % cfg.log_every == 0 or last_step or stopped:
                n = max(1, window_steps)
                row = {"step": step, "time_s": round(elapsed_before + time.monotonic() - start_time, 1)}
                row |= {"lr": f"{scheduler.get_last_lr()[0]:.3g}", "steps_per_s": round(speed, 3)}
                row |= {k: round(v / n, 5) for k, v in sums.items()}
                sums, window_start, window_steps = {}, time.monotonic(), 0
            if stopped:
                if log is not None and row:
                    log.add(row)
                save("checkpoint_last.pt")
                progress.log(
                    f"stopped at step {step}; checkpoint written. Continue with --resume --output {output}"
                )
                return 130
            if split["val"] and (step % cfg.val_every == 0 or last_step):
                if runtime.main:
                    result = validate(
                        net, cache, split["val"], prep, cfg, device, amp_dtype is not None, progress
                    )
                    model.train()
                    row = row or {
                        "step": step,
                        "time_s": round(elapsed_before + time.monotonic() - start_time, 1),
                    }
                    row["val_dice"] = result["dice_mean"]
                    progress.log(f"step {step}: validation Dice {result['dice_mean']:.4f}")
                    if result["dice_mean"] > best:
                        best, best_step, best_validation = result["dice_mean"], step, result
                        save("checkpoint_best.pt", collective=False)
                # Rank 0's best metric is what all ranks save and compare.
                if runtime.world > 1:
                    shared = [best, best_step]
                    dist.broadcast_object_list(shared, src=0)
                    best, best_step = shared
            if log is not None and row:
                log.add(row)
            if step % cfg.val_every == 0 or last_step or save_due:
                save("checkpoint_last.pt")
                last_save = time.monotonic()
            if last_step:
                break

    wall = elapsed_before + time.monotonic() - start_time
    if runtime.main:
        write_plot(output / "curves.png", log.rows, progress)
        if not split["val"]:
            best_step = step
            save("checkpoint_best.pt", collective=False)  # nothing to validate on: the last weights
        best_state = torch.load(output / "checkpoint_best.pt", map_location="cpu", weights_only=False)
        net.load_state_dict(best_state["model"])
        training = {
            "command": command_line(runtime.world),
            "dataset": cache.meta["dataset"]["name"],
            "cache": str(cache.folder),
            "split": split,
            "steps": best_state["step"],  # of the weights in the bundle (the best validation)
            "steps_total": step,
            "wall_time_s": round(wall, 1),
            "hardware": hardware(device),
            "processes": runtime.world,
            "precision": precision,
            "channels_last": channels_last,
            "torch": torch.__version__,
            "ablation": ablation,
            "config": asdict(cfg),
            "initialised_from": init,
        }
        validation = dict(best_state.get("best_validation") or {}, step=best_state["step"])
        write_bundle(output, net, cfg, prep, training, validation)
        progress.log(
            f"done: {step} steps in {wall / 60:.1f} min; best validation Dice "
            f"{best_validation.get('dice_mean', float('nan')):.4f} at step {best_step}; bundle in {output}"
        )
    if runtime.world > 1:
        dist.barrier()
    return 0


def command_line(world: int) -> str:
    """How this run was started, as a user would retype it."""
    program = {"__main__.py": "python -m SASSRSegmentLib", "train.py": "python -m SASSRSegmentLib.train"}
    prog = program.get(Path(sys.argv[0]).name, Path(sys.argv[0]).name)
    if world > 1:
        prog = f"torchrun --nproc_per_node {world} -m {prog.removeprefix('python -m ')}"
    return shlex.join([prog, *sys.argv[1:]]).replace(f"'{prog}'", prog, 1)


def initialise_from(net, bundle: str) -> dict:
    """Start from a bundle's weights (fine-tuning); returns its provenance for the new card."""
    card, source = load_bundle(bundle)
    # Compared as configs: a card written before a network option existed holds no key for it.
    if source.config != net.config:
        raise UserError(
            f"--init {bundle}: its network differs from this run's (config or --ablation); "
            "use a bundle trained with the same network settings"
        )
    net.load_state_dict(source.state_dict())
    keep = ("command", "dataset", "steps", "steps_total", "wall_time_s", "hardware", "precision", "torch")
    return {
        "bundle": str(bundle),
        "training": {k: card.get("training", {}).get(k) for k in keep},
        "validation_dice": card.get("validation", {}).get("dice_mean"),
        "initialised_from": card.get("training", {}).get("initialised_from"),
    }


def write_bundle(output: Path, net, cfg: TrainConfig, prep: dict, training: dict, validation: dict) -> None:
    """model.pt (fp16 state dict) + model.json (the card) in `output`."""
    card = {
        "name": cfg.name,
        "description": cfg.description,
        "modality": cfg.modality,
        "task": cfg.task,
        "preprocessing": prep,
        "threshold": cfg.threshold,
        "training": training,
        "validation": validation,
        "licence_note": cfg.licence_note,
    }
    save_bundle(output, net.float().cpu().eval(), card, half=True)


# ------------------------------------------------------------------------------------------------ plot


# 3x5 bitmap glyphs (rows top to bottom, 3 bits each) for axis labels without a font library.
def _number(v: float) -> str:
    return f"{v:.3g}".replace("+", "")


def render_curves(rows: list[dict], width: int = 720, height: int = 400) -> np.ndarray:
    """RGB image: training loss (blue, left axis) and validation Dice (red, right axis, 0-1) against step.

    Steps whose loss was not finite (skipped, see the training loop) are left out of the curve."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        font = ImageFont.load_default()
    left, right, top, bottom = 70, width - 60, 30, height - 40
    draw.line([(left, top), (left, bottom), (right, bottom), (right, top)], fill=(0, 0, 0))
    logged = [(float(r["step"]), float(r["loss"])) for r in rows if r.get("loss") not in ("", None)]
    logged = [(s, v) for s, v in logged if math.isfinite(v)]
    val = [(float(r["step"]), float(r["val_dice"])) for r in rows if r.get("val_dice") not in ("", None)]
    max_step = max([1.0, *[s for s, _ in logged], *[s for s, _ in val]])
    top_loss = max([v for _, v in logged], default=1.0)

    def point(step: float, fraction: float) -> tuple[float, float]:
        return left + (right - left) * step / max_step, bottom - (bottom - top) * min(max(fraction, 0.0), 1.0)

    blue, red, grey = (30, 80, 200), (200, 40, 40), (120, 120, 120)
    for x, y, text, colour in (
        (left, 8, "loss", blue),
        (right - 40, 8, "dice", red),
        ((left + right) // 2 - 16, height - 18, "step", grey),
        (left - 4, bottom + 6, "0", grey),
        (right - 40, bottom + 6, _number(max_step), grey),
        (4, top, _number(top_loss), blue),
        (4, bottom - 12, "0", blue),
        (right + 6, top, "1", red),
        (right + 6, bottom - 12, "0", red),
    ):
        draw.text((x, y), text, fill=colour, font=font)
    if len(logged) > 1:
        draw.line([point(s, v / max(top_loss, 1e-12)) for s, v in logged], fill=blue, width=2)
    if len(val) > 1:
        draw.line([point(s, v) for s, v in val], fill=red, width=2)
    for s, v in val:
        x, y = point(s, v)
        draw.rectangle([x - 2, y - 2, x + 2, y + 2], fill=red)
    return np.asarray(canvas)


def write_plot(path: Path, rows: list[dict], progress: Progress) -> None:
    try:
        from PIL import Image
    except ImportError:
        progress.log("Pillow is not installed here: curves.png skipped (log.csv has the numbers)")
        return
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    Image.fromarray(render_curves(rows)).save(tmp, format="PNG")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", required=True, help="nnU-Net v2 raw dataset folder, or a cache made by `preprocess`"
    )
    parser.add_argument(
        "--output", required=True, help="run folder: checkpoints, log.csv, curves.png, model bundle"
    )
    parser.add_argument(
        "--config", help="JSON of hyper-parameters overriding the defaults (docs/training.md)"
    )
    parser.add_argument("--max-steps", type=int, help="optimiser steps (overrides the config)")
    parser.add_argument("--max-minutes", type=float, help="stop after this many minutes and write the bundle")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --output from its last checkpoint"
    )
    parser.add_argument(
        "--init",
        metavar="BUNDLE",
        help="start from this bundle's weights (fine-tuning; same network settings)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--seed", type=int, help="random seed (overrides the config)")
    parser.add_argument(
        "--ablation", choices=sorted(ABLATIONS), help="train a reduced network (default: full)"
    )
    parser.add_argument("--val-every", type=int, help="validate every N steps")
    parser.add_argument("--batch-size", type=int, help="patches per step and process")
    parser.add_argument(
        "--workers", type=int, help="patch-loading processes (0: load in the training process)"
    )
    parser.add_argument("--cache", help="cache folder for a raw --dataset (default: OUTPUT/cache)")
    parser.add_argument("--group-file", help="JSON list of lists of same-patient case names")
    parser.add_argument(
        "--split-file", help='JSON {"train": [...], "val": [...]} or nnU-Net splits_final.json'
    )
    parser.add_argument("--progress", choices=("bar", "json", "quiet"), default="bar")


def main(argv: list[str] | None = None) -> int:
    """`python -m SASSRSegmentLib.train` (no other engine command imported: SimpleITK-free hosts)."""
    parser = argparse.ArgumentParser(
        prog="python -m SASSRSegmentLib.train", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    from .cli import run_command

    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
