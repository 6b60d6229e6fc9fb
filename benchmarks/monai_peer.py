"""What a user would otherwise run: MONAI's U-Net on the image linearly interpolated to the HR grid.

    python benchmarks/monai_peer.py INPUT OUTPUT [--threshold 0.5] [--scale 2] [--weights W.pt]

The peer of `segment` in `benchmarks/inference.py`, pinned as the speed issue states: MONAI `UNet`
(channels 16, 32, 64, 128, 256; strides 2; 2 residual units), fp32, `sliding_window_inference` with
96^3 windows (96^2 in 2D), overlap 0.25, sw_batch_size 1, 2 threads; the input is z-scored and
interpolated linearly onto the same HR grid `segment` writes (`io.geometry.hr_grid`), and the mask is
written with the same writer, format and compression. Without --weights the network is freshly
initialised: its speed does not depend on the weights. MONAI is a benchmark dependency only
(`pip install -e .[bench]`), never one of the extension's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "SASSRSegment"))

from SASSRSegmentLib.io import geometry, imageio  # noqa: E402
from SASSRSegmentLib.io.geometry import Grid  # noqa: E402

CHANNELS = (16, 32, 64, 128, 256)
WINDOW = 96
OVERLAP = 0.25


def peer_network(spatial_dims: int, channels: tuple[int, ...] = CHANNELS) -> torch.nn.Module:
    """MONAI's UNet, one channel in and out, strides 2, 2 residual units."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=1,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=2,
    )


def segment(image: sitk.Image, net: torch.nn.Module, scale: int, threshold: float) -> sitk.Image:
    from monai.inferers import sliding_window_inference

    hr = geometry.hr_grid(Grid.from_image(image), scale)
    upsampled = sitk.Resample(
        sitk.Cast(image, sitk.sitkFloat32), hr.reference_image(), sitk.Transform(), sitk.sitkLinear
    )
    array = sitk.GetArrayViewFromImage(upsampled)
    x = torch.from_numpy(((array - array.mean()) / (array.std() + 1e-6)).astype(np.float32))[None, None]
    dims = x.dim() - 2
    with torch.inference_mode():
        logits = sliding_window_inference(x, (WINDOW,) * dims, 1, net, overlap=OVERLAP, mode="gaussian")
    mask = (torch.sigmoid(logits[0, 0]) >= threshold).numpy().astype(np.uint8)
    return hr.image_from_array(mask)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--weights", type=Path, help="a state_dict for the peer network")
    args = parser.parse_args()
    torch.set_num_threads(2)
    image = imageio.read_image(args.input)
    net = peer_network(image.GetDimension()).eval()
    if args.weights:
        net.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    imageio.write_image(segment(image, net, args.scale, args.threshold), args.output, overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
