"""Where and how a training run executes: processes (DDP), device, precision, memory layout, hardware text."""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..runtime.errors import UserError
from .config import TrainConfig


@dataclass
class Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(device_name: str) -> Runtime:
    from ..runtime.devices import select_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Runtime(0, 1, 0, select_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Rank 0 may preprocess the dataset while the others wait: allow for it.
    dist.init_process_group(backend, timeout=timedelta(hours=3))
    return Runtime(rank, world, local_rank, device)


def amp_settings(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed)."""
    mode = cfg.amp
    if mode == "auto":
        if device.type == "cuda":
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            # CPUs with bf16 instructions ran the default configs 1.5-1.6x faster in bf16
            # (benchmarks/training.py); elsewhere bf16 is emulated and slower.
            from ..runtime.devices import cpu_has_native_bf16

            mode = "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "off"
    if mode == "off":
        return None, False
    if mode == "fp16":
        if device.type != "cuda":
            raise UserError('amp "fp16" needs a CUDA GPU; use "bf16" or "off" on this device')
        return torch.float16, True
    return torch.bfloat16, False


def use_channels_last(cfg: TrainConfig, device: torch.device, spatial_dims: int) -> bool:
    if cfg.channels_last == "auto":
        # Measured (benchmarks/training.py): +10% for 3D on CPU; no gain in 2D nor on the GPU,
        # where these networks are bound by kernel launches rather than memory layout.
        return device.type == "cpu" and spatial_dims == 3
    return cfg.channels_last == "on"


def memory_format(spatial_dims: int, channels_last: bool):
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def hardware(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    text = f"{cpu}, {os.cpu_count()} CPU cores"
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text
