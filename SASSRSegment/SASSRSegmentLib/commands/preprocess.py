"""The `preprocess` command: the training cache of a dataset, built without training."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.cache import prepare
from ..data.datasets import check_group_file, open_dataset
from ..runtime.progress import Progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", required=True, help="nnU-Net v2 raw dataset folder (dataset.json, imagesTr, labelsTr)"
    )
    parser.add_argument("--output", required=True, help="cache folder to create or update")
    parser.add_argument("--config", help="training config JSON (its preprocessing keys are used)")
    parser.add_argument(
        "--group-file", help="JSON list of lists of same-patient case names (kept on one side of splits)"
    )
    parser.add_argument("--workers", type=int, help="preprocessing processes (default: the config's, 2)")
    parser.add_argument("--progress", choices=("bar", "json", "quiet"), default="bar")


def run(args: argparse.Namespace) -> int:
    from ..training.config import load_config

    options = load_config(args.config, group_file=args.group_file)
    if args.workers is not None:
        options.workers = max(1, args.workers)
    if args.group_file:
        check_group_file(args.group_file, [case.name for case in open_dataset(args.dataset).cases])
    output = Path(args.output)
    created = not output.exists()
    try:
        prepare(options, args.dataset, output, Progress(args.progress))
    except BaseException:
        # An empty folder left by a failed first run would look like a cache made of nothing.
        if created and output.is_dir() and not any(output.iterdir()):
            output.rmdir()
        raise
    return 0
