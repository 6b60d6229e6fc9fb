"""`evaluate`: LR synthesis as in training, the interpolation baseline, the same path as `segment`."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SASSRSegmentLib import cli
from SASSRSegmentLib.data import datasets
from SASSRSegmentLib.evaluation import metrics, scoring
from SASSRSegmentLib.evaluation.card import TOLERANCE, check_against_card, robustness_section
from SASSRSegmentLib.evaluation.report import format_reports
from SASSRSegmentLib.evaluation.scoring import (
    ScoringOptions,
    assemble_result,
    interpolation_baseline,
    score_cases,
    synthesise_case,
)
from SASSRSegmentLib.io import geometry
from SASSRSegmentLib.io.geometry import Grid, hr_grid
from SASSRSegmentLib.model.bundle import load_bundle
from SASSRSegmentLib.runtime.errors import UserError
from SASSRSegmentLib.runtime.progress import Progress


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _case(seed: int, size=(21, 20, 13)):
    rng = np.random.default_rng(seed)
    zyx = np.stack(np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij"), -1)
    centre = np.asarray(size[::-1]) / 2 + rng.uniform(-2, 2, 3)
    label = (np.linalg.norm(zyx - centre, axis=-1) < 4 + seed).astype(np.uint8)
    image = (200 * label + rng.normal(300, 20, label.shape)).astype(np.int16)
    images = []
    for array in (image, label):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing((1.0, 1.0, 1.2))
        img.SetOrigin((-5.0, 7.0, 2.0))
        images.append(img)
    return images


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "Dataset900_Toy"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    meta = {"channel_names": {"0": "FLAIR"}, "labels": {"background": 0, "lesion": 1}, "file_ending": ".nrrd"}
    (root / "dataset.json").write_text(json.dumps(meta))
    for k in range(3):
        image, label = _case(k)
        sitk.WriteImage(image, str(root / "imagesTr" / f"case{k}_0000.nrrd"))
        sitk.WriteImage(label, str(root / "labelsTr" / f"case{k}.nrrd"))
    return root


@pytest.fixture
def model(tiny_bundle_3d, tmp_path) -> Path:
    """The tiny bundle with a training split in its card (the card is not covered by the weights checksum)."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_bundle_3d, folder)
    card = json.loads((folder / "model.json").read_text())
    card["training"] = {"split": {"train": ["case0"], "val": ["case1", "case2"]}}
    (folder / "model.json").write_text(json.dumps(card))
    return folder


def test_lr_synthesis_follows_the_grid_rule():
    image, label = _case(0)
    lr, hr_label, hr_image = synthesise_case(image, label, 2)
    assert hr_image.GetSize() == (20, 20, 12) and hr_label.GetSize() == (20, 20, 12)
    assert hr_grid(Grid.from_image(lr), 2) == Grid.from_image(hr_image)
    block = sitk.GetArrayFromImage(hr_image)[2:4, 4:6, 6:8].astype(np.float64).mean()
    assert sitk.GetArrayFromImage(lr)[1, 2, 3] == pytest.approx(block, rel=1e-6)


def test_interpolation_baseline():
    label = np.zeros((8, 12, 10), np.uint8)
    label[2:6] = 1  # a slab aligned with the 2x2x2 blocks: interpolation recovers it exactly
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(interpolation_baseline(sitk.GetImageFromArray(label), 2)), label
    )
    label[:] = 0
    label[2:6, 4:10, 2:8] = 1  # an aligned box loses its corners (0.75^3 < 0.5): only the 8 corner voxels
    baseline = sitk.GetArrayFromImage(interpolation_baseline(sitk.GetImageFromArray(label), 2))
    assert (
        np.array_equal(baseline <= label, np.ones_like(label, bool))
        and int(label.sum() - baseline.sum()) == 8
    )
    label[:] = 0
    label[3, 5, 3] = 1  # one voxel is an eighth of a block: lost even by a perfect LR mask
    assert not sitk.GetArrayFromImage(interpolation_baseline(sitk.GetImageFromArray(label), 2)).any()
    _, ball = _case(2)
    baseline = interpolation_baseline(ball, 2)
    assert 0.85 < metrics.overlap(baseline, geometry.crop_to_multiple(ball, 2))["dice"] < 1.0


