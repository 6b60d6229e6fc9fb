"""Inference speed and memory of `segment` for the default 3D and 2D models, beside plain U-Nets.

    python benchmarks/inference.py [--device cpu|cuda] [--only 3d|2d] [--rows ROW...] [--large]
    python benchmarks/inference.py --whole | --batch-2d [FOLDER]

Each row runs in its own process (peak RSS is per process) through `pipeline.segment_image`, the code
the `segment` command runs, from the LR image in memory to the thresholded HR mask. Rows:
  SASR              the default network (bundled weights when installed, else freshly initialised:
                    speed and memory do not depend on the weights)
  SASR + TTA        the same with flip test-time augmentation (2^d passes)
  U-Net, LR input   the `baseline` ablation (no image-SR branch, no SDC, no learned upsampling), same
                    widths: LR in, HR mask by interpolating the logits
  U-Net on HR       the same plain U-Net run on the HR-interpolated image (what a user would otherwise
                    do: upsample the image, then segment at HR); its HR logits are pooled back by `scale`
                    so that its output grid and the work after it match the other rows.
--large adds the issue's 512x512x300 LR volume (SASR only), tiled from the shipped brain sample.

--whole times whole processes on the shipped 2 mm brain sample, file in and mask file out, beside the
peer a user would otherwise run (benchmarks/monai_peer.py: MONAI's U-Net on the HR-interpolated image,
pinned as its docstring says), and the ratio to it:
  segment                  `python -m SASSRSegmentLib segment SAMPLE -o OUT.seg.nrrd` (bundled model)
  segment, dense mask      the same at the threshold that makes half the HR volume lesion (read off
                           the model's own probabilities of the sample, so the row stays dense whatever
                           the model): the cost of everything after the network must not grow with it
  segment, 24^3 crop       the same on a 24^3 crop of the sample: the fixed cost (start-up, model
                           loading, writing) every call pays
  MONAI U-Net peer         `python benchmarks/monai_peer.py SAMPLE OUT.seg.nrrd`
Each runs REPEATS times, interleaved; the table gives medians. Nothing else may run on the machine.

--batch-2d FOLDER times `segment` on a folder of BATCH_2D ultrasound images (the first of FOLDER's, by
name; default ../shared/data/Dataset002_BUSI/imagesTr, not shipped) and on one of them, whole processes:
seconds per image in the batch, and per image beyond the first (the batch's cost without the start-up).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {
    "3d": REPO / "configs" / "brain-tumour-flair-3d.json",
    "2d": REPO / "configs" / "breast-ultrasound-2d.json",
}
ROWS = ("SASR", "SASR + TTA", "U-Net, LR input", "U-Net on HR")
REPEATS = 5
PEER = "MONAI U-Net peer"


def _card(dims: str) -> tuple[dict, str]:
    """(card, where the weights come from) for the default model of `dims`."""
    from SASSRSegmentLib.model.bundle import bundled_models, read_card

    config = json.loads(CONFIGS[dims].read_text())
    models = bundled_models()
    if config["name"] in models:
        return read_card(models[config["name"]]), f"bundled {config['name']}"
    spatial_dims = 3 if dims == "3d" else 2
    prep = {
        "spatial_dims": spatial_dims,
        "scale": config["scale"],
        "channels": ["image"],
        "lr_spacing": config.get("lr_spacing"),
        "lr_longer_side": config.get("lr_longer_side"),
        "normalization": config["normalization"],
        "patch_size_lr": config["patch_size_lr"],
        "labels": [1],
    }
    network = {"spatial_dims": spatial_dims, "scale": config["scale"], "features": config["features"]}
    return {
        "name": config["name"],
        "preprocessing": prep,
        "network": network,
        "threshold": 0.5,
    }, "freshly initialised"


SAMPLE = REPO / "SASSRSegment" / "Resources" / "Samples" / "brats_2013_pat0005_1_flair_2mm.nrrd"


def tiled_sample(size: tuple[int, int, int]):
    """The brain sample tiled to `size` (x, y, z) at 2 mm: real anatomy and lesions, so post-processing
    sees a plausible mask (uniform noise would make the brain model's mask noise, a case no lesion
    model meets)."""
    import SimpleITK as sitk

    tile = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE)))
    shape = size[::-1]
    reps = [math.ceil(n / t) for n, t in zip(shape, tile.shape)]
    image = sitk.GetImageFromArray(np.tile(tile, reps)[: shape[0], : shape[1], : shape[2]].copy())
    image.SetSpacing((2.0, 2.0, 2.0))
    return image


def _input(dims: str, large: bool):
    """The LR image: the shipped 2 mm brain sample (120x120x77) or a synthetic one; a 500x400 8-bit image."""
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    if dims == "2d":
        image = sitk.GetImageFromArray(rng.integers(0, 255, (400, 500)).astype(np.uint8))
        image.SetSpacing((0.1, 0.1))
        return image, "500x400 px 8-bit (synthetic)"
    if large:
        return tiled_sample((512, 512, 300)), "512x512x300 at 2 mm (sample tiled)"
    if SAMPLE.is_file():
        return sitk.ReadImage(str(SAMPLE)), "120x120x77 at 2 mm (brain sample)"
    image = sitk.GetImageFromArray((rng.random((78, 120, 120), dtype=np.float32) * 500).astype(np.int16))
    image.SetSpacing((2.0, 2.0, 2.0))
    return image, "120x120x78 at 2 mm (synthetic)"


class UNetOnHR(torch.nn.Module):
    """A plain scale-2 U-Net applied to HR input; its HR x scale logits are average-pooled back to HR."""

    def __init__(self, net: torch.nn.Module, scale: int):
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = F.avg_pool3d if x.dim() == 5 else F.avg_pool2d
        return pool(self.net(x), self.scale)


def _as_hr_run(image, card: dict, net: torch.nn.Module):
    """The U-Net-on-HR row: the image interpolated to its HR grid, a card whose 'LR' is that HR grid."""
    from SASSRSegmentLib.io import geometry
    from SASSRSegmentLib.io.geometry import Grid

    scale = int(card["preprocessing"]["scale"])
    image = geometry.resample(image, geometry.hr_grid(Grid.from_image(image), scale), "linear", False)
    card = json.loads(json.dumps(card))
    prep = card["preprocessing"]
    if prep.get("lr_spacing"):
        prep["lr_spacing"] = [s / scale for s in prep["lr_spacing"]]
    else:
        prep["lr_longer_side"] *= scale
    prep["patch_size_lr"] = [w * scale for w in prep["patch_size_lr"]]
    prep["scale"] = 1
    return image, card, UNetOnHR(net, scale)


def run_one(dims: str, row: str, device_name: str, large: bool) -> dict:
    from SASSRSegmentLib.inference.pipeline import segment_image
    from SASSRSegmentLib.model.bundle import bundled_models, load_bundle
    from SASSRSegmentLib.model.network import SASRConfig, SASRNet
    from SASSRSegmentLib.runtime.devices import select_device

    device = select_device(device_name)
    card, source = _card(dims)
    image, what = _input(dims, large)
    if row.startswith("SASR") and card["name"] in bundled_models():
        card, net = load_bundle(card["name"], device, for_prediction=True)  # as segment runs it
    else:
        switches = {} if row.startswith("SASR") else dict(image_sr=False, sdc=False, learned_upsampling=False)
        net = SASRNet(SASRConfig.from_dict({**card["network"], **switches})).eval().to(device)
        source = "freshly initialised"
    if row == "U-Net on HR":
        image, card, net = _as_hr_run(image, card, net)
    batch = 1 if device.type == "cpu" else 4
    start = time.perf_counter()
    mask, _ = segment_image(
        image, net, card, device, tta=row == "SASR + TTA", batch_size=batch, probabilities="none"
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    voxels = math.prod(mask.GetSize())
    return {
        "dims": dims,
        "row": row,
        "input": what,
        "output": "x".join(map(str, mask.GetSize())),
        "weights": source,
        "wall_s": wall,
        "peak_rss_gib": peak_kib / 2**20,
        "hr_voxels_per_s": voxels / wall,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


FIXED = "segment, 24^3 crop (fixed cost)"
OUTPUTS = {"segment": "segment", "segment, dense mask": "dense", FIXED: "fixed", PEER: "peer"}


DENSE_SHARE = 0.5  # of the HR volume lesion in the dense-mask row, as the issue sets it


def dense_threshold(segment: list[str], sample: Path, folder: Path) -> float:
    """The probability threshold at which DENSE_SHARE of the sample's HR volume is lesion."""
    import SimpleITK as sitk

    probabilities = folder / "probabilities.nrrd"
    command = [
        *segment,
        str(sample),
        "-o",
        str(folder / "untimed.seg.nrrd"),
        "--probabilities",
        str(probabilities),
    ]
    time_process(command)
    values = sitk.GetArrayFromImage(sitk.ReadImage(str(probabilities))).ravel()
    return float(np.quantile(values, 1 - DENSE_SHARE))


