"""Shared fixtures: the real datasets (skipped when absent) and tiny untrained model bundles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _shared_data_root() -> Path:
    env = os.environ.get("SASSR_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder (nnU-Net raw datasets); skips the test when it is absent."""
    root = _shared_data_root()
    if not root.is_dir():
        pytest.skip(
            f"real data not found at {root} (set SASSR_SHARED_DATA to the folder holding Dataset00x_*)"
        )
    return root


def make_tiny_bundle(folder: Path, spatial_dims: int, image_sr: bool = True) -> Path:
    """An untrained, tiny-width bundle: exercises every code path in well under a second per image."""
    import torch

    from SASSRSegmentLib.model.bundle import save_bundle
    from SASSRSegmentLib.model.network import SASRConfig, SASRNet

    torch.manual_seed(0)
    net = SASRNet(SASRConfig(spatial_dims=spatial_dims, features=(4, 8), dilations=(1, 2), image_sr=image_sr))
    prep = {
        "spatial_dims": spatial_dims,
        "scale": 2,
        "orientation": "LPS" if spatial_dims == 3 else None,
        "channels": ["image"],
        "lr_spacing": [2.0] * 3 if spatial_dims == 3 else None,
        "lr_longer_side": None if spatial_dims == 3 else 24,
        "normalization": {"kind": "mri"} if spatial_dims == 3 else {"kind": "uint8"},
        "patch_size_lr": [8] * spatial_dims,
        "labels": [1],
    }
    card = {"name": f"tiny-{spatial_dims}d", "preprocessing": prep, "threshold": 0.5}
    return save_bundle(folder, net, card)


@pytest.fixture(scope="session")
def tiny_bundle_3d(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny-3d", 3)


@pytest.fixture(scope="session")
def tiny_bundle_2d(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny-2d", 2)
