"""The train command: config, ablations, a short real training, resume, Ctrl-C, SimpleITK-free and DDP runs."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_data import make_dataset

from SASSRSegmentLib import cli
from SASSRSegmentLib.commands import train as train_command
from SASSRSegmentLib.data import cache as preprocess
from SASSRSegmentLib.data import degrade, normalization
from SASSRSegmentLib.data.datasets import open_dataset
from SASSRSegmentLib.data.sampling import lr_from_hr
from SASSRSegmentLib.model.bundle import load_bundle, read_card, save_bundle
from SASSRSegmentLib.runtime.errors import UserError
from SASSRSegmentLib.training import build, config, curves, trainer
from SASSRSegmentLib.training import config as training_config
from SASSRSegmentLib.training import state as training_state

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
BRATS_CASES = ("Brats18_CBICA_ALU_1", "Brats18_TCIA01_499_1", "brats_2013_pat0004_1")
REAL_CONFIG = {
    "lr_spacing": [4.0, 4.0, 4.0],
    "patch_size_lr": [12, 12, 12],
    "crop_margin_lr": 2,
    "features": [4, 8, 16],
    "batch_size": 2,
    "val_fraction": 0.34,
    "val_overlap": 0.0,
    "learning_rate": 0.003,
    "warmup_steps": 2,
    "log_every": 1,
    "p_fg": 1.0,
    "name": "test-brain",
}


def run_train(*argv: str) -> int:
    """The train command in this process, with sys.argv as `python -m SASSRSegmentLib train ...` sets it."""
    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    args = parser.parse_args([*argv, "--progress", "quiet"])
    saved = sys.argv
    sys.argv = [str(Path(cli.__file__).with_name("__main__.py")), "train", *argv]
    try:
        return train_command.run(args)
    finally:
        sys.argv = saved


def read_log(folder: Path) -> list[dict]:
    with open(folder / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


# ----------------------------------------------------------------------------------------- config


def test_config_errors_are_listed(tmp_path):
    bad = write_json(tmp_path / "bad.json", {"learning_rat": 0.1, "batch_size": "8", "scale": 3, "p_fg": 1.5})
    with pytest.raises(UserError) as info:
        config.load_config(bad)
    lines = str(info.value).splitlines()
    assert (
        "unknown key 'learning_rat' (did you mean 'learning_rate'?)" in lines[1]
        and 'batch_size: "8" is not a valid int' in lines[2]
    )
    assert len(lines) == 3  # value checks wait until the types are right
    with pytest.raises(UserError) as info:
        config.load_config(
            write_json(
                tmp_path / "values.json",
                {"scale": 3, "p_fg": 1.5, "amp": "fp8", "thick_slice_gap": [0.8, 1.3]},
            )
        )
    message = str(info.value)
    assert (
        "scale must be 2 or 4" in message
        and "p_fg must be in [0, 1]" in message
        and 'amp must be "auto"' in message
        and "thick_slice_gap must be [low, high] with 1 <= low <= high <= 2, got [0.8, 1.3]" in message
    )
    # Each had trained without a word (the learning rate ending at 3x its peak, 0 px read as 160) or
    # failed in the first step with a traceback, after the preprocessing.
    values = {
        "norm": "group",
        "dropout": 1.0,
        "dilations": [0],
        "min_lr_ratio": 3,
        "lr_longer_side": 0,
        "grad_clip": -1,
        "loss_seg": -1,
        "crop_margin_lr": -3,
        "min_lesion_voxels": -5,
    }
    with pytest.raises(UserError) as info:
        config.load_config(write_json(tmp_path / "more.json", values))
    lines = [line.strip() for line in str(info.value).splitlines()[1:]]
    assert len(lines) == len(values) and all(any(line.startswith(k) for line in lines) for k in values)
    (tmp_path / "truncated.json").write_text('{"scale": ')
    with pytest.raises(UserError, match="is not valid JSON"):
        config.load_config(tmp_path / "truncated.json")
    with pytest.raises(UserError, match="does not exist"):
        config.load_config(tmp_path / "missing.json")


def test_committed_configs_load():
    brain = config.load_config(REPO / "configs" / "brain-tumour-flair-3d.json")
    assert brain.scale == 2 and brain.lr_spacing == [2.0, 2.0, 2.0] and brain.features == [16, 32, 64, 128]
    assert brain.normalization == {"kind": "mri"} and Path(brain.split_file).is_file()
    busi = config.load_config(REPO / "configs" / "breast-ultrasound-2d.json")
    assert busi.lr_longer_side == 160 and busi.normalization == {"kind": "uint8"} and busi.batch_size == 16
    assert busi.patch_size(2, 160) == [160, 160] and busi.flip_axes == [1]


def test_robust_brain_config_shares_the_brain_models_data_settings():
    """Same cache (preprocessing keys), split, widths and patch as the bundled brain model: only the
    LR synthesis and the HR heads differ, so the two are comparable."""
    base = config.load_config(REPO / "configs" / "brain-tumour-flair-3d.json")
    robust = config.load_config(REPO / "configs" / "brain-tumour-flair-3d-robust.json")
    assert (robust.degradation, robust.hr_head, base.degradation, base.hr_head) == (
        "random",
        "subpixel",
        "block",
        "interpolate",
    )
    same = ("scale", "lr_spacing", "normalization", "labels", "crop_margin_lr", "patch_size_lr", "features")
    assert all(getattr(robust, k) == getattr(base, k) for k in same + ("split_file", "groups", "batch_size"))
    assert robust.checkpoint_minutes and robust.val_every == 250
    net = build.build_network(robust, {"spatial_dims": 3, "scale": 2, "channels": ["FLAIR"]}, "full")
    assert net.config.hr_head == "subpixel" and net.config.hr_channels == robust.hr_channels
    # The warm-start config is the robust one with a gentler start, nothing else.
    warm = config.load_config(REPO / "configs" / "brain-tumour-flair-3d-robust-warm.json")
    differs = {f.name for f in dataclasses.fields(warm) if getattr(robust, f.name) != getattr(warm, f.name)}
    assert differs == {"learning_rate", "warmup_steps"} and warm.learning_rate < robust.learning_rate
    # The batch-norm fine-tune of the warm run: its normalisation, a fine-tune's learning rate, and
    # validations often enough for a CPU budget.
    bn = config.load_config(REPO / "configs" / "brain-tumour-flair-3d-robust-bn.json")
    differs = {f.name for f in dataclasses.fields(bn) if getattr(warm, f.name) != getattr(bn, f.name)}
    assert differs == {"norm", "learning_rate", "warmup_steps", "val_every"} and bn.norm == "batch"
    assert bn.learning_rate < warm.learning_rate
    # The averaged fine-tune of the shipped network (not shipped; docs/models.md): only the schedule and
    # the average differ.
    ema = config.load_config(REPO / "configs" / "brain-tumour-flair-3d-robust-ema.json")
    differs = {f.name for f in dataclasses.fields(ema) if getattr(bn, f.name) != getattr(ema, f.name)}
    assert differs == {"learning_rate", "warmup_steps", "val_every", "ema_decay"} and ema.ema_decay == 0.99
    assert ema.learning_rate < bn.learning_rate
    # The thick-slice fine-tune of the shipped network: more thick slices, validated on three inputs.
    thick = config.load_config(REPO / "configs" / "brain-tumour-flair-3d-robust-thick.json")
    differs = {f.name for f in dataclasses.fields(ema) if getattr(ema, f.name) != getattr(thick, f.name)}
    assert (
        differs == {"p_thick_slices", "val_lr_inputs", "learning_rate"}
        and thick.p_thick_slices > ema.p_thick_slices
    )
    assert thick.val_lr_inputs[0] == "block" and "thick-slice-5mm" in thick.val_lr_inputs


def test_fast_brain_config_is_the_restandardised_cold_start_on_the_cheaper_network():
    """Only the network's cost options differ, so its validation compares with the run it replaces;
    they reach the network, and the encoder keeps the shipped model's shapes (--warm-start copies it)."""
    restd = config.load_config(REPO / "configs" / "brain-tumour-flair-3d-restandardised.json")
    fast = config.load_config(REPO / "configs" / "brain-tumour-flair-3d-fast.json")
    differs = {f.name for f in dataclasses.fields(fast) if getattr(restd, f.name) != getattr(fast, f.name)}
    assert differs == {"reduce_before_upsampling", "sdc_squeeze", "sr_width", "hr_channels", "max_steps"}
    net = build.build_network(fast, {"spatial_dims": 3, "scale": 2, "channels": ["FLAIR"]}, "full")
    assert (net.config.reduce_before_upsampling, net.config.sdc_squeeze, net.config.sr_width) == (
        True,
        True,
        0.5,
    )
    _, shipped = load_bundle(REPO / "SASSRSegment" / "Resources" / "Models" / "brain-tumour-flair-3d")
    ours, theirs = net.encoder.state_dict(), shipped.encoder.state_dict()
    assert ours.keys() == theirs.keys() and all(ours[k].shape == theirs[k].shape for k in ours)


