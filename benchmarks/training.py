"""Training throughput of the default 2D and 3D configurations on this machine.

Network steps/s and LR voxels/s (forward, loss, backward, AdamW) of the full network and of the
`baseline` ablation (plain U-Net) beside it, for fp32 / bf16 autocast (/ fp16 on CUDA) with channels-last
off and on, on synthetic patches of the configs' shapes; and patch loading alone (batches/s, with the
config's LR synthesis) from a real preprocessed cache, in the training process versus DataLoader workers.
Wall-clock speed on a shared machine says what the neighbours did too, so each row also gives the
process's CPU seconds per step.

    python benchmarks/training.py                      # every config, CPU or the GPU if there is one
    python benchmarks/training.py --only 3d-robust --amp bf16 --skip-data
    python benchmarks/training.py --cache-3d CACHE     # time loading from an existing cache (no SimpleITK needed)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "SASSRSegment"))

from SASSRSegmentLib.data.sampling import Augmentation, PatchSampler, batches, lr_from_hr  # noqa: E402
from SASSRSegmentLib.runtime.devices import select_device  # noqa: E402
from SASSRSegmentLib.training import build, config, runtime  # noqa: E402

CONFIGS = {
    "2d": (REPO / "configs" / "breast-ultrasound-2d.json", "Dataset002_BUSI", 48),
    "3d": (REPO / "configs" / "brain-tumour-flair-3d.json", "Dataset001_BraTSFLAIR", 4),
    "3d-robust": (REPO / "configs" / "brain-tumour-flair-3d-robust.json", "Dataset001_BraTSFLAIR", 4),
    # The shipped brain network: the robust configuration with batch normalisation.
    "3d-robust-bn": (REPO / "configs" / "brain-tumour-flair-3d-robust-bn.json", "Dataset001_BraTSFLAIR", 4),
    # The cheaper full network (docs/DESIGN.md, training cost): reduce before upsampling, squeezed SDC
    # branches, a half-width image-SR decoder, 4 HR features per voxel.
    "3d-fast": (REPO / "configs" / "brain-tumour-flair-3d-fast.json", "Dataset001_BraTSFLAIR", 4),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_speed(
    cfg, dims: int, device, amp: str, channels_last: bool, steps: int, ablation: str = "full"
) -> tuple[float, float]:
    """(optimiser steps per second, CPU seconds per step) on random patches of the config's shape."""
    prep = {"spatial_dims": dims, "scale": cfg.scale, "channels": ["x"]}
    patch = cfg.patch_size(dims, cfg.lr_longer_side)
    torch.manual_seed(0)
    net = build.build_network(cfg, prep, ablation)
    loss_fn = build.build_loss(cfg, ablation)
    fmt = runtime.memory_format(dims, channels_last)
    net.to(device=device, memory_format=fmt).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    hr = torch.rand(cfg.batch_size, 1, *[p * cfg.scale for p in patch], device=device)
    mask = (hr > 0.7).float()

    def one_step():
        lr = lr_from_hr(hr, cfg.scale).contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = loss_fn(net(lr), mask, hr)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    one_step()  # warm-up: allocator, cuDNN algorithm choice
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        one_step()
    sync(device)
    return steps / (time.perf_counter() - start), (time.process_time() - cpu) / steps


def build_cache(key: str, cfg, folder: Path) -> Path | None:
    """A small real cache (first cases of the shared dataset), or None when data or SimpleITK is missing."""
    _, dataset_name, cases = CONFIGS[key]
    shared = Path(os.environ.get("SASSR_SHARED_DATA", REPO.parent / "shared" / "data"))
    source = shared / dataset_name
    if not source.is_dir():
        print(f"  ({key}: no {source}, data loading not timed)")
        return None
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        print(f"  ({key}: SimpleITK missing, pass --cache-{key} to time loading)")
        return None
    from SASSRSegmentLib.data.cache import build_cache as preprocess
    from SASSRSegmentLib.data.cache import make_prep
    from SASSRSegmentLib.data.datasets import open_dataset

    dataset = open_dataset(source)
    dataset.cases = dataset.cases[:cases]
    start = time.perf_counter()
    preprocess(dataset, make_prep(cfg, dataset), folder, cfg.crop_margin_lr, workers=2)
    print(f"  {key}: preprocessed {cases} cases in {time.perf_counter() - start:.1f} s (2 processes)")
    return folder


