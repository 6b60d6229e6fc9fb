"""The accuracy peer: MONAI's U-Net trained on the same data, patches and LR synthesis for a CPU budget,
then scored with the robustness table that `evaluate --lr-input all` gives the project's models.

    python benchmarks/monai_peer_train.py train --cache CACHE --config configs/brain-tumour-flair-3d-robust.json \
        --output runs/monai-peer --minutes 120 [--resume]
    python benchmarks/monai_peer_train.py evaluate --output runs/monai-peer \
        --dataset ../shared/data/Dataset001_BraTSFLAIR [--lr-input all] [--json OUT]

The peer is the one the model issue names: MONAI `UNet` (channels 16, 32, 64, 128; strides 2; 2
residual units) on the LR input, its logits upsampled x2 (trilinear) to the HR grid, Dice + BCE on the
HR mask. Everything else is the project's own, so that only the network differs: the cache
(`preprocess`), the split and patch sampler of the config (lesion-centred patches, augmentation, the
config's `degradation`), AdamW with the config's learning rate and the warm-up + cosine schedule over
the time budget, bf16 autocast on CPUs that have it. Scoring runs the peer through
`inference.pipeline.segment_image` (the `segment` command's code: working grid, normalisation, sliding
windows, post-processing) on the validation cases. `state.pt` is written every few minutes and at the
end (weights, optimiser, step, elapsed time); --resume continues it. MONAI is a benchmark dependency only.

The budget is counted in the process's CPU seconds over its threads, not on the wall clock: on a machine
shared with other work (2 cores here) a wall-clock budget would give the peer fewer steps than the
project's models had alone. Where a step leaves a thread idle (loading), this clock runs slower than the
wall's, which counts in the peer's favour.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "SASSRSegment"))

from monai_peer import peer_network  # noqa: E402  (benchmarks/monai_peer.py, beside this file)

from SASSRSegmentLib.data.cache import open_cache  # noqa: E402
from SASSRSegmentLib.data.sampling import batches, lr_from_hr  # noqa: E402
from SASSRSegmentLib.model.losses import dice_bce_loss  # noqa: E402
from SASSRSegmentLib.training.build import lr_lambda  # noqa: E402
from SASSRSegmentLib.training.config import load_config  # noqa: E402
from SASSRSegmentLib.training.runtime import amp_settings  # noqa: E402
from SASSRSegmentLib.training.setup import check_against_data, choose_split, make_sampler  # noqa: E402

CHANNELS = (16, 32, 64, 128)
SAVE_EVERY_S = 300


class PeerNet(torch.nn.Module):
    """MONAI's U-Net on the LR input; `forward` returns HR logits, as the project's networks do."""

    def __init__(self, spatial_dims: int, scale: int):
        super().__init__()
        self.unet = peer_network(spatial_dims, CHANNELS)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = "trilinear" if x.dim() == 5 else "bilinear"
        return F.interpolate(self.unet(x), scale_factor=self.scale, mode=mode, align_corners=False)


def _setup(args) -> tuple:
    cfg = load_config(args.config)
    cache = open_cache(args.cache)
    prep = dict(cache.prep)
    prep["patch_size_lr"] = cfg.patch_size(prep["spatial_dims"], prep.get("lr_longer_side"))
    flip_axes = check_against_data(cfg, prep, "baseline")
    split = choose_split(cfg, cache, None)
    return cfg, cache, prep, split, make_sampler(cfg, cache, split["train"], prep, flip_axes)


def train(args) -> int:
    cfg, cache, prep, split, sampler = _setup(args)
    torch.manual_seed(cfg.seed)
    net = PeerNet(prep["spatial_dims"], prep["scale"])
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    state_path = output / "state.pt"
    step, elapsed_before = 0, 0.0
    if args.resume:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed_before = state["step"], state["elapsed_s"]
    start = _cpu_seconds()

    def elapsed() -> float:
        return elapsed_before + _cpu_seconds() - start

    schedule = lr_lambda(cfg, 10**9, lambda: elapsed() / 60 / args.minutes)
    amp_dtype, _ = amp_settings(cfg, torch.device("cpu"))
    stream = batches(sampler, cfg.batch_size, 0, cfg.seed + 7919 * step)
    last_save = time.monotonic()
    net.train()
    with open(output / "log.csv", "a") as log:
        while elapsed() < args.minutes * 60:
            for group in optimizer.param_groups:
                group["lr"] = cfg.learning_rate * schedule(step)
            hr_image, hr_mask, *made = next(stream)
            lr = made[0] if made else lr_from_hr(hr_image, prep["scale"])
            with torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = dice_bce_loss(net(lr), hr_mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            if torch.isfinite(loss):
                optimizer.step()
            step += 1
            if step % 10 == 0:
                log.write(f"{step},{elapsed():.1f},{float(loss.detach()):.5f}\n")
                log.flush()
            if time.monotonic() - last_save > SAVE_EVERY_S:
                _save(state_path, net, optimizer, step, elapsed(), cache, prep, split)
                last_save = time.monotonic()
    _save(state_path, net, optimizer, step, elapsed(), cache, prep, split)
    print(f"{step} steps in {elapsed() / 60:.1f} min; state in {state_path}")
    return 0


def _cpu_seconds() -> float:
    return time.process_time() / torch.get_num_threads()


def _save(path: Path, net, optimizer, step: int, elapsed_s: float, cache, prep: dict, split: dict) -> None:
    state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
    state |= {"elapsed_s": elapsed_s, "prep": prep, "split": split, "cache": str(cache.folder)}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def evaluate(args) -> int:
    from SASSRSegmentLib.data import datasets
    from SASSRSegmentLib.evaluation.report import format_reports, json_safe
    from SASSRSegmentLib.evaluation.scoring import ScoringOptions, assemble_result, lr_inputs, score_cases
    from SASSRSegmentLib.runtime.progress import Progress

    state = torch.load(Path(args.output) / "state.pt", map_location="cpu", weights_only=False)
    prep = state["prep"]
    net = PeerNet(prep["spatial_dims"], prep["scale"])
    net.load_state_dict(state["model"])
    net.eval()
    # The card segment_image needs: the peer's preprocessing, its first width for the memory estimate.
    card = {
        "name": f"MONAI U-Net peer ({state['step']} steps, {state['elapsed_s'] / 60:.0f} min)",
        "preprocessing": prep,
        "network": {"features": list(CHANNELS), "in_channels": 1},
        "threshold": 0.5,
        "training": {"split": state["split"]},
    }
    generators = lr_inputs(args.lr_input, prep["spatial_dims"])
    dataset = datasets.open_dataset(args.dataset, labels=prep.get("labels"))
    names = list(state["split"]["val"])
    options = ScoringOptions()
    progress = Progress("quiet")
    scores = score_cases(dataset, names, net, card, torch.device("cpu"), generators, options, progress)
    result = assemble_result(scores, card, generators, options, card["name"], args.dataset, "val")
    print(format_reports(result, generators))
    if args.json:
        Path(args.json).write_text(json.dumps(json_safe(result), indent=2) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--cache", required=True, help="a cache made by `preprocess` (or by a training run)")
    t.add_argument("--config", required=True)
    t.add_argument("--output", required=True)
    t.add_argument("--minutes", type=float, default=120.0, help="the CPU budget, resumed runs included")
    t.add_argument("--resume", action="store_true")
    e = sub.add_parser("evaluate")
    e.add_argument("--output", required=True)
    e.add_argument("--dataset", required=True)
    e.add_argument("--lr-input", default="all")
    e.add_argument("--json")
    args = parser.parse_args()
    return train(args) if args.command == "train" else evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