def test_contrast_fine_tune_config_widens_only_the_contrast_augmentation_of_the_fast_run():
    """It fine-tunes the fast run's weights (--init needs the same network) with wider intensity scaling."""
    fast = config.load_config(REPO / "configs" / "brain-tumour-flair-3d-fast.json")
    wide = config.load_config(REPO / "configs" / "brain-tumour-flair-3d-fast-contrast.json")
    differs = {f.name for f in dataclasses.fields(fast) if getattr(fast, f.name) != getattr(wide, f.name)}
    assert differs == {"p_intensity", "intensity_scale", "learning_rate", "warmup_steps", "max_steps"}
    assert (
        wide.intensity_scale[0] < fast.intensity_scale[0]
        and wide.intensity_scale[1] > fast.intensity_scale[1]
    )
    assert wide.p_intensity > fast.p_intensity and wide.learning_rate < fast.learning_rate


def test_scan_gain_fine_tune_config_is_the_fast_run_with_a_fine_tunes_schedule():
    """Its synthesis differs by code (the scan's statistics), not by config: only the schedule moves."""
    fast = config.load_config(REPO / "configs" / "brain-tumour-flair-3d-fast.json")
    scan = config.load_config(REPO / "configs" / "brain-tumour-flair-3d-fast-scan.json")
    differs = {f.name for f in dataclasses.fields(fast) if getattr(fast, f.name) != getattr(scan, f.name)}
    assert differs == {"learning_rate", "warmup_steps", "max_steps"}
    assert scan.learning_rate < fast.learning_rate and scan.degradation == "random"


def test_faint_lesion_fine_tune_config_is_the_scan_run_with_faded_lesions_and_a_lower_peak():
    scan = config.load_config(REPO / "configs" / "brain-tumour-flair-3d-fast-scan.json")
    faint = config.load_config(REPO / "configs" / "brain-tumour-flair-3d-fast-faint.json")
    differs = {f.name for f in dataclasses.fields(scan) if getattr(scan, f.name) != getattr(faint, f.name)}
    assert differs == {"p_lesion_fade", "learning_rate", "warmup_steps", "max_steps"}
    assert (
        faint.p_lesion_fade > 0 and faint.lesion_fade[1] == 1.0 and faint.learning_rate < scan.learning_rate
    )


def test_ultrasound_anneal_config_is_the_shipped_runs_with_a_fine_tunes_schedule():
    """The same network, data and augmentation as the shipped ultrasound model's run: only the schedule,
    the weight averaging and how often it validates and saves differ."""
    base = config.load_config(REPO / "configs" / "breast-ultrasound-2d.json")
    anneal = config.load_config(REPO / "configs" / "breast-ultrasound-2d-anneal.json")
    differs = {f.name for f in dataclasses.fields(base) if getattr(base, f.name) != getattr(anneal, f.name)}
    assert differs == {
        "max_steps",
        "learning_rate",
        "warmup_steps",
        "min_lr_ratio",
        "ema_decay",
        "val_every",
        "checkpoint_minutes",
    }
    assert anneal.learning_rate < base.learning_rate and anneal.degradation == "block"