def whole_process_commands(sample: Path, folder: Path) -> dict[str, list[str]]:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(sample))
    corner = [(n - 24) // 2 for n in image.GetSize()]
    crop = folder / "crop24.nrrd"
    sitk.WriteImage(sitk.RegionOfInterest(image, [24, 24, 24], corner), str(crop))
    segment = [sys.executable, "-m", "SASSRSegmentLib", "segment", "--quiet", "--overwrite"]
    dense = dense_threshold(segment, sample, folder)
    return {
        "segment": [*segment, str(sample), "-o", str(folder / "segment.seg.nrrd")],
        "segment, dense mask": [
            *segment,
            str(sample),
            "-o",
            str(folder / "dense.seg.nrrd"),
            "--threshold",
            f"{dense:.3g}",
        ],
        # Start-up, model loading and writing: what every call pays whatever its input.
        FIXED: [*segment, str(crop), "-o", str(folder / "fixed.seg.nrrd")],
        PEER: [
            sys.executable,
            str(REPO / "benchmarks" / "monai_peer.py"),
            str(sample),
            str(folder / "peer.seg.nrrd"),
        ],
    }


def time_process(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of one process run to its end."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "SASSRSegment"), OMP_NUM_THREADS="2")
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 2**20


def whole_process(folder: Path) -> list[dict]:
    """Median wall time and peak RSS of each whole-process row, and its ratio to the peer."""
    import SimpleITK as sitk

    from SASSRSegmentLib.commands.segment import SAMPLE_NAME, samples_dir

    commands = whole_process_commands(samples_dir() / SAMPLE_NAME, folder)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(REPEATS):
        for name, command in commands.items():
            runs[name].append(time_process(command))
            print(f"  {name}: {runs[name][-1][0]:.1f} s", file=sys.stderr, flush=True)
    peer = float(np.median([w for w, _ in runs[PEER]]))
    rows = []
    for name, done in runs.items():
        output = folder / OUTPUTS[name]
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(output.with_suffix(".seg.nrrd"))))
        wall = float(np.median([w for w, _ in done]))
        rows.append(
            {
                "row": name,
                "wall_s": wall,
                "peak_rss_gib": float(np.median([r for _, r in done])),
                "ratio_to_peer": wall / peer,
                "lesion_share": float(mask.mean()),
            }
        )
    return rows


