"""Progress reporting for long jobs: a terminal bar, JSON lines for the Slicer module, or nothing."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import TextIO

# Set by the command line when Ctrl-C or SIGTERM arrives while a command runs in its worker thread:
# the next progress update there raises KeyboardInterrupt, so long loops unwind at their next step.
CANCEL = threading.Event()


class Progress:
    """Reports (stage, fraction, message) updates.

    mode "bar": a single self-overwriting line on stderr when it is a terminal, plain lines otherwise.
    mode "json": one JSON object per line on stdout: {"stage", "fraction", "message", "elapsed"};
      the Slicer module parses exactly this.
    mode "quiet": nothing.
    """

    def __init__(self, mode: str = "bar", stream: TextIO | None = None, min_interval: float = 0.2):
        if mode not in ("bar", "json", "quiet"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode = mode
        self.stream = stream if stream is not None else (sys.stdout if mode == "json" else sys.stderr)
        self.min_interval = min_interval
        self._start = time.monotonic()
        self._last_emit = 0.0
        self._last_stage = None

    def update(self, stage: str, fraction: float, message: str = "") -> None:
        if CANCEL.is_set():
            raise KeyboardInterrupt
        fraction = min(max(float(fraction), 0.0), 1.0)
        now = time.monotonic()
        # Throttle repeats within a stage, but always show stage changes and completion.
        if stage == self._last_stage and fraction < 1.0 and now - self._last_emit < self.min_interval:
            return
        self._last_emit, self._last_stage = now, stage
        elapsed = now - self._start
        if self.mode == "json":
            record = {"stage": stage, "fraction": round(fraction, 4), "message": message}
            record["elapsed"] = round(elapsed, 2)
            self.stream.write(json.dumps(record) + "\n")
            self.stream.flush()
        elif self.mode == "bar":
            width = 30
            filled = int(round(width * fraction))
            line = f"{stage:<12} [{'#' * filled}{'.' * (width - filled)}] {fraction * 100:5.1f}% {message}"
            if self.stream.isatty():
                end = "\n" if fraction >= 1.0 else ""
                self.stream.write("\r" + line[:150].ljust(150) + end)
            else:
                self.stream.write(line + "\n")
            self.stream.flush()

    def log(self, message: str) -> None:
        """A free-form line (never parsed as progress by the Slicer module)."""
        if self.mode == "quiet":
            return
        if self.mode == "json":
            self.stream.write(json.dumps({"log": message}) + "\n")
            self.stream.flush()
        else:
            self.stream.write(message + "\n")
            self.stream.flush()