def loading_speed(cfg, cache_dir: Path, workers: int, batches_to_time: int) -> float:
    from SASSRSegmentLib.data.cache import open_cache

    cache = open_cache(cache_dir)
    dims = cache.prep["spatial_dims"]
    patch = [p * cache.prep["scale"] for p in cfg.patch_size(dims, cache.prep.get("lr_longer_side"))]
    aug = Augmentation(
        flip_axes=list(range(dims)) if cfg.flip_axes is None else cfg.flip_axes,
        rot90=cfg.rot90,
        p_affine=cfg.p_affine,
        affine_degrees=cfg.affine_degrees,
    )
    degradation = build.degradation_for(cache.prep, cfg)
    sampler = PatchSampler(cache, cache.names, patch, cfg.p_fg, augmentation=aug, degradation=degradation)
    stream = batches(sampler, cfg.batch_size, workers, seed=0)
    for _ in range(1 + 4 * workers):  # worker start-up and the prefetch queue are not throughput
        next(stream)
    start = time.perf_counter()
    for _ in range(batches_to_time):
        next(stream)
    speed = batches_to_time / (time.perf_counter() - start)
    del stream
    return speed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--steps", type=int, default=2, help="timed optimiser steps per setting (after one warm-up)"
    )
    parser.add_argument("--batches", type=int, default=20, help="timed batches for data loading")
    parser.add_argument("--only", choices=sorted(CONFIGS))
    parser.add_argument(
        "--ablations", default="full,baseline", help="comma-separated --ablation names to time (network)"
    )
    parser.add_argument("--amp", choices=("fp32", "bf16", "fp16"), help="time only this precision")
    parser.add_argument("--skip-network", action="store_true")
    parser.add_argument("--skip-data", action="store_true")
    parser.add_argument("--cache-2d", type=Path)
    parser.add_argument("--cache-3d", type=Path)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    device = select_device(args.device)
    torch.backends.cudnn.benchmark = True  # as train does
    print(f"device {runtime.hardware(device)}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = []
    amps = [args.amp] if args.amp else ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    for key in CONFIGS:
        if args.only and key != args.only:
            continue
        cfg = config.load_config(CONFIGS[key][0])
        dims = int(key[0])
        patch = cfg.patch_size(dims, cfg.lr_longer_side)
        lr_voxels = cfg.batch_size * math.prod(patch)
        print(
            f"{key}: batch {cfg.batch_size}, LR patch {patch} -> HR x{cfg.scale}, features {cfg.features}, "
            f"HR head {cfg.hr_head}, {cfg.norm} norm, LR synthesis {cfg.degradation}"
        )
        if not args.skip_network:
            for ablation in args.ablations.split(","):
                for amp in amps:
                    row = {"config": key, "ablation": ablation, "amp": amp}
                    for cl in (False, True):
                        layout = "channels_last" if cl else "contiguous"
                        speed, cpu = step_speed(cfg, dims, device, amp, cl, args.steps, ablation)
                        row[layout] = round(speed, 3)
                        row[f"{layout}_lr_voxels_per_s"] = round(speed * lr_voxels)
                        row[f"{layout}_cpu_s_per_step"] = round(cpu, 2)
                    print(
                        f"  {ablation:9s} {amp:5s} steps/s (LR voxels/s, CPU s/step): "
                        + "   ".join(
                            f"{layout} {row[layout]:7.3f} ({row[layout + '_lr_voxels_per_s']:,}, "
                            f"{row[layout + '_cpu_s_per_step']})"
                            for layout in ("contiguous", "channels_last")
                        )
                    )
                    results.append(row)
        if not args.skip_data:
            with tempfile.TemporaryDirectory() as tmp:
                # Both 3D configs preprocess alike: --cache-3d serves them both.
                cache_dir = getattr(args, f"cache_{key[:2]}") or build_cache(key, cfg, Path(tmp) / "cache")
                if cache_dir is not None:
                    row = {"config": key, "loading": True}
                    for workers in (0, 2):
                        row[f"workers_{workers}"] = round(
                            loading_speed(cfg, cache_dir, workers, args.batches), 2
                        )
                    print(
                        f"  loading batches/s: in-process {row['workers_0']:8.2f}   2 workers {row['workers_2']:8.2f}"
                    )
                    results.append(row)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"device": runtime.hardware(device), "torch": torch.__version__, "results": results}, indent=1
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
