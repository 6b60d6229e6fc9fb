"""The `devices` command: the PyTorch this Python has, the GPUs it sees, and what `--device auto` picks.

The Slicer panel runs it in a separate process instead of importing torch itself: the import freezes the
application for seconds, and querying a CUDA GPU would keep a CUDA context (hundreds of MB of the GPU's
memory) in Slicer's process for the rest of the session.
"""

from __future__ import annotations

import argparse
import importlib.util
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def detect() -> dict:
    """{"torch": version or None, "cuda": GPU name or None, "mps": bool, "auto": device, "error": str or None}."""
    found = {"torch": None, "cuda": None, "mps": False, "auto": "cpu", "error": None}
    if importlib.util.find_spec("torch") is None:
        return found
    try:
        import torch
    except Exception as exc:  # a broken install raises anything from OSError to RuntimeError
        found["error"] = f"{type(exc).__name__}: {exc}"
        return found
    from ..runtime.devices import select_device

    found["torch"] = torch.__version__
    if torch.cuda.is_available():
        found["cuda"] = torch.cuda.get_device_name(0)
    mps = getattr(torch.backends, "mps", None)
    found["mps"] = bool(mps is not None and mps.is_available())
    found["auto"] = select_device("auto").type
    return found


def run(args: argparse.Namespace) -> int:
    found = detect()
    if args.json:
        print(json.dumps(found))
        return 0
    if found["error"]:
        print(f"PyTorch failed to load: {found['error']}")
    elif not found["torch"]:
        print("PyTorch is not installed in this Python")
    else:
        gpus = [f"CUDA {found['cuda']}"] if found["cuda"] else []
        gpus += ["Apple MPS"] if found["mps"] else []
        print(
            f"PyTorch {found['torch']}; GPU: {', '.join(gpus) or 'none'}; --device auto uses {found['auto']}"
        )
    return 0
