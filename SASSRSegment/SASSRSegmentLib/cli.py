"""`python -m SASSRSegmentLib <command>` / `sassr-segment <command>`.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; they are
imported only when chosen so that `--help` and light commands stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

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


# How long a cancel waits for the command to unwind before it discards the staged outputs and exits.
CANCEL_WAIT_S = 1.0


def _status(run, args: argparse.Namespace) -> int:
    """`run(args)` with the exit-status contract: 2 user error, 130 cancelled."""
    try:
        return int(run(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130


def run_command(run, args: argparse.Namespace, in_worker: bool = False) -> int:
    """Run a command's `run(args)`; with `in_worker`, in a worker thread, so that Ctrl-C and SIGTERM
    take effect within about a second even while the work is inside one long library call (ITK and
    torch calls cannot be interrupted): the worker stops at its next progress step or is abandoned, its
    staged outputs are discarded, and the process exits with status 130."""
    if threading.current_thread() is not threading.main_thread():
        return _status(run, args)
    # SIGTERM (the Slicer module's Cancel, batch schedulers) takes the same clean path as Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if not in_worker:
        return _status(run, args)
    from . import progress

    progress.CANCEL.clear()
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.update(status=_status(run, args)), daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except KeyboardInterrupt:
        progress.CANCEL.set()
        worker.join(CANCEL_WAIT_S)
        from .imageio import discard_pending

        discard_pending()
        if "status" not in outcome:
            print("cancelled", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Not a normal interpreter exit: the worker may still be inside torch or ITK, whose threads do
        # not survive being torn down under them.
        os._exit(outcome.get("status", 130))
    return outcome["status"]


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
    module = _load(args._module)
    return run_command(module.run, args, getattr(module, "RUNS_IN_WORKER", False))
