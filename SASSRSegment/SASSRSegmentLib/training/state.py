"""A run's state on disk: atomic checkpoints, RNG states, log.csv, the run folder's rules, and the stop flag that lets Ctrl-C end a step cleanly."""

from __future__ import annotations

import csv
import io
import random
import signal
from pathlib import Path

import numpy as np
import torch

from ..io.files import atomic_write_bytes
from ..runtime.errors import UserError

CSV_COLUMNS = ["step", "time_s", "lr", "loss", "seg", "rec", "fa", "sa", "kd", "steps_per_s", "val_dice"]


def atomic_torch_save(obj, path: Path) -> None:
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


# What a run writes before its first checkpoint.
UNRESUMABLE = ("log.csv", "curves.png")


def check_output(output: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None; refuses to mix a new run into an old one."""
    last = output / "checkpoint_last.pt"
    if resume:
        if not last.is_file():
            stopped = " (its run stopped before its first checkpoint: start it again without --resume)"
            raise UserError(
                f"--resume: {output} has no checkpoint_last.pt to continue from"
                + (stopped if (output / "log.csv").is_file() else "")
            )
        return last
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; choose a folder")
    held = [p for p in output.iterdir() if p.name != "cache"] if output.is_dir() else []
    if held and not (
        _own_log(output / "log.csv") and all(p.name in UNRESUMABLE and p.is_file() for p in held)
    ):
        raise UserError(
            f"--output {output} already holds files; pass --resume to continue that run or choose a new folder"
        )
    # A run stopped before its first checkpoint (a second Ctrl-C during the first) left only its log:
    # nothing to resume, so a new run takes its place instead of leaving a folder neither accepts.
    for path in held:
        path.unlink()
    return None


def _own_log(path: Path) -> bool:
    """Whether `path` is a training log this tool wrote (its header), not a file of the user's."""
    try:
        with open(path, newline="") as f:
            return f.readline().strip() == ",".join(CSV_COLUMNS)
    except (OSError, UnicodeDecodeError):
        return False