def test_new_options_are_checked(tmp_path):
    bad = write_json(
        tmp_path / "bad.json",
        {
            "hr_head": "deconv",
            "degradation": "blur",
            "checkpoint_minutes": 0,
            "p_thick_slices": 1.5,
            "val_lr_inputs": ["block", "bicubic"],
            "sr_width": 0,
            "p_lesion_fade": -0.1,
            "lesion_fade": [0.5, 1.2],
        },
    )
    with pytest.raises(UserError) as info:
        config.load_config(bad)
    message = str(info.value)
    assert 'hr_head must be one of "interpolate", "subpixel"' in message
    assert 'degradation must be one of "block", "random"' in message
    assert "checkpoint_minutes must be > 0" in message
    assert "p_thick_slices must be in [0, 1], got 1.5" in message
    assert 'val_lr_inputs must be a non-empty list of "block", "gaussian-linear"' in message
    assert "sr_width must be in (0, 1], got 0" in message
    assert "p_lesion_fade must be in [0, 1], got -0.1" in message
    assert "lesion_fade must be [low, high] with 0 < low <= high <= 1, got [0.5, 1.2]" in message


def test_init_from_a_bundle_whose_card_predates_the_head_options(tmp_path):
    cfg = config.TrainConfig(features=[4, 8], dilations=[1, 2])
    prep = {"spatial_dims": 2, "scale": 2, "channels": ["a"]}
    source = build.build_network(cfg, prep, "full")
    card = {"name": "old", "preprocessing": prep}
    save_bundle(tmp_path / "old", source, card)
    meta = json.loads((tmp_path / "old" / "model.json").read_text())
    for key in ("hr_head", "hr_channels"):
        del meta["network"][key]
    (tmp_path / "old" / "model.json").write_text(json.dumps(meta))
    target = build.build_network(cfg, prep, "full")
    build.initialise_from(target, str(tmp_path / "old"))
    _, loaded = load_bundle(tmp_path / "old")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), target.state_dict().values()))
    other = build.build_network(
        config.TrainConfig(features=[4, 8], dilations=[1, 2], hr_head="subpixel"), prep, "full"
    )
    with pytest.raises(UserError, match="its network differs"):
        build.initialise_from(other, str(tmp_path / "old"))


def test_warm_start_copies_the_shared_layers_of_a_different_network(tmp_path):
    cfg = config.TrainConfig(features=[4, 8], dilations=[1, 2], hr_head="subpixel")
    prep = {"spatial_dims": 2, "scale": 2, "channels": ["a"]}
    source = build.build_network(cfg, prep, "baseline")
    save_bundle(tmp_path / "baseline", source, {"name": "baseline", "preprocessing": prep})
    _, saved = load_bundle(tmp_path / "baseline")
    target = build.build_network(cfg, prep, "full")
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(UserError, match="its network differs"):
        build.initialise_from(target, str(tmp_path / "baseline"))
    info = build.initialise_from(target, str(tmp_path / "baseline"), shared_only=True)
    own, theirs = target.state_dict(), saved.state_dict()
    shared = [k for k in own if k in theirs and own[k].shape == theirs[k].shape]
    assert any(k.startswith("encoder.") for k in shared) and not any(
        k.startswith("sr_decoder.") for k in shared
    )
    assert all(torch.equal(own[k], theirs[k]) for k in shared)
    assert all(torch.equal(own[k], fresh[k]) for k in own if k not in shared)
    assert info["warm_start"] == {"tensors_copied": len(shared), "tensors_total": len(own)}
    for other, message in (
        (config.TrainConfig(features=[6, 12], dilations=[1, 2]), "shares no layer"),
        (cfg, "input .dimensions, channels. differs"),
    ):
        channels = {**prep, "channels": ["a", "b"]} if other is cfg else prep
        with pytest.raises(UserError, match=message):
            build.initialise_from(
                build.build_network(other, channels, "full"), str(tmp_path / "baseline"), shared_only=True
            )


@pytest.mark.parametrize("ablation", sorted(config.ABLATIONS))
def test_ablations_build_and_train_every_parameter(ablation):
    torch.manual_seed(0)
    cfg = config.TrainConfig(features=[4, 8], dilations=[1, 2])
    prep = {"spatial_dims": 2, "scale": 2, "channels": ["a"]}
    net = build.build_network(cfg, prep, ablation)
    loss_fn = build.build_loss(cfg, ablation)
    hr_image = torch.rand(2, 1, 32, 32)
    hr_mask = (hr_image > 0.6).float()
    net.train()
    total, terms = loss_fn(net(lr_from_hr(hr_image, 2)), hr_mask, hr_image)
    total.backward()
    # DistributedDataParallel needs every parameter to get a gradient (no find_unused_parameters).
    unused = [n for n, p in net.named_parameters() if p.grad is None]
    assert unused == []
    c = net.config
    expected = {
        "full": (True, True, True, {"seg", "rec", "fa", "sa"}),
        "no-image-sr": (False, True, True, {"seg"}),
        "no-sdc": (True, False, True, {"seg", "rec", "fa"}),
        "no-fa": (True, True, True, {"seg", "rec", "sa"}),
        "no-sa": (True, True, True, {"seg", "rec", "fa"}),
        "no-learned-upsampling": (True, True, False, {"seg", "rec", "fa", "sa"}),
        "baseline": (False, False, False, {"seg"}),
        "sr": (True, False, False, {"seg", "rec"}),
        "sr-fa": (True, False, False, {"seg", "rec", "fa"}),
        "sr-fa-sdc": (True, True, False, {"seg", "rec", "fa"}),
    }[ablation]
    assert (c.image_sr, c.sdc, c.learned_upsampling, set(terms)) == expected
    assert torch.isfinite(total)


