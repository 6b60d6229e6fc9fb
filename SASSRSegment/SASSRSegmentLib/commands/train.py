"""The `train` command's arguments and entry (the work is in training/trainer.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.distributed as dist

from ..runtime.progress import Progress
from ..training.config import ABLATIONS
from ..training.runtime import setup_runtime
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


def run(args: argparse.Namespace) -> int:
    progress = Progress(args.progress)
    runtime = setup_runtime(args.device)
    if not runtime.main:
        progress = Progress("quiet")
    try:
        return Trainer(args, Path(args.output), runtime, progress).train()
    finally:
        if runtime.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