BATCH_2D = 50


def batch_2d(source: Path, folder: Path) -> dict:
    """Median whole-process seconds of `segment` on BATCH_2D images of `source` and on one."""
    import shutil

    images = sorted(p for p in source.iterdir() if p.suffix == ".png")[:BATCH_2D]
    if len(images) < BATCH_2D:
        raise SystemExit(f"--batch-2d: {source} holds {len(images)} PNG images, {BATCH_2D} are needed")
    batch, single = folder / "batch", folder / "single"
    batch.mkdir()
    single.mkdir()
    for image in images:
        shutil.copy(image, batch / image.name)
    shutil.copy(images[0], single / images[0].name)
    segment = [sys.executable, "-m", "SASSRSegmentLib", "segment", "--quiet", "--overwrite"]
    walls: dict[str, list[float]] = {"batch": [], "single": []}
    for _ in range(REPEATS):
        for name, inputs in (("batch", batch), ("single", single)):
            walls[name].append(time_process([*segment, str(inputs), "-o", str(folder / f"{name}-out")])[0])
    many, one = (float(np.median(walls[k])) for k in ("batch", "single"))
    return {
        "images": BATCH_2D,
        "batch_wall_s": many,
        "single_wall_s": one,
        "s_per_image": many / BATCH_2D,
        "s_per_further_image": (many - one) / (BATCH_2D - 1),
    }


