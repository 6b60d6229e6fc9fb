"""`python -m SASSRSegmentLib <command>` / `sassr-segment <command>`.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; they are
imported only when chosen so that `--help` and light commands stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from .errors import UserError

COMMANDS = {
    "segment": ("segment", "segment lesions at super-resolution in images or volumes"),
    "evaluate": ("evaluate", "score a model on a dataset (HR Dice from synthesised LR input)"),
    "train": ("train", "train a model bundle on an nnU-Net style dataset"),
    "preprocess": ("preprocess", "build the training cache of a dataset without training"),
    "models": ("models", "list the bundled models and their cards"),
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


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_command(run, args: argparse.Namespace) -> int:
    """Run a command's `run(args)` with the exit-status contract: 2 user error, 130 cancelled."""
    # SIGTERM (the Slicer module's Cancel, batch schedulers) takes the same clean path as Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return int(run(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((a for a in argv if a in COMMANDS), None))
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) or an argument mistake (2): a status, also in process
        return int(stop.code or 0)
    if not getattr(args, "_module", None):
        parser.print_help(sys.stderr)
        return 2
    return run_command(_load(args._module).run, args)
