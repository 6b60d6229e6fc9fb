"""Setting a run up from its options: the config (or the resumed run's), the cache, the split, the
checks against the data, and the patch sampler."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist

from ..runtime.errors import UserError
from ..runtime.progress import Progress
from .build import degradation_for
from .config import ABLATIONS, CLI_OVERRIDES, TrainConfig, config_from_dict, load_config
from .runtime import Runtime


def open_training_cache(args, cfg: TrainConfig, runtime: Runtime, progress: Progress):
    """The cache to train from: `--dataset` itself when it is a cache, else built from the raw dataset."""
    from ..data.cache import is_cache, open_cache
    from ..data.datasets import resolve_lesion_values

    dataset = Path(args.dataset)
    if is_cache(dataset):
        cache = open_cache(dataset)
        # Only keys the config file sets: the defaults of the others do not describe this cache.
        explicit = getattr(cfg, "explicit", ())
        wanted = {k: getattr(cfg, k) for k in ("scale", "lr_spacing", "lr_longer_side", "normalization")}
        if "labels" in explicit:
            # The config's labels had been left unused: every value > 0 trained as lesion, without a word.
            # A list never matches a cache of every value > 0, which may hold values dataset.json omits.
            wanted["labels"] = resolve_lesion_values(cache.meta["dataset"]["dataset_json"], cfg.labels)
        differ = [
            f"{k} {json.dumps(v)} vs {json.dumps(cache.prep.get(k))}"
            for k, v in wanted.items()
            if k in explicit and v != cache.prep.get(k)
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
        from ..data.cache import prepare

        prepare(cfg, dataset, cache_dir, progress)
    if runtime.world > 1:
        dist.barrier()
    return open_cache(cache_dir)


def choose_split(cfg: TrainConfig, cache, split_file: str | None) -> dict:
    from ..data.datasets import make_split, read_split_file

    groups = list(cfg.groups) + list(cache.meta.get("groups", []))
    split_file = split_file or cfg.split_file
    if split_file:
        split = read_split_file(split_file, cache.names, groups)
    else:
        split = make_split(cache.names, cfg.val_fraction, cfg.split_seed, groups)
    if not split["train"]:
        raise UserError("no training cases after the split; lower val_fraction or add cases")
    if not any(cache.cases[name]["lesion_voxels"] for name in split["train"]):
        # A mask export that lost its labels had trained and shipped a bundle of validation Dice 0.
        raise UserError(
            f"none of the {len(split['train'])} training cases has a lesion (every label is 0 once the lesion "
            "labels are picked): check the label files and the config's labels"
        )
    return split


def resolve_config(args, output: Path, checkpoint: dict | None) -> tuple[TrainConfig, str]:
    """(config, ablation) of the run: the checkpoint's when resuming (a --config or --ablation given as
    well must agree with it), else --config's; then the command line's overrides, checked."""
    if checkpoint is not None:
        for option in ("init", "warm_start"):
            if getattr(args, option, None):
                raise UserError(
                    f"--{option.replace('_', '-')} starts a new run; --resume continues the run in {output} "
                    "from its checkpoint: drop one of them"
                )
        cfg = config_from_dict(checkpoint["config"], f"config saved in {output / 'checkpoint_last.pt'}")
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
    from ..data.datasets import fail

    fail(cfg.problems(), "the options")
    return cfg, ablation


def check_resumed_data(checkpoint: dict, cache, dataset: str) -> None:
    """A resumed run must see the data it started on: a cache rebuilt with other settings went on
    silently (and the card then described settings 150 of its 152 steps never saw), another dataset
    failed with a traceback."""
    saved = {k: v for k, v in checkpoint["prep"].items() if k != "patch_size_lr"}
    # Runs before 2026-12-07 recorded the labels dataset.json declared (e.g. [1]) where they counted
    # every value > 0, as a cache now records with None: the same arrays.
    same_labels = None in (saved.get("labels"), cache.prep.get("labels"))
    differ = [
        f"{k} {json.dumps(v)} vs {json.dumps(cache.prep.get(k))}"
        for k, v in saved.items()
        if cache.prep.get(k) != v and not (k == "labels" and same_labels)
    ]
    if differ:
        raise UserError(
            f"--dataset {dataset} was preprocessed differently from the run being resumed "
            f"({'; '.join(differ)}); resume with the data it was trained on"
        )
    split = checkpoint["split"]
    missing = sorted((set(split["train"]) | set(split["val"])) - set(cache.names))
    if missing:
        raise UserError(
            f"--dataset {dataset} lacks {len(missing)} case(s) of the run being resumed "
            f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); resume with the data it was trained on"
        )


def check_against_data(cfg: TrainConfig, prep: dict, ablation: str) -> list[int]:
    """The options that depend on the data's dimensionality, checked; returns the flip axes."""
    from ..data.datasets import fail

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
    deepest = 2 ** (
        len(cfg.features) - 1
    )  # the input is padded to this stride: ceil(side / it) at the bottom
    if cfg.norm == "instance" and max(prep["patch_size_lr"]) <= deepest:
        # Instance norm of a single voxel: a torch error in the first step, after the preprocessing.
        problems.append(
            f"patch_size_lr {prep['patch_size_lr']} is too small for {len(cfg.features)} levels of features with "
            f"instance norm: at least one axis over {deepest} (2D: lr_longer_side), or fewer features"
        )
    if d == 2 and "thick-slice-5mm" in cfg.val_lr_inputs:
        problems.append("val_lr_inputs: thick-slice-5mm needs 3D data; the data is 2D")
    fail(problems, "the options")
    return flip_axes


def make_sampler(cfg: TrainConfig, cache, names: list[str], prep: dict, flip_axes: list[int]):
    """The patch sampler of the training cases: HR patches, their augmentation and LR synthesis."""
    from ..data.sampling import Augmentation, PatchSampler

    return PatchSampler(
        cache,
        names,
        [p * prep["scale"] for p in prep["patch_size_lr"]],
        cfg.p_fg,
        min_lesion_voxels=cfg.min_lesion_voxels,
        degradation=degradation_for(prep, cfg),
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
            p_lesion_fade=cfg.p_lesion_fade,
            lesion_fade=cfg.lesion_fade,
        ),
    )
