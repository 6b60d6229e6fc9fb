"""Devices: what PyTorch sees in Slicer's Python (CUDA, Apple MPS), the panel's line about it, and the
engine's `--device` value for the panel's Auto/CPU/GPU choice."""

import importlib.util
import re

from .slicerapi import _

DEVICE_CHOICES = ("auto", "cpu", "gpu")
ENGINE_DEVICES = ("auto", "cpu", "cuda", "mps")


def detectTorchDevices():
    """What PyTorch sees in this Python: {"torch": version or None, "cuda": GPU name or None, "mps": bool}.

    Only imports torch when it is installed, so a missing torch costs nothing and raises nothing.
    """
    devices = {"torch": None, "cuda": None, "mps": False, "error": None}
    if importlib.util.find_spec("torch") is None:
        return devices
    try:
        import torch
    except Exception as exc:  # a broken install raises anything from OSError to RuntimeError
        devices["error"] = f"{type(exc).__name__}: {exc}"
        return devices
    devices["torch"] = torch.__version__
    if torch.cuda.is_available():
        devices["cuda"] = torch.cuda.get_device_name(0)
    mps = getattr(torch.backends, "mps", None)
    devices["mps"] = bool(mps is not None and mps.is_available())
    return devices


def deviceSummary(devices):
    """One line for the panel saying which device "Auto" will use."""
    if devices.get("error"):
        return _("PyTorch failed to load: {error}").format(error=devices["error"])
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