def test_evaluate_scores_the_validation_cases_like_segment(dataset, model, tmp_path, capsys):
    out = tmp_path / "scores.json"
    args = ["evaluate", "--model", str(model), "--dataset", str(dataset), "--json", str(out)]
    assert cli.main([*args, "--baseline-interpolation", "--progress", "quiet"]) == 0
    printed = capsys.readouterr().out
    assert "mean" in printed and "small < 1 mL" in printed and "interp.Dice" in printed
    result = json.loads(out.read_text())
    assert list(result["cases"]) == ["case1", "case2"] and result["split"] == "val"
    assert set(result["summary"]["mean"]) == set(metrics.CASE_METRICS)
    assert result["baseline"]["summary"]["mean"]["dice"] > 0.8
    # The same numbers as segmenting the synthesised LR image with the `segment` command.
    image, label = _case(1)
    lr, hr_label, _ = synthesise_case(image, label, 2)
    sitk.WriteImage(lr, str(tmp_path / "lr.nrrd"))
    seg = [
        "segment",
        str(tmp_path / "lr.nrrd"),
        "-o",
        str(tmp_path / "m.nrrd"),
        "--model",
        str(model),
        "--quiet",
    ]
    assert cli.main(seg) == 0
    mask = sitk.ReadImage(str(tmp_path / "m.nrrd"))
    mask.CopyInformation(hr_label)
    assert metrics.overlap(mask, hr_label)["dice"] == pytest.approx(
        result["cases"]["case1"]["dice"], abs=1e-9
    )
    # The JSON is strict: NaN is written as null.
    assert "NaN" not in out.read_text()
    assert cli.main(args) == 2  # exists, no --overwrite


def test_labels_stored_as_255_count_in_evaluate_as_in_training(dataset, model, tmp_path):
    # Training reads every value > 0 as lesion; the card had recorded the values dataset.json declares
    # ([1]), so `evaluate` of a model trained on 0/255 masks found no reference lesion (Dice 0, recall nan).
    from SASSRSegmentLib.data.cache import make_prep
    from SASSRSegmentLib.data.datasets import open_dataset
    from SASSRSegmentLib.training.config import TrainConfig

    for path in (dataset / "labelsTr").iterdir():
        sitk.WriteImage(sitk.ReadImage(str(path)) * 255, str(path))
    prep = make_prep(TrainConfig(), open_dataset(dataset))
    assert prep["labels"] is None
    card = json.loads((model / "model.json").read_text())
    card["preprocessing"]["labels"] = prep["labels"]
    (model / "model.json").write_text(json.dumps(card))
    out = tmp_path / "scores.json"
    args = ["evaluate", "--model", str(model), "--dataset", str(dataset), "--json", str(out)]
    assert cli.main([*args, "--baseline-interpolation", "--progress", "quiet"]) == 0
    assert json.loads(out.read_text())["baseline"]["summary"]["mean"]["dice"] > 0.8


