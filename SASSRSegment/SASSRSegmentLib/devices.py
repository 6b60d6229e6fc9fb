"""Device choice and mixed precision."""

from __future__ import annotations

import contextlib

import torch

from .errors import UserError


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def select_device(name: str = "auto") -> torch.device:
    """auto: CUDA, then Apple MPS, then CPU. Asking for a GPU that is not there is a user error."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(
                "--device cuda was asked for but no CUDA GPU is usable here; use --device cpu or auto"
            )
        return torch.device(name)
    if name == "mps":
        if not _mps_available():
            raise UserError(
                "--device mps was asked for but Apple MPS is not available; use --device cpu or auto"
            )
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def autocast(device: torch.device, enabled: bool = True):
    """fp16 autocast on CUDA/MPS; nothing on CPU (bf16 convolutions are slower than fp32 on most CPUs)."""
    if not enabled or device.type == "cpu":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16)