def test_learning_rate_schedule():
    cfg = config.TrainConfig(warmup_steps=10, min_lr_ratio=0.01)
    f = build.lr_lambda(cfg, 100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.505) and f(100) == pytest.approx(0.01)
    poly = build.lr_lambda(config.TrainConfig(schedule="poly", warmup_steps=0), 100)
    assert poly(0) == pytest.approx(1.0) and poly(50) == pytest.approx(0.01 + 0.99 * 0.5**0.9)
    # A time limit that runs out before the steps do drives the decay instead.
    halfway_in_time = build.lr_lambda(cfg, 100, time_fraction=lambda: 0.5)
    assert halfway_in_time(20) == pytest.approx(0.505)
    assert build.lr_lambda(cfg, 100, time_fraction=lambda: 2.0)(20) == pytest.approx(0.01)


# ------------------------------------------------------------------------------------- real training


@pytest.fixture(scope="module")
def real_run(shared_data, tmp_path_factory):
    """20 steps on three real BraTS cases (2 train, 1 validation) at a small patch size."""
    source = shared_data / "Dataset001_BraTSFLAIR"
    base = tmp_path_factory.mktemp("real")
    root = base / "brats3"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    (root / "dataset.json").symlink_to(source / "dataset.json")
    for case in BRATS_CASES:
        (root / "imagesTr" / f"{case}_0000.nii.gz").symlink_to(source / "imagesTr" / f"{case}_0000.nii.gz")
        (root / "labelsTr" / f"{case}.nii.gz").symlink_to(source / "labelsTr" / f"{case}.nii.gz")
    config = write_json(base / "config.json", REAL_CONFIG)
    output = base / "run"
    torch.set_num_threads(2)
    code = run_train(
        "--dataset",
        str(root),
        "--output",
        str(output),
        "--config",
        str(config),
        "--max-steps",
        "20",
        "--workers",
        "0",
        "--seed",
        "3",
    )
    assert code == 0
    return {"root": root, "config": config, "output": output}


