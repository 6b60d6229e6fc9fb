"""Model bundles: `model.pt` (a state_dict, loadable with weights_only=True) + `model.json` (the card).

Listing bundled models needs only the standard library, so the Slicer module can show them before
torch is installed; loading imports torch.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from ..io.files import atomic_write_bytes, read_json, sha256_file
from ..runtime.errors import UserError

MODELS_DIR = Path(__file__).resolve().parents[2] / "Resources" / "Models"
CARD_FORMAT_VERSION = 1


def read_card(folder: Path) -> dict:
    path = Path(folder) / "model.json"
    card = read_json(
        path,
        lambda exc: f"cannot read model card {path}: {exc}",
        missing=f"{folder} is not a model bundle: model.json is missing",
    )
    for key in ("network", "preprocessing"):
        if key not in card:
            raise UserError(f"model card {path} has no '{key}' section; re-export the bundle with `train`")
    return card


def validation_dice(card: dict) -> float | None:
    """The card's validation Dice: what `evaluate` measured if recorded, else training's own validation."""
    evaluated = ((card.get("evaluation") or {}).get("summary") or {}).get("mean", {}).get("dice")
    return evaluated if evaluated is not None else (card.get("validation") or {}).get("dice_mean")


def robustness_dice(card: dict) -> dict[str, float]:
    """Mean validation Dice per way of making the LR input (the card's `evaluate --lr-input all`
    table; empty without one)."""
    inputs = (card.get("robustness") or {}).get("inputs") or {}
    return {
        g: row["mean_dice"] for g, row in inputs.items() if isinstance(row.get("mean_dice"), (int, float))
    }


def bundled_models(models_dir: Path = MODELS_DIR) -> dict[str, Path]:
    """Bundled model name -> folder, for folders holding a model.json."""
    if not models_dir.is_dir():
        return {}
    return {p.name: p for p in sorted(models_dir.iterdir()) if (p / "model.json").is_file()}


def resolve_model(
    name_or_dir: str | None, spatial_dims: int | None = None, models_dir: Path = MODELS_DIR
) -> Path:
    """A bundle folder from a bundled model name, a folder path, or (None) the default for `spatial_dims`."""
    models = bundled_models(models_dir)
    if name_or_dir is None:
        for folder in models.values():
            if spatial_dims is None or read_card(folder)["preprocessing"].get("spatial_dims") == spatial_dims:
                return folder
        raise UserError(
            f"no bundled {spatial_dims or ''}{'D ' if spatial_dims else ''}model is installed; "
            "pass --model with a bundle folder written by `train`"
        )
    if name_or_dir in models:
        return models[name_or_dir]
    folder = Path(name_or_dir).expanduser()
    if folder.is_dir():
        return folder
    names = ", ".join(models) or "none installed"
    raise UserError(f"unknown model {name_or_dir!r}: not a bundled model ({names}) nor a bundle folder")


def save_bundle(folder: Path, net, card: dict, half: bool = True) -> Path:
    """Write model.pt and model.json atomically; the card gets the network config and weights checksum."""
    import io

    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu()
        for k, v in net.state_dict().items()
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(folder / "model.pt", buffer.getvalue())
    card = dict(card)
    card["format_version"] = CARD_FORMAT_VERSION
    card["network"] = net.config.to_dict()
    card["weights_sha256"] = sha256_file(folder / "model.pt")
    atomic_write_bytes(folder / "model.json", (json.dumps(card, indent=2) + "\n").encode())
    return folder


def weights_state(folder: Path, card: dict) -> str:
    """ "ok", "missing", "damaged" (not the card's checksum) or "unchecked" (the card has none: a bundle
    put together by hand) for a bundle's model.pt."""
    weights = folder / "model.pt"
    if not weights.is_file():
        return "missing"
    expected = card.get("weights_sha256")
    if not expected:
        return "unchecked"
    return "damaged" if sha256_file(weights) != expected else "ok"


def load_bundle(
    name_or_dir: str | Path | None, device=None, spatial_dims: int | None = None, for_prediction: bool = False
):
    """(card, network in eval mode on `device`). Checks the weights against the card's checksum.
    `for_prediction`: batch norm folded into the convolutions and, for 3D on a CPU, channels-last
    weights (faster; the network can then only predict, not be trained or saved)."""
    import torch

    from .network import SASRConfig, SASRNet

    folder = resolve_model(None if name_or_dir is None else str(name_or_dir), spatial_dims)
    card = read_card(folder)
    weights = folder / "model.pt"
    found = weights_state(folder, card)
    if found == "missing":
        raise UserError(f"model weights {weights} are missing; reinstall the model or re-run `train`")
    if found == "damaged":
        raise UserError(f"model weights {weights} are corrupted (checksum mismatch); reinstall the model")
    try:
        net = SASRNet(SASRConfig.from_dict(card["network"]))
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            # A training checkpoint copied in (weights inside a dictionary of other things).
            raise ValueError(
                "it holds no network weights (a training checkpoint? use the bundle `train` wrote)"
            )
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except (RuntimeError, ValueError, TypeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        # Without a checksum in the card (a bundle put together by hand) a damaged file gets this far.
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot load model weights {weights}: {reason}") from None
    net.eval()
    if for_prediction:
        from .folding import fold_batch_norm

        fold_batch_norm(net)
    if device is not None:
        net.to(device)
    if for_prediction and net.config.spatial_dims == 3 and next(net.parameters()).device.type == "cpu":
        # oneDNN's channels-last kernels: a convolution's output takes its input's or its weight's
        # layout, and a one-channel input has none, so without this the whole network ran
        # channels-first (the 2 mm sample's forward pass 0.57 s instead of 0.74 s; the cost was in
        # the 1x1 convolutions and the reshapes around them).
        net.to(memory_format=torch.channels_last_3d)
    return card, net
