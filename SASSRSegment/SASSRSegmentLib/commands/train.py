"""The `train` command's arguments and entry (the work is in training/trainer.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.distributed as dist

from ..runtime.progress import Progress
from ..training.config import ABLATIONS
from ..training.runtime import Runtime, setup_runtime
from ..training.trainer import Trainer


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
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--init",
        metavar="BUNDLE",
        help="start from this bundle's weights (fine-tuning; same network settings)",
    )
    start.add_argument(
        "--warm-start",
        metavar="BUNDLE",
        help="copy the layers this network shares with a bundle's (same names and shapes, e.g. the "
        "encoder of a baseline bundle into the full network); the rest starts fresh",
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


def case_names(dataset: Path) -> list[str]:
    """The cases of a cache folder or of a raw dataset (validated: its problems are reported here)."""
    from ..data.cache import is_cache, open_cache
    from ..data.datasets import open_dataset

    if is_cache(dataset):
        return open_cache(dataset).names
    return [case.name for case in open_dataset(dataset).cases]


def set_up(args: argparse.Namespace, output: Path, runtime: Runtime, progress: Progress) -> Trainer:
    """The Trainer; a refused setup (a bad split, options the data rules out) leaves no empty run folder."""
    fresh = [folder for folder in (output / "cache", output) if not folder.exists()]
    try:
        return Trainer(args, output, runtime, progress)
    except BaseException:
        if runtime.main:  # the rank that made them
            for folder in fresh:
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        raise


def run(args: argparse.Namespace) -> int:
    if args.group_file:
        from ..data.datasets import check_group_file

        check_group_file(args.group_file, case_names(Path(args.dataset)))
    progress = Progress(args.progress)
    runtime = setup_runtime(args.device)
    if not runtime.main:
        progress = Progress("quiet")
    try:
        return set_up(args, Path(args.output), runtime, progress).train()
    finally:
        if runtime.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
