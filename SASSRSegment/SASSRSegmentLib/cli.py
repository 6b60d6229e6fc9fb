"""`python -m SASSRSegmentLib <command>` / `sassr-segment <command>`.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; they are
imported only when chosen so that `--help` and light commands stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .commands.runner import run_command

COMMANDS = {
    "segment": ("commands.segment", "segment lesions at super-resolution in images or volumes"),
    "evaluate": ("commands.evaluate", "score a model on a dataset (HR Dice from synthesised LR input)"),
    "train": ("commands.train", "train a model bundle on an nnU-Net style dataset"),
    "preprocess": ("commands.preprocess", "build the training cache of a dataset without training"),
    "models": ("commands.models", "list the bundled models and their cards"),
    "devices": ("commands.devices", "show the PyTorch, the GPUs and the device --device auto uses"),
}


class _Parser(argparse.ArgumentParser):
    """Argument mistakes in one line, like every other error (argparse prints its whole usage)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen command's module is imported to add its arguments.

    Importing one command does not drag in another's dependencies: `train` from a prepared cache
    runs on machines without SimpleITK, which `segment` needs.
    """
    parser = _Parser(prog="sassr-segment", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == command:
            _load(module).add_arguments(p)
    return parser


def _load(module: str):
    return importlib.import_module(f"{__package__}.{module}")


def main(argv: list[str] | None = None) -> int:
    # Before any command imports torch (it reads this once): on Apple MPS, operations torch has no MPS
    # kernel for (3D trilinear upsampling before torch 2.8) run on the CPU instead of stopping the run.
    # Set here, in the engine's process, not on import: Slicer imports this package for the model
    # cards, and its own process (and other extensions' torch) is not ours to configure.
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((a for a in argv if a in COMMANDS), None))
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) or an argument mistake (2): a status, also in process
        return int(stop.code or 0)
    if not getattr(args, "_module", None):
        parser.print_help(sys.stderr)
        return 2
    module = _load(args._module)
    return run_command(module.run, args, getattr(module, "RUNS_IN_WORKER", False))


def run() -> None:
    """The process entry point (`python -m`, the console script): `main()`, then an exit that skips the
    interpreter's teardown. Unloading torch and SimpleITK took 0.3 s of every run (1.02-1.07 s against
    1.30-1.43 s for a process that imports both and exits), a ninth of `segment` on the 2 mm sample.
    Every output is written, closed and renamed into place by the time `main` returns; only the
    standard streams still hold data."""
    status = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: the process was started with that descriptor closed
                stream.flush()
        except (OSError, ValueError):
            pass  # closed or broken: nothing more can reach it, and the status must still be the command's
    os._exit(status)