def test_labels_the_dataset_does_not_declare_are_an_error_or_scored_as_lesion(
    dataset, model, tmp_path, capsys
):
    # The card names lesion label 1. Masks of 0/255 under a dataset.json saying 1 scored as empty
    # references (Dice 0, exit 0); a dataset.json saying 255 was refused in two lines of jargon.
    for path in (dataset / "labelsTr").iterdir():
        sitk.WriteImage(sitk.ReadImage(str(path)) * 255, str(path))
    args = ["evaluate", "--model", str(model), "--dataset", str(dataset), "--progress", "quiet"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "holds label value(s) 255, which dataset.json does not declare (0, 1); fix the labels or dataset.json"
    )
    meta = json.loads((dataset / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "lesion": 255}
    (dataset / "dataset.json").write_text(json.dumps(meta))
    out = tmp_path / "scores.json"
    assert cli.main([*args[:-2], "--progress", "json", "--baseline-interpolation", "--json", str(out)]) == 0
    assert (
        "the model's lesion label(s) [1] are not in this dataset.json ([0, 255])" in capsys.readouterr().out
    )
    result = json.loads(out.read_text())
    assert result["baseline"]["summary"]["mean"]["dice"] > 0.8
    # The mean of false-positive counts keeps its fraction in the table.
    result["summary"]["mean"]["false_positive_lesions"] = 0.3
    mean_row = [r for r in format_reports(result, ["block"]).splitlines() if r.startswith("mean")][0]
    assert mean_row.split()[7] == "0.30"


def test_evaluate_errors(dataset, model, tiny_bundle_2d, tiny_bundle_3d, capsys):
    base = ["evaluate", "--dataset", str(dataset), "--progress", "quiet"]
    assert cli.main([*base, "--model", str(tiny_bundle_3d)]) == 2
    assert "use --split all" in capsys.readouterr().err
    assert cli.main([*base, "--model", str(tiny_bundle_2d), "--split", "all"]) == 2
    assert "is 3D but model" in capsys.readouterr().err
    card = json.loads((model / "model.json").read_text())
    card["training"]["split"]["val"] = ["case1", "elsewhere"]
    (model / "model.json").write_text(json.dumps(card))
    assert cli.main([*base, "--model", str(model)]) == 2
    assert "elsewhere" in capsys.readouterr().err


def test_evaluate_on_real_ultrasound_cases(shared_data, tmp_path, tiny_bundle_2d, capsys):
    source = shared_data / "Dataset002_BUSI"
    if not source.is_dir():
        pytest.skip(f"{source} is absent")
    root = tmp_path / "Dataset902_BUSIsubset"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    shutil.copy(source / "dataset.json", root / "dataset.json")
    names = [
        sorted((source / "labelsTr").glob(f"{kind}_*.png"))[0].name[:-4] for kind in ("benign", "malignant")
    ]
    for name in names:
        (root / "imagesTr" / f"{name}_0000.png").symlink_to(source / "imagesTr" / f"{name}_0000.png")
        (root / "labelsTr" / f"{name}.png").symlink_to(source / "labelsTr" / f"{name}.png")
    out = tmp_path / "busi.json"
    args = [
        "evaluate",
        "--model",
        str(tiny_bundle_2d),
        "--dataset",
        str(root),
        "--split",
        "all",
        "--json",
        str(out),
    ]
    assert cli.main([*args, "--baseline-interpolation", "--progress", "quiet"]) == 0
    result = json.loads(out.read_text())
    assert set(result["cases"]) == set(names)
    assert "image area" in result["summary"]["strata_definition"]
    for scores in result["baseline"]["cases"].values():
        assert 0.9 < scores["dice"] <= 1.0  # a perfect LR mask, interpolated: close but not exact
    assert all(math.isfinite(c["dice"]) for c in result["cases"].values())


def test_models_lists_card_summaries(tiny_bundle_2d, model, monkeypatch, capsys):
    from SASSRSegmentLib.commands import models

    monkeypatch.setattr(models, "bundled_models", lambda: {"tiny-2d": tiny_bundle_2d, "toy-3d": model})
    card = json.loads((model / "model.json").read_text())
    table = {"block": {"cases": {"a": 0.8, "b": 0.7}}, "decimate": {"cases": {"a": 0.6, "b": 0.7}}}
    result = {"split": "val", "threshold": 0.5, "tta": False, "robustness": table}
    card["robustness"] = robustness_section(result, "evaluate", [])
    (model / "model.json").write_text(json.dumps(card))
    assert cli.main(["models"]) == 0
    assert "(0.650-0.750 over 2 LR inputs)" in capsys.readouterr().out
    assert cli.main(["models", "--json"]) == 0
    # Listed by the name --model takes, the folder's (the card's had been shown: "tiny-3d" for toy-3d).
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["tiny-2d"]["spatial_dims"] == 2 and rows["tiny-2d"]["lr_longer_side"] == 24
    assert rows["toy-3d"]["lr_spacing_mm"] == [2.0, 2.0, 2.0] and rows["toy-3d"]["weights"] == "ok"
    assert rows["toy-3d"]["card_name"] == "tiny-3d"
    assert rows["toy-3d"]["robustness_dice"] == {"block": 0.75, "decimate": 0.65}
    assert rows["tiny-2d"]["robustness_dice"] == {}  # a card without the table
    weights = (model / "model.pt").read_bytes()
    (model / "model.pt").write_bytes(weights[: len(weights) // 2])  # a broken copy was listed as healthy
    assert cli.main(["models"]) == 0
    damaged = capsys.readouterr().out
    assert "toy-3d (card name 'tiny-3d'): 3D, x2, LR 2x2x2 mm" in damaged and "WEIGHTS DAMAGED" in damaged
    # A bundle put together by hand has no checksum: its weights are loaded to be judged.
    (model / "model.json").write_text(json.dumps({k: v for k, v in card.items() if k != "weights_sha256"}))
    assert cli.main(["models"]) == 0
    assert "WEIGHTS DAMAGED (cannot load model weights" in capsys.readouterr().out
    (model / "model.pt").write_bytes(weights)
    assert cli.main(["models", "--json"]) == 0
    assert {r["name"]: r for r in json.loads(capsys.readouterr().out)}["toy-3d"]["weights"] == "ok"
    (model / "model.pt").unlink()
    assert cli.main(["models"]) == 0
    text = capsys.readouterr().out
    assert "tiny-2d: 2D, x2, LR longer side 24 px" in text and "tiny-2d (card" not in text
    assert "toy-3d (card name 'tiny-3d'): 3D, x2, LR 2x2x2 mm" in text and "WEIGHTS MISSING" in text


def test_evaluate_scores_each_lr_input_and_tabulates_robustness(dataset, model, tmp_path, capsys):
    out = tmp_path / "robust.json"
    args = ["evaluate", "--model", str(model), "--dataset", str(dataset), "--progress", "quiet"]
    assert cli.main([*args, "--lr-input", "block,thick-slice-5mm,hr", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "LR input: thick-slice-5mm" in printed and "worst case" in printed
    result = json.loads(out.read_text())
    assert list(result["robustness"]) == ["block", "thick-slice-5mm", "hr"]
    for name, row in result["robustness"].items():
        dice = [result["generators"][name]["cases"][c]["dice"] for c in ("case1", "case2")]
        assert row["min_dice"] == pytest.approx(min(dice)) and row["mean_dice"] == pytest.approx(
            np.mean(dice)
        )
    # The first generator is the one the top-level scores describe; block is the plain evaluation.
    plain = tmp_path / "plain.json"
    assert cli.main([*args, "--json", str(plain)]) == 0
    assert json.loads(plain.read_text())["cases"] == result["cases"]
    # The thick slices made a different input, so (an untrained network) a different mask.
    assert result["robustness"]["thick-slice-5mm"]["cases"] != result["robustness"]["block"]["cases"]


def test_evaluate_lr_input_errors(dataset, model, tiny_bundle_2d, capsys):
    base = ["evaluate", "--dataset", str(dataset), "--progress", "quiet"]
    assert cli.main([*base, "--model", str(model), "--lr-input", "block,bicubic"]) == 2
    err = capsys.readouterr().err
    assert (
        "unknown generator bicubic" in err and "gaussian-linear" in err and len(err.strip().splitlines()) == 1
    )
    assert (
        cli.main([*base, "--model", str(tiny_bundle_2d), "--lr-input", "thick-slice-5mm", "--split", "all"])
        == 2
    )
    assert "3D models only" in capsys.readouterr().err
    assert cli.main([*base, "--model", str(model), "--lr-input", "all,block"]) == 2
    assert "all stands alone" in capsys.readouterr().err  # it had said all was unknown, "choose ... or all"
    # A name given twice had been scored twice (twice the time) and reported once.
    assert scoring.lr_inputs("block, kspace,block", 3) == ["block", "kspace"]


def test_check_card_reruns_the_cards_robustness_table(dataset, model, tmp_path, capsys):
    args = ["evaluate", "--model", str(model), "--dataset", str(dataset), "--progress", "quiet"]
    card_path = model / "model.json"
    card = json.loads(card_path.read_text())
    assert cli.main([*args, "--check-card"]) == 2
    assert "holds no robustness table" in capsys.readouterr().err
    measured = tmp_path / "measured.json"
    assert cli.main([*args, "--lr-input", "block,thick-slice-5mm", "--json", str(measured)]) == 0
    capsys.readouterr()
    card["robustness"] = robustness_section(json.loads(measured.read_text()), "evaluate", ["thick-slice-5mm"])
    card_path.write_text(json.dumps(card))
    rows = card["robustness"]["inputs"]
    assert set(rows) == {"block", "thick-slice-5mm"} and set(rows["block"]["cases"]) == {"case1", "case2"}
    assert rows["block"]["cases"] != rows["thick-slice-5mm"]["cases"]  # two inputs, two sets of numbers

    assert cli.main([*args, "--lr-input", "block,thick-slice-5mm", "--check-card"]) == 0
    assert "agrees with this evaluation: 4 case scores" in capsys.readouterr().out
    assert cli.main([*args, "--check-card"]) == 0  # one input checks its own rows
    assert "2 case scores" in capsys.readouterr().out
    json_args = [a if a != "quiet" else "json" for a in args]
    assert cli.main([*json_args, "--check-card"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # every line JSON
    assert any("agrees with this evaluation: 2 case scores" in str(r) for r in records)

    recorded = rows["thick-slice-5mm"]["cases"]["case2"]
    rows["thick-slice-5mm"]["cases"]["case2"] = recorded + 2 * TOLERANCE * (1 if recorded < 0.5 else -1)
    card_path.write_text(json.dumps(card))
    assert cli.main([*args, "--lr-input", "block,thick-slice-5mm", "--check-card"]) == 1
    err = capsys.readouterr().err.strip()
    assert "differs from this evaluation in 1 of 4" in err and "thick-slice-5mm case2" in err
    assert len(err.splitlines()) == 1
    # Settings the table was not measured with are refused before anything is scored.
    assert cli.main([*args, "--check-card", "--tta"]) == 2
    assert "measured with tta False" in capsys.readouterr().err
    assert cli.main([*args, "--check-card", "--split", "all"]) == 2
    assert "split 'val'" in capsys.readouterr().err


def test_a_robustness_section_records_each_input_and_refuses_an_unscored_held_out_one():
    result = {
        "split": "val",
        "threshold": 0.5,
        "tta": False,
        "robustness": {
            "block": {"cases": {"a": 0.81234, "b": 0.5}},
            "lanczos": {"cases": {"a": 0.7, "b": 0.6}},
        },
    }
    section = robustness_section(result, "cmd", ["lanczos"])
    assert section["inputs"]["block"] == {
        "mean_dice": 0.6562,
        "min_dice": 0.5,
        "cases": {"a": 0.8123, "b": 0.5},
    }
    assert section["held_out_of_training"] == ["lanczos"] and section["command"] == "cmd"
    with pytest.raises(UserError, match="kspace were not scored"):
        robustness_section(result, "cmd", ["kspace"])


@pytest.mark.parametrize("name", ["brain-tumour-flair-3d", "breast-ultrasound-2d"])
def test_the_bundled_cards_robustness_numbers_come_out_of_evaluate(name, shared_data):
    """The first validation cases of each bundled card, rescored as `evaluate --check-card` scores them."""
    card, net = load_bundle(name, torch.device("cpu"), for_prediction=True)
    table = card["robustness"]
    dataset = datasets.open_dataset(
        shared_data / card["training"]["dataset"], labels=card["preprocessing"]["labels"]
    )
    names = list(table["inputs"]["block"]["cases"])[:2]
    options = ScoringOptions()
    scores = score_cases(
        dataset, names, net, card, torch.device("cpu"), ["block"], options, Progress("quiet")
    )
    result = assemble_result(scores, card, ["block"], options, name, str(dataset.root), "val")
    assert check_against_card(result, card) == (2, [])
