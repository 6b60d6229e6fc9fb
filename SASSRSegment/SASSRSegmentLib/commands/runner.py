"""Running a command: the exit-status contract (2 user error, 130 cancelled) and cancellation that takes effect within about a second."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from ..runtime.errors import UserError


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
    from ..runtime import progress

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
        from ..io.imageio import discard_pending

        discard_pending()
        if "status" not in outcome:
            print("cancelled", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Not a normal interpreter exit: the worker may still be inside torch or ITK, whose threads do
        # not survive being torn down under them.
        os._exit(outcome.get("status", 130))
    # No status: the worker died of an error that is not the user's (threading has printed it).
    return outcome.get("status", 1)
