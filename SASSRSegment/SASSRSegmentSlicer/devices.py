"""Devices: what PyTorch sees in the engine's Python (CUDA, Apple MPS), the panel's line about it, and
the engine's `--device` value for the panel's Auto/CPU/GPU choice."""

import json
import re
import subprocess
import tempfile
import time

from .processes import processGroupOptions, signalProcessTree
from .slicerapi import _

ENGINE_DEVICES = ("auto", "cpu", "cuda", "mps")
# torch's first import from a cold disk cache can take tens of seconds on Windows.
PROBE_TIMEOUT_S = 120.0


class DeviceProbe:
    """Asks the engine's Python, in a process of its own, what PyTorch sees (the engine's `devices`).

    Not imported into Slicer's process: importing torch there froze the panel for seconds, and querying
    a CUDA GPU kept a CUDA context (hundreds of MB of GPU memory) in Slicer for the rest of the session.
    """

    def __init__(self, command, env=None, timeoutS=PROBE_TIMEOUT_S):
        self.command = [str(part) for part in command]
        self.env = env
        self.timeoutS = timeoutS
        self._process = None
        self._startTime = None
        self._output = []
        self._result = None

    def start(self):
        # Files, not pipes: the output is read once the process has ended, and a pipe that fills up
        # (torch's warnings on a broken install) would block the process until the timeout.
        self._output = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
        self._startTime = time.monotonic()
        try:
            self._process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=self._output[0],
                stderr=self._output[1],
                env=self.env,
                **processGroupOptions(),
            )
        except OSError as exc:
            self._finish(_failed(_("the engine's Python could not start: {error}").format(error=exc)))

    def poll(self):
        """None while the process runs; then what it found: {"torch": version or None, "cuda": GPU name
        or None, "mps": bool, "error": why PyTorch is not usable, or None}."""
        if self._result is not None or self._process is None:
            return self._result
        if self._process.poll() is None:
            if time.monotonic() - self._startTime < self.timeoutS:
                return None
            self.stop()
            return self._finish(
                _failed(
                    _("the engine's Python did not answer within {seconds} s").format(
                        seconds=f"{self.timeoutS:g}"
                    )
                )
            )
        stdout, stderr = (self._read(stream) for stream in self._output)
        return self._finish(_parseDevices(stdout, stderr, self._process.returncode))

    def stop(self):
        if self._process is not None and self._process.poll() is None:
            # The group: PythonSlicer's launcher has started the Python that imports torch.
            signalProcessTree(self._process, hard=True)
            self._process.wait()
        self._finish(self._result)

    @staticmethod
    def _read(stream):
        stream.seek(0)
        return stream.read().decode("utf-8", errors="replace")

    def _finish(self, result):
        for stream in self._output:
            stream.close()
        self._output = []
        self._result = result
        return result


def _failed(reason):
    return {"torch": None, "cuda": None, "mps": False, "error": reason}


def _parseDevices(stdout, stderr, returnCode):
    lines = [line for line in stdout.splitlines() if line.strip()]
    try:
        found = json.loads(lines[-1]) if returnCode == 0 and lines else None
    except ValueError:
        found = None
    if not isinstance(found, dict):
        lastError = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
        return _failed(
            _("the engine's Python failed (exit code {code}): {error}").format(
                code=returnCode, error=lastError
            )
        )
    return {**_failed(None), **found}


def deviceSummary(devices):
    """One line for the panel saying which device "Auto" will use."""
    if devices.get("error"):
        return _("PyTorch is not usable here: {error}").format(error=devices["error"])
    if not devices.get("torch"):
        return _("PyTorch is not installed: it will be offered on the first run.")
    if devices.get("cuda"):
        return _("PyTorch {version}; GPU: {name} (CUDA)").format(
            version=devices["torch"], name=devices["cuda"]
        )
    if devices.get("mps"):
        return _("PyTorch {version}; GPU: Apple (MPS)").format(version=devices["torch"])
    return _("PyTorch {version}; no GPU found, the CPU will be used").format(version=devices["torch"])


def deviceArgument(choice, devices=None):
    """Map the panel's Auto/CPU/GPU choice (or an engine device name) to the engine's `--device` value.

    "gpu" means CUDA unless PyTorch only sees an Apple GPU; asking for an absent GPU is left to the
    engine, which says so in one line.
    """
    value = str(choice).strip().lower()
    if value == "gpu":
        devices = devices or {}
        return "mps" if devices.get("mps") and not devices.get("cuda") else "cuda"
    if value not in ENGINE_DEVICES and not re.fullmatch(r"cuda:\d+", value):
        raise ValueError(_("Unknown device '{device}': use auto, cpu or gpu.").format(device=choice))
    return value