def test_real_training_lowers_the_loss_and_writes_a_bundle(real_run):
    output = real_run["output"]
    rows = read_log(output)
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    seg = np.array([float(r["seg"]) for r in rows])
    assert seg[-5:].mean() < seg[:5].mean() - 0.05
    assert rows[-1]["val_dice"] != "" and 0.0 <= float(rows[-1]["val_dice"]) <= 1.0
    card, net = load_bundle(output, torch.device("cpu"))
    assert card["name"] == "test-brain" and card["preprocessing"]["lr_spacing"] == [4.0, 4.0, 4.0]
    assert card["preprocessing"]["patch_size_lr"] == [12, 12, 12] and card["preprocessing"][
        "normalization"
    ] == {"kind": "mri"}
    assert card["training"]["steps"] == 20 and card["training"]["steps_total"] == 20
    assert card["training"]["split"]["val"] and set(card["training"]["split"]["train"]) | set(
        card["training"]["split"]["val"]
    ) == set(BRATS_CASES)
    assert card["training"]["torch"] == torch.__version__ and "CPU cores" in card["training"]["hardware"]
    assert card["training"]["command"].startswith("python -m SASSRSegmentLib train --dataset ")
    assert card["training"]["command"].endswith("--max-steps 20 --workers 0 --seed 3")
    assert set(card["validation"]["per_case"]) == set(card["training"]["split"]["val"])
    assert card["network"]["features"] == [4, 8, 16] and card["network"]["sdc"] is True
    with torch.no_grad():
        out = net(torch.randn(1, 1, 12, 16, 16))
    assert out.shape == (1, 1, 24, 32, 32) and torch.isfinite(out).all()
    state = torch.load(output / "model.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    plot = sitk.GetArrayFromImage(sitk.ReadImage(str(output / "curves.png")))
    assert plot.shape == (400, 720, 3) and (plot[..., 2] > plot[..., 0] + 100).sum() > 50  # a blue loss curve
    best = torch.load(output / "checkpoint_best.pt", weights_only=False)
    assert best["step"] == 20 and best["best_metric"] == card["validation"]["dice_mean"]
    assert "model" in best and "optimizer" not in best  # only the bundle reads it; --resume reads the last


def test_resume_continues_the_run(real_run, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(real_run["output"], output)
    with pytest.raises(UserError, match="already holds files; pass --resume"):
        run_train("--dataset", str(output / "cache"), "--output", str(output))
    other = write_json(tmp_path / "other.json", {**REAL_CONFIG, "learning_rate": 0.01})
    with pytest.raises(UserError, match="--config differs from the config of the run"):
        run_train(
            "--dataset", str(output / "cache"), "--output", str(output), "--resume", "--config", str(other)
        )
    with pytest.raises(UserError, match="has no checkpoint_last.pt"):
        run_train("--dataset", str(output / "cache"), "--output", str(tmp_path / "empty"), "--resume")
    # A run stopped before its first checkpoint left its log alone: --resume says to start it again,
    # and a new run may (before, neither was accepted).
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copy(output / "log.csv", stopped / "log.csv")
    with pytest.raises(
        UserError, match="stopped before its first checkpoint: start it again without --resume"
    ):
        run_train("--dataset", str(output / "cache"), "--output", str(stopped), "--resume")
    assert training_state.check_output(stopped, resume=False) is None and not any(stopped.iterdir())
    # A file of the user's that happens to be called log.csv (or a folder so named) is not ours to replace.
    (stopped / "log.csv").write_text("my notes\n")
    with pytest.raises(UserError, match="already holds files"):
        training_state.check_output(stopped, resume=False)
    (stopped / "log.csv").unlink()
    (stopped / "log.csv").mkdir()
    with pytest.raises(UserError, match="already holds files"):
        training_state.check_output(stopped, resume=False)
    before = torch.load(output / "checkpoint_last.pt", weights_only=False)
    code = run_train(
        "--dataset",
        str(output / "cache"),
        "--output",
        str(output),
        "--resume",
        "--max-steps",
        "23",
        "--workers",
        "0",
    )
    assert code == 0
    after = torch.load(output / "checkpoint_last.pt", weights_only=False)
    assert after["step"] == 23 and after["scheduler"]["last_epoch"] == 23
    assert after["split"] == before["split"] and after["elapsed_s"] > before["elapsed_s"]
    assert not torch.equal(
        after["model"]["encoder.stages.0.0.0.weight"], before["model"]["encoder.stages.0.0.0.weight"]
    )
    assert [int(r["step"]) for r in read_log(output)] == list(range(1, 24))
    card = json.loads((output / "model.json").read_text())
    assert card["training"]["steps_total"] == 23 and "--resume" in card["training"]["command"]


# -------------------------------------------------------------------------- subprocesses, tiny data


TINY_2D_PREP = {
    "spatial_dims": 2,
    "scale": 2,
    "channels": ["ultrasound"],
    "lr_spacing": None,
    "lr_longer_side": 16,
    "normalization": {"kind": "uint8"},
    "patch_size_lr": [16, 16],
    "labels": [1],
}


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    """Six 2D 8-bit images with one or two blobs each, preprocessed to a 32-pixel HR grid."""
    base = tmp_path_factory.mktemp("tiny")
    cases = {
        f"us{i}": {"shape": (24 + 4 * (i % 3), 32), "lesions": [((12, 8 + 3 * i), 3 + i % 2)]}
        for i in range(6)
    }
    root = make_dataset(base / "us", cases, channels=("ultrasound",), ending=".png")
    return preprocess.build_cache(open_dataset(root), TINY_2D_PREP, base / "cache", workers=1)


def tiny_config(folder: Path) -> Path:
    return write_json(
        folder / "tiny.json",
        {
            "features": [4, 8],
            "dilations": [1, 2],
            "patch_size_lr": [16, 16],
            "val_fraction": 0.34,
            "warmup_steps": 1,
            "log_every": 1,
        },
    )


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


NO_SITK = (
    "import sys; sys.modules['SimpleITK'] = None; from SASSRSegmentLib.train import main; sys.exit(main())"
)


def test_ctrl_c_checkpoints_and_cache_training_needs_no_simpleitk(tiny_cache, tmp_path):
    output = tmp_path / "run"
    argv = [
        "--dataset",
        str(tiny_cache),
        "--output",
        str(output),
        "--config",
        str(tiny_config(tmp_path)),
        "--workers",
        "0",
    ]
    proc = subprocess.Popen(
        [PYTHON, "-c", NO_SITK, *argv, "--max-steps", "100000", "--progress", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        for line in proc.stdout:
            step = re.match(r"step (\d+)/", json.loads(line).get("message", ""))
            if step and int(step.group(1)) >= 3:
                proc.send_signal(signal.SIGINT)
                break
        assert proc.wait(timeout=60) == 130, proc.stderr.read()
    finally:
        proc.kill()
    checkpoint = torch.load(output / "checkpoint_last.pt", weights_only=False)
    stopped_at = checkpoint["step"]
    assert 3 <= stopped_at < 100 and not (output / "model.json").exists()
    # Resumed where it stopped (as a stop on its last step is): that step is validated into the bundle,
    # which had been left without any validation; so too from a checkpoint written before the step
    # validated was recorded.
    checkpoint.pop("validated_step")
    torch.save(checkpoint, output / "checkpoint_last.pt")
    done = subprocess.run(
        [PYTHON, "-c", NO_SITK, *argv[:4], "--resume", "--max-steps", str(stopped_at)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((output / "model.json").read_text())["validation"]["step"] == stopped_at
    done = subprocess.run(
        [PYTHON, "-c", NO_SITK, *argv[:4], "--resume", "--max-steps", str(stopped_at + 3)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (output / "curves.png").is_file()  # drawn by Pillow: no SimpleITK needed
    card = json.loads((output / "model.json").read_text())
    assert card["training"]["steps_total"] == stopped_at + 3
    assert (
        card["preprocessing"]["normalization"] == {"kind": "uint8"}
        and card["preprocessing"]["lr_longer_side"] == 16
    )


def test_torchrun_two_processes(tiny_cache, tmp_path):
    output = tmp_path / "ddp"
    command = [
        PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "SASSRSegmentLib.train",
        "--dataset", str(tiny_cache), "--output", str(output), "--config", str(tiny_config(tmp_path)),
        "--max-steps", "6", "--val-every", "3", "--workers", "1", "--device", "cpu", "--progress", "quiet",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    card = json.loads((output / "model.json").read_text())
    assert card["training"]["processes"] == 2 and card["training"]["command"].startswith(
        "torchrun --nproc_per_node 2"
    )
    last = torch.load(output / "checkpoint_last.pt", weights_only=False)
    assert last["step"] == 6 and last["world"] == 2 and len(last["rng"]) == 2
    assert [r["val_dice"] != "" for r in read_log(output)] == [False, False, True, False, False, True]
    load_bundle(output, torch.device("cpu"))


def test_random_degradation_and_timed_checkpoints(tiny_cache, tmp_path, monkeypatch):
    """The robust settings train end to end on 8-bit 2D data, and a checkpoint is written on the clock."""
    config = json.loads(tiny_config(tmp_path).read_text())
    config |= {"degradation": "random", "hr_head": "subpixel", "checkpoint_minutes": 1e-6, "val_every": 1000}
    output = tmp_path / "run"
    saved = []
    save = trainer.atomic_torch_save
    monkeypatch.setattr(
        trainer,
        "atomic_torch_save",
        lambda obj, path: saved.append((path.name, obj["step"])) or save(obj, path),
    )
    code = run_train(
        "--dataset", str(tiny_cache), "--output", str(output), "--config",
        str(write_json(tmp_path / "robust.json", config)), "--max-steps", "3", "--workers", "0",
    )  # fmt: skip
    assert code == 0
    # A checkpoint after every step (always due on this clock), though validation comes only at the end.
    assert [step for name, step in saved if name == "checkpoint_last.pt"] == [1, 2, 3]
    card, net = load_bundle(output, torch.device("cpu"))
    assert card["network"]["hr_head"] == "subpixel" and card["training"]["config"]["degradation"] == "random"
    assert all(r["loss"] != "" and np.isfinite(float(r["loss"])) for r in read_log(output))


def test_options_checked_against_the_data(tiny_cache, tmp_path):
    def error(config: dict) -> str:
        path = write_json(tmp_path / "c.json", {"features": [4, 8], **config})
        output = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        with pytest.raises(UserError) as info:
            run_train(
                "--dataset",
                str(tiny_cache),
                "--output",
                str(output),
                "--config",
                str(path),
                "--max-steps",
                "1",
            )
        return str(info.value)

    assert "cache" in error({"lr_longer_side": 20}) and "lr_longer_side 20 vs 16" in error(
        {"lr_longer_side": 20}
    )
    message = error({"patch_size_lr": [16, 8, 8], "flip_axes": [2], "rot90": True})
    assert "has 3 axes; the data is 2D" in message and "flip_axes [2] must be axes 0..1" in message
    assert "rot90 needs a square patch" in error({"patch_size_lr": [16, 8], "rot90": True})
    assert "loss_rec must be > 0" in error({"loss_rec": 0.0})
    too_small = error({"patch_size_lr": [16, 16], "features": [4, 8, 16, 32, 64]})
    assert "too small for 5 levels of features with instance norm: at least one axis over 16" in too_small
    # One axis at the bottleneck's stride is padded, not refused: [8, 24] trains with 4 levels.
    narrow = write_json(tmp_path / "narrow.json", {"features": [4, 8, 16, 32], "patch_size_lr": [8, 24]})
    run = ["--dataset", str(tiny_cache), "--output", str(tmp_path / "narrow"), "--config", str(narrow)]
    run_train(*run, "--max-steps", "1")
    assert (tmp_path / "narrow" / "model.json").is_file()


def test_labels_a_config_picks_are_checked_against_the_cache(tmp_path):
    """The cache keeps every value > 0 as lesion: a config picking one label of several had trained on
    all of them from it, exit 0, its card saying labels null."""
    cases = {f"us{i}": {"shape": (24, 32), "lesions": [((12, 8 + 3 * i), 3)]} for i in range(3)}
    labels = {"background": 0, "tumour": 1, "cyst": 2}
    root = make_dataset(tmp_path / "us", cases, channels=("ultrasound",), ending=".png", labels=labels)
    cache = preprocess.build_cache(
        open_dataset(root), {**TINY_2D_PREP, "labels": None}, tmp_path / "cache", workers=1
    )
    # [1, 2] too: a cache of every value > 0 may hold values dataset.json does not declare (0/255 masks).
    for picked, refused in (([2], True), (["cyst"], True), ([1, 2], True), (None, False)):
        config = write_json(tmp_path / "c.json", {"features": [4, 8], "labels": picked})
        output = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        run = ["--dataset", str(cache), "--output", str(output), "--config", str(config), "--max-steps", "1"]
        if refused:
            with pytest.raises(
                UserError, match=r"preprocessed differently from the config \(labels \[.*\] vs null\)"
            ):
                run_train(*run)
        else:
            run_train(*run, "--val-every", "1")


def test_a_diverged_run_stops_with_an_error_and_writes_no_bundle(tiny_cache, tmp_path):
    # It had ended "done: 30 steps", and its bundle gave NaN probabilities and no lesion without a word.
    config = json.loads(tiny_config(tmp_path).read_text()) | {"learning_rate": 1e6, "amp": "off"}
    output = tmp_path / "run"
    with pytest.raises(
        UserError, match="training diverged: the loss or its gradient has not been a number since"
    ):
        run_train(
            "--dataset", str(tiny_cache), "--output", str(output), "--config",
            str(write_json(tmp_path / "hot.json", config)), "--max-steps", "60", "--workers", "0",
        )  # fmt: skip
    assert not (output / "model.pt").exists()
    assert len(read_log(output)) < 60 - trainer.DIVERGED_STEPS  # stopped once it had diverged


def test_a_resumed_run_must_see_the_data_it_started_on(tiny_cache, tmp_path):
    output = tmp_path / "run"
    base = ["--output", str(output), "--workers", "0"]
    config = ["--config", str(tiny_config(tmp_path))]
    assert run_train("--dataset", str(tiny_cache), *base, *config, "--max-steps", "2") == 0
    with pytest.raises(UserError, match="--init starts a new run; --resume continues the run"):
        run_train("--dataset", str(tiny_cache), *base, "--resume", "--max-steps", "3", "--init", str(output))
    # The same images preprocessed at another size (`preprocess` rebuilds a cache in place).
    source = open_dataset(tiny_cache.parent / "us")
    prep = dict(preprocess.open_cache(tiny_cache).prep, lr_longer_side=20, patch_size_lr=[20, 20])
    rebuilt = preprocess.build_cache(source, prep, tmp_path / "rebuilt", workers=1)
    with pytest.raises(
        UserError, match=r"preprocessed differently from the run being resumed \(lr_longer_side 16 vs 20\)"
    ):
        run_train("--dataset", str(rebuilt), *base, "--resume", "--max-steps", "3")
    # Another dataset: a traceback (KeyError) before.
    others = make_dataset(
        tmp_path / "others",
        {"x0": {"shape": (24, 32), "lesions": [((12, 8), 3)]}},
        channels=("ultrasound",),
        ending=".png",
    )
    other = preprocess.build_cache(
        open_dataset(others), preprocess.open_cache(tiny_cache).prep, tmp_path / "oc", workers=1
    )
    with pytest.raises(UserError, match=r"lacks 6 case\(s\) of the run being resumed \(us"):
        run_train("--dataset", str(other), *base, "--resume", "--max-steps", "3")
    # A run from before 2026-12-07 recorded labels [1] where a cache now records None (every value > 0):
    # the same arrays, so it resumes.
    checkpoint = torch.load(output / "checkpoint_last.pt", weights_only=False)
    checkpoint["prep"]["labels"] = None
    torch.save(checkpoint, output / "checkpoint_last.pt")
    assert run_train("--dataset", str(tiny_cache), *base, "--resume", "--max-steps", "3") == 0


def test_curves_leave_out_skipped_steps_and_label_the_axes():
    rows = [{"step": k, "loss": 2.0 / k if k != 3 else float("nan"), "val_dice": ""} for k in range(1, 9)]
    rows[-1]["val_dice"], rows[3]["val_dice"] = 0.6, 0.3
    image = curves.render_curves(rows)
    assert image.shape == (400, 720, 3)
    blue = (image[..., 2] > 150) & (image[..., 0] < 100)
    red = (image[..., 0] > 150) & (image[..., 2] < 100)
    assert blue[30:360].sum() > 300 and red[30:360].sum() > 40  # both curves, through the NaN step
    assert blue[:25].any() and red[:25].any()  # the "loss" and "dice" labels above the plot


def test_weight_average_follows_the_weights_and_copies_integer_buffers():
    from SASSRSegmentLib.training.averaging import WeightAverage

    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    average = WeightAverage(net, decay=0.9)
    start = net[0].weight.detach().clone()
    for _ in range(40):
        decay = average.current_decay()
        with torch.no_grad():
            net[0].weight.add_(1.0)
        net[1].num_batches_tracked += 1
        expected = decay * average.net[0].weight + (1 - decay) * net[0].weight
        average.update(net)
        torch.testing.assert_close(average.net[0].weight, expected)
    assert average.current_decay() == pytest.approx(41 / 50)  # still ramping: (1 + n) / (10 + n)
    # Behind the weights by about decay / (1 - decay) steps once ramped up, never ahead of them.
    lag = (net[0].weight - average.net[0].weight).detach().mean()
    assert 0 < float(lag) < 40 and torch.all(average.net[0].weight > start)
    assert int(average.net[1].num_batches_tracked) == 40
    assert not any(p.requires_grad for p in average.net.parameters())


def test_a_weight_average_is_validated_shipped_and_resumed(tiny_cache, tmp_path):
    config = json.loads(tiny_config(tmp_path).read_text()) | {"ema_decay": 0.5, "val_every": 2}
    output = tmp_path / "run"
    common = ("--dataset", str(tiny_cache), "--output", str(output), "--workers", "0")
    assert (
        run_train(*common, "--config", str(write_json(tmp_path / "ema.json", config)), "--max-steps", "2")
        == 0
    )
    first = torch.load(output / "checkpoint_last.pt", weights_only=False)
    assert first["average"]["updates"] == 2
    assert run_train(*common, "--resume", "--max-steps", "4") == 0
    last = torch.load(output / "checkpoint_last.pt", weights_only=False)
    best = torch.load(output / "checkpoint_best.pt", weights_only=False)
    assert last["average"]["updates"] == 4
    key = "encoder.stages.0.0.0.weight"
    # The resumed run validated again (which of the two validations of a tiny random network scores
    # higher is down to rounding); the best one's checkpoint is the average alone, without the
    # optimiser's state.
    validated = [row.split(",")[0] for row in (output / "log.csv").read_text().splitlines() if row[-1] != ","]
    assert validated[1:] == ["2", "4"] and best["step"] in (2, 4) and last["step"] == 4
    assert not {"model", "optimizer", "rng"} & set(best)
    assert not torch.equal(best["average"]["weights"][key], last["model"][key])
    # The bundle holds the average (as fp16), not the step's weights.
    shipped = torch.load(output / "model.pt", weights_only=True)
    assert torch.equal(shipped[key], best["average"]["weights"][key].half())


def test_a_network_learns_its_teachers_mean_probabilities_too(tiny_cache, tmp_path):
    """`teachers`: trained bundles whose averaged probabilities on each LR batch are a second target
    (binary cross-entropy, `loss_kd`); the card names them with their checksums."""
    from SASSRSegmentLib.training import teachers

    common = ("--dataset", str(tiny_cache), "--workers", "0", "--max-steps", "2")
    first = tmp_path / "teacher"
    assert run_train(*common, "--output", str(first), "--config", str(tiny_config(tmp_path))) == 0
    config = json.loads(tiny_config(tmp_path).read_text()) | {"teachers": [str(first)], "loss_kd": 0.5}
    output = tmp_path / "student"
    assert (
        run_train(*common, "--output", str(output), "--config", str(write_json(tmp_path / "kd.json", config)))
        == 0
    )
    kd = [float(r["kd"]) for r in read_log(output) if r["kd"] != ""]
    assert len(kd) == 2 and all(0 < v < 2 for v in kd)
    card, _ = load_bundle(output, torch.device("cpu"))
    assert card["training"]["teachers"] == [
        {"model": str(first), "name": card["name"], "weights_sha256": read_card(first)["weights_sha256"]}
    ]
    # What the teachers give is the mean of their sigmoids, and the loss is BCE against it.
    prep = read_card(first)["preprocessing"]
    taught = teachers.Teachers([str(first), str(output)], prep, torch.device("cpu"))
    lr = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        expected = (torch.sigmoid(taught.nets[0](lr)) + torch.sigmoid(taught.nets[1](lr))) / 2
    torch.testing.assert_close(taught(lr), expected, atol=2e-2, rtol=0)  # bf16 where the CPU has it
    logits = torch.randn(2, 1, 32, 32)
    target = taught(lr)
    manual = -(
        target * torch.nn.functional.logsigmoid(logits)
        + (1 - target) * torch.nn.functional.logsigmoid(-logits)
    )
    torch.testing.assert_close(teachers.distillation_loss(logits, target), manual.mean())
    # A teacher that sees other inputs, or cannot run on the patches, is refused before any step.
    with pytest.raises(UserError, match=r"^teacher .*: its scale, lr_longer_side differ"):
        teachers.Teachers([str(first)], dict(prep, scale=4, lr_longer_side=32), torch.device("cpu"))
    with pytest.raises(
        UserError, match=r"^teacher .* cannot run on the training patches \(2 x 2 LR voxels\)"
    ):
        teachers.Teachers([str(first)], dict(prep, patch_size_lr=[2, 2]), torch.device("cpu"))
    with pytest.raises(UserError, match=r"^teacher nowhere: unknown model 'nowhere'"):
        teachers.Teachers(["nowhere"], prep, torch.device("cpu"))
    # A teacher folder is relative to its config file, and kept absolute for a resumed run.
    (tmp_path / "configs").mkdir()
    relative = write_json(
        tmp_path / "configs" / "kd.json", {"teachers": ["../teacher", "breast-ultrasound-2d"]}
    )
    assert training_config.load_config(relative).teachers == [str(first.resolve()), "breast-ultrasound-2d"]
    with pytest.raises(UserError, match="loss_kd must be >= 0"):
        run_train(*common, "--output", str(tmp_path / "bad"), "--config",
                  str(write_json(tmp_path / "bad.json", config | {"loss_kd": -1.0})))  # fmt: skip


class BrightVoxels(torch.nn.Module):
    """A stand-in network whose HR logits mark bright LR voxels: its Dice depends on the LR input only."""

    def __init__(self):
        super().__init__()
        self.level = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return 8 * (torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest") - self.level)


def test_validation_scores_each_lr_input_and_keeps_the_mean(tmp_path):
    from test_preprocess import prep3d

    from SASSRSegmentLib.runtime.progress import Progress
    from SASSRSegmentLib.training import validation

    lesions = {"a": [((10, 10, 10), 4)], "b": [((9, 12, 10), 3)]}
    cases = {name: {"shape": (22, 22, 22), "lesions": spots} for name, spots in lesions.items()}
    prep = prep3d(patch_size_lr=[8, 8, 8])
    preprocess.build_cache(
        open_dataset(make_dataset(tmp_path / "ds", cases)), prep, tmp_path / "c", 2, workers=1
    )
    cache = preprocess.open_cache(tmp_path / "c")
    hr = torch.from_numpy(cache.normalized(np.asarray(cache.image("a"))))
    # MRI: the LR tissue re-standardised to the HR tissue's mean and spread, as the normaliser does to an
    # LR scan; the background stays 0 and the block average's pattern is kept (an affine map of it).
    interior = normalization.erode(hr[0].numpy() != 0)
    reference = hr[0].numpy()[interior]
    for name in ("block", "thick-slice-5mm"):
        lr = validation.lr_input(hr, name, prep)[0].numpy()
        matrices = degrade.fixed_matrices(name, hr.shape[1:], 2, [1.0, 1.0, 1.0])
        whole = degrade.apply_separable((hr.numpy() != 0).astype(np.float32), matrices)[0] >= 0.999
        # The HR spread, through the gain bound (this image's voxel noise averages away more than a scan's).
        plain = validation.lr_input(hr, name, prep | {"normalization": {"kind": "ct"}})[0].numpy()
        gain = np.clip(reference.std() / plain[whole].std(), *degrade.GAIN_RANGE)
        assert abs(lr[whole].std() - gain * plain[whole].std()) < 0.02 * reference.std(), name
        assert abs(lr[whole].mean() - reference.mean()) < 0.02, name
    plain = lr_from_hr(hr[None], 2)[0]
    block = validation.lr_input(hr, "block", prep)
    assert torch.equal(block == 0, plain == 0)
    whole = lr_from_hr(torch.from_numpy(interior)[None, None].float(), 2)[0, 0] == 1
    fitted = np.polyfit(plain[0][whole].numpy(), block[0][whole].numpy(), 1)
    assert (
        fitted[0] > 1
        and np.abs(np.polyval(fitted, plain[0].numpy()) - block[0].numpy())[block[0] != 0].max() < 0.05
    )
    assert torch.equal(validation.lr_input(hr, "block", prep | {"normalization": {"kind": "ct"}}), plain)

    cfg = config.TrainConfig(val_lr_inputs=["block", "decimate", "thick-slice-5mm"], val_overlap=0.25)
    result = validation.validate(
        BrightVoxels(), cache, ["a", "b"], prep, cfg, torch.device("cpu"), False, Progress("quiet")
    )
    per_input = result["per_input"]
    assert list(per_input) == cfg.val_lr_inputs
    for case in ("a", "b"):
        scores = [per_input[name]["per_case"][case] for name in cfg.val_lr_inputs]
        assert result["per_case"][case] == pytest.approx(np.mean(scores), abs=1e-5)
    assert result["dice_mean"] == pytest.approx(np.mean(list(result["per_case"].values())), abs=1e-5)
    # 5 mm slices smear the small balls along the first axis: fewer bright voxels on them.
    assert per_input["block"]["dice_mean"] > 0.5
    assert per_input["thick-slice-5mm"]["dice_mean"] < per_input["block"]["dice_mean"] - 0.05
    # One input: the result has the shape it always had.
    single = validation.validate(
        BrightVoxels(),
        cache,
        ["a"],
        prep,
        config.TrainConfig(),
        torch.device("cpu"),
        False,
        Progress("quiet"),
    )
    assert set(single) == {"dice_mean", "per_case"}
    assert single["per_case"]["a"] == per_input["block"]["per_case"]["a"]


def test_thick_slice_validation_of_2d_data_is_refused(tiny_cache, tmp_path):
    config_file = write_json(
        tmp_path / "thick.json",
        json.loads(tiny_config(tmp_path).read_text()) | {"val_lr_inputs": ["thick-slice-5mm"]},
    )
    with pytest.raises(UserError, match="thick-slice-5mm needs 3D data; the data is 2D"):
        run_train(
            "--dataset", str(tiny_cache), "--output", str(tmp_path / "run"), "--config", str(config_file)
        )