def print_whole_process(rows: list[dict]) -> None:
    header = f"{'whole process (shipped 2 mm brain sample)':<44} {'wall s':>8} {'peak RSS GiB':>13} {'x peer':>7} {'lesion %':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['row']:<44} {r['wall_s']:>8.2f} {r['peak_rss_gib']:>13.2f} {r['ratio_to_peer']:>7.2f} "
            f"{100 * r['lesion_share']:>9.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=("3d", "2d"))
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="which models to run")
    parser.add_argument("--large", action="store_true", help="also the 512x512x300 LR volume (SASR, 3D)")
    parser.add_argument(
        "--whole", action="store_true", help="only the whole-process rows beside the MONAI peer (3D sample)"
    )
    parser.add_argument(
        "--batch-2d",
        type=Path,
        nargs="?",
        const=REPO.parent / "shared" / "data" / "Dataset002_BUSI" / "imagesTr",
        metavar="FOLDER",
        help="only the 2D batch-folder row, on the first ultrasound PNGs of FOLDER",
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--one", nargs=2, metavar=("DIMS", "ROW"), help=argparse.SUPPRESS)
    parser.add_argument("--one-large", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.device, args.one_large)))
        return
    if args.batch_2d:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            row = batch_2d(args.batch_2d, Path(tmp))
        print(
            f"segment, folder of {row['images']} ultrasound images: {row['batch_wall_s']:.2f} s, "
            f"{row['s_per_image']:.3f} s per image, {row['s_per_further_image']:.3f} s per image beyond "
            f"the first (one image alone: {row['single_wall_s']:.2f} s)"
        )
        if args.json:
            args.json.write_text(json.dumps(row, indent=2) + "\n")
        return
    if args.whole:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            rows = whole_process(Path(tmp))
        print_whole_process(rows)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
        return
    jobs = [(d, r, False) for d in ("3d", "2d") if args.only in (None, d) for r in args.rows]
    if args.large:
        jobs.append(("3d", "SASR", True))
    results = []
    for dims, row, large in jobs:
        command = [sys.executable, __file__, "--device", args.device, "--one", dims, row]
        done = subprocess.run(
            command + (["--one-large"] if large else []), capture_output=True, text=True, env=os.environ
        )
        if done.returncode != 0:
            print(f"{dims} {row}: failed\n{done.stderr}", file=sys.stderr)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"  done {dims} {row}: {r['wall_s']:.1f} s", file=sys.stderr, flush=True)
    print(f"device {args.device}, torch threads {results[0]['threads'] if results else '?'}")
    header = f"{'model':<16} {'input':<36} {'HR output':<14} {'wall s':>8} {'peak RSS GiB':>13} {'HR Mvox/s':>10}  weights"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['row']:<16} {r['input']:<36} {r['output']:<14} {r['wall_s']:>8.2f} {r['peak_rss_gib']:>13.2f} "
            f"{r['hr_voxels_per_s'] / 1e6:>10.2f}  {r['weights']}"
        )


if __name__ == "__main__":
    main()
