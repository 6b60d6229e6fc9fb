"""What made an output: written beside the lesion table and into the mask file's header.

Only the input's file name is kept, never its folder: full paths often carry patient names.
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone

from .. import __version__
from ..io.geometry import Grid
from . import measure

METADATA_KEY = "SASSRSegment_provenance"


def record(
    card: dict, args: argparse.Namespace, threshold: float, input_name: str, grid: Grid, warnings: list[str]
) -> dict:
    """The provenance of one input's outputs (JSON-able)."""
    return {
        "software": f"SASSRSegment {__version__}",
        "model": card.get("name", str(args.model)),
        "model_weights_sha256": card.get("weights_sha256", ""),
        "threshold": threshold,
        "tta": bool(args.tta),
        "fully_connected": not args.face_connected,
        "roi_ras_mm": list(args.roi) if args.roi else None,
        "input": input_name,
        "spatial_dims": 3 if grid.dims == 3 and grid.size[2] > 1 else 2,
        "mask_spacing_mm": list(grid.spacing),
        "measurement_plane": measure.plane_description(grid),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "warnings": list(warnings),
    }


def shared(records: list[dict]) -> dict:
    """The fields every record of a batch agrees on; those they do not (e.g. a folder of 2D and 3D
    images, segmented by two models) and each input's warnings, per input."""
    keys = [k for k in records[0] if k not in ("input", "warnings", "created_utc")]
    common = {k: records[0][k] for k in keys if all(r.get(k) == records[0][k] for r in records)}
    differing = [k for k in keys if k not in common]
    out = {**common, "created_utc": records[-1]["created_utc"]}
    if differing:
        out["per_input"] = {r["input"]: {k: r.get(k) for k in differing} for r in records}
    out["warnings"] = {r["input"]: r["warnings"] for r in records if r["warnings"]}
    return out
