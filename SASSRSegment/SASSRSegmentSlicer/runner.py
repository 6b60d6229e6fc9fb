"""The engine process: SegmentRunner starts it in the background, turns its output into events, and
cancels it (its whole process group)."""

import logging
import queue
import subprocess
import threading
import time
from collections import deque

from .command import WARNING_PREFIX, parseProgressLine
from .processes import processGroupOptions, signalProcessTree

CANCEL_GRACE_S = 2.0
STDERR_LINES_KEPT = 200


class SegmentRunner:
    """Runs one engine command in the background and turns its output into events.

    Slicer polls it from a timer so the application stays responsive; tests drive it directly.
    The process gets its own process group so that Cancel also reaches the Python child that the
    PythonSlicer launcher starts.
    """

    def __init__(self, command, env=None, cwd=None, cancelGraceS=CANCEL_GRACE_S):
        self.command = [str(part) for part in command]
        self.env = env
        self.cwd = cwd
        self.cancelGraceS = cancelGraceS
        self.returnCode = None
        self.cancelled = False
        self.stderrLines = deque(maxlen=STDERR_LINES_KEPT)
        self.warnings = []
        self._queue = queue.Queue()
        self._readers = []
        self._process = None
        self._killAt = None
        self._startTime = None

    def start(self):
        self._process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=self.cwd,
            text=True,
            encoding="utf-8",
            errors="replace",
            **processGroupOptions(),
        )
        self._startTime = time.monotonic()
        for stream, kind in ((self._process.stdout, "stdout"), (self._process.stderr, "stderr")):
            reader = threading.Thread(target=self._read, args=(stream, kind), daemon=True)
            reader.start()
            self._readers.append(reader)

    def _read(self, stream, kind):
        with stream:
            for line in stream:
                self._queue.put((kind, line.rstrip("\r\n")))

    @property
    def finished(self):
        return self.returnCode is not None

    def elapsed(self):
        return 0.0 if self._startTime is None else time.monotonic() - self._startTime

    def poll(self):
        """New events since the last call; sets `returnCode` once the process and its output have ended."""
        if self._killAt is not None and time.monotonic() >= self._killAt:
            self._killAt = None
            self._signal(hard=True)
        # Decide "done" before draining: once the readers have ended, every line is already queued.
        done = self._process.poll() is not None and not any(reader.is_alive() for reader in self._readers)
        events = []
        while True:
            try:
                kind, line = self._queue.get_nowait()
            except queue.Empty:
                break
            event = self._event(kind, line)
            if event:
                events.append(event)
        if done and self.returnCode is None:
            self.returnCode = self._process.returncode
        return events

    def _event(self, kind, line):
        if kind == "stderr":
            if not line.strip():
                return None
            self.stderrLines.append(line)
            # Outside JSON mode the engine prints its warnings on standard error.
            if line.startswith(WARNING_PREFIX):
                event = {"kind": "warning", "message": line[len(WARNING_PREFIX) :].strip()}
            else:
                return {"kind": "stderr", "message": line}
        else:
            event = parseProgressLine(line)
        if event is None and line.strip():
            logging.debug("SASSRSegment: unparsed engine output: %s", line)
        elif event and event["kind"] == "warning":
            self.warnings.append(event["message"])
        return event

    def wait(self, onEvent=None, idle=None, interval=0.05):
        """Poll until finished, passing events to onEvent and calling idle() between polls."""
        while not self.finished:
            for event in self.poll():
                if onEvent:
                    onEvent(event)
            if idle:
                idle()
            time.sleep(interval)
        return self.returnCode

    def cancel(self):
        """Ask the process to stop (SIGTERM); poll() kills it if it is still there after the grace time."""
        if self.finished or self.cancelled or self._process is None:
            return
        self.cancelled = True
        self._signal(hard=False)
        self._killAt = time.monotonic() + self.cancelGraceS

    def terminate(self):
        """Cancel and wait until the process group has ended (killed after the grace time)."""
        if self._process is None:
            return
        self.cancel()
        try:
            self._process.wait(timeout=self.cancelGraceS)
        except subprocess.TimeoutExpired:
            pass
        # Also ends a child that outlived the launcher.
        self._signal(hard=True)
        self._process.wait()
        # The pipes close only when every process holding them has exited (on Windows taskkill ends
        # the engine behind PythonSlicer's launcher asynchronously): until then it may hold files open.
        for reader in self._readers:
            reader.join(timeout=self.cancelGraceS)

    def _signal(self, hard):
        signalProcessTree(self._process, hard)
