"""User mistakes in the inputs of `train` and `preprocess`: each is one plain `error:` line, before
anything is written."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_data import make_dataset, write_image
from test_train import TINY_2D_PREP, run_train, tiny_config, write_json

from SASSRSegmentLib.commands import preprocess as preprocess_command
from SASSRSegmentLib.data import cache, datasets
from SASSRSegmentLib.inference.pipeline import card_threshold
from SASSRSegmentLib.runtime.errors import UserError
from SASSRSegmentLib.training import config


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    """Three small 2D 8-bit cases (us0..us2), preprocessed: the commands' errors come before training."""
    base = tmp_path_factory.mktemp("inputs")
    root = make_dataset(
        base / "us",
        {f"us{i}": {"shape": (24, 32)} for i in range(3)},
        channels=("ultrasound",),
        ending=".png",
    )
    return cache.build_cache(datasets.open_dataset(root), TINY_2D_PREP, base / "cache", workers=1)


def config_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        config.load_config(path)
    return str(info.value)


def train_error(tiny_cache: Path, output: Path, *argv: str) -> str:
    """The train command's error for these extra arguments; it must not have made `output`."""
    with pytest.raises(UserError) as info:
        run_train(
            "--dataset", str(tiny_cache), "--output", str(output),
            "--config", str(tiny_config(output.parent)), "--max-steps", "1", *argv,
        )  # fmt: skip
    assert not output.exists()
    return str(info.value)


def run_preprocess(root: Path, output: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    preprocess_command.add_arguments(parser)
    args = parser.parse_args(["--dataset", str(root), "--output", str(output), "--workers", "1", *argv])
    args.progress = "quiet"
    return preprocess_command.run(args)


def test_a_threshold_outside_0_1_is_refused(tmp_path):
    assert "threshold must lie strictly between 0 and 1, got 1.5" in config_error(
        tmp_path, '{"threshold": 1.5}'
    )
    assert "threshold must lie strictly between 0 and 1, got 0" in config_error(tmp_path, '{"threshold": 0}')


def test_a_hand_edited_card_threshold_is_one_plain_error():
    with pytest.raises(UserError) as info:
        card_threshold({"name": "my-model", "threshold": "high"})
    message = str(info.value)
    assert 'model my-model: threshold "high" in its model.json' in message and "\n" not in message
    with pytest.raises(UserError, match="threshold 1.5"):
        card_threshold({"name": "my-model", "threshold": 1.5})
    assert card_threshold({"threshold": "high"}, 0.3) == 0.3
    assert card_threshold({}) == 0.5


def test_dataset_json_labels_as_a_list_is_refused(tmp_path):
    root = make_dataset(tmp_path / "ds", 1, labels=[0, 1])
    with pytest.raises(UserError, match='"labels" must map each label name to its value'):
        datasets.open_dataset(root)


def test_non_finite_numbers_in_a_config_are_refused(tmp_path):
    message = config_error(tmp_path, '{"learning_rate": NaN, "lr_spacing": [2, Infinity, 2], "p_fg": NaN}')
    assert "learning_rate must be finite, got NaN" in message
    assert "lr_spacing must be finite, got [2, Infinity, 2]" in message
    assert "p_fg must be in" not in message  # one problem per key


def test_negative_seed_is_refused_before_the_run_folder_exists(tiny_cache, tmp_path):
    message = train_error(tiny_cache, tmp_path / "run", "--seed", "-5")
    assert "seed must be between 0 and 4294967295, got -5" in message
    assert "split_seed must be between" in config_error(tmp_path, '{"split_seed": -1}')


@pytest.mark.parametrize("minutes", ["0", "-1"])
def test_non_positive_max_minutes_is_refused(tiny_cache, tmp_path, minutes):
    assert f"max_minutes must be > 0, got {float(minutes)}" in train_error(
        tiny_cache, tmp_path / "run", "--max-minutes", minutes
    )


def test_non_positive_max_steps_is_refused(tiny_cache, tmp_path):
    assert "max_steps must be >= 1, got 0" in train_error(tiny_cache, tmp_path / "run", "--max-steps", "0")


def test_a_split_file_without_validation_cases_is_refused(tmp_path):
    path = write_json(tmp_path / "split.json", {"train": ["a"], "val": []})
    with pytest.raises(UserError, match="the validation side is empty; list at least one validation case"):
        datasets.read_split_file(path, ["a", "b"])


def test_a_refused_split_leaves_no_run_folder(tiny_cache, tmp_path):
    split = write_json(tmp_path / "split.json", {"train": ["us0"], "val": []})
    assert "the validation side is empty" in train_error(
        tiny_cache, tmp_path / "run", "--split-file", str(split)
    )


def test_a_split_file_is_read_before_the_preprocessing(tmp_path):
    """A copied config naming a split file that is not there had failed only once the whole dataset had
    been preprocessed into the run's folder."""
    root = make_dataset(tmp_path / "us", 3, shape=(24, 32), channels=("ultrasound",), ending=".png")
    for split, message in (
        (tmp_path / "missing.json", "cannot be read as JSON"),
        (
            write_json(tmp_path / "wrong.json", {"training": ["case0"]}),
            'must be {"train": [...], "val": [...]}',
        ),
    ):
        with pytest.raises(UserError, match=f"^split file {re.escape(str(split))}: {re.escape(message)}"):
            run_train("--dataset", str(root), "--output", str(tmp_path / "run"), "--split-file", str(split))
        assert not (tmp_path / "run").exists()
    both = write_json(tmp_path / "both.json", {"train": ["case0", "case1"], "val": ["case1"]})
    with pytest.raises(UserError) as info:
        datasets.read_split_file(both, ["case0", "case1"])
    assert str(info.value).splitlines() == [
        f"split file {both}: 1 problem:",
        "  1 case(s) are on both sides: case1",
    ]


def test_a_dataset_without_lesions_is_refused(tmp_path):
    """Every mask 0 (a label export gone wrong) had trained and shipped a bundle of validation Dice 0."""
    cases = {f"us{i}": {"shape": (24, 32), "lesions": []} for i in range(3)}
    root = make_dataset(tmp_path / "us", cases, channels=("ultrasound",), ending=".png")
    with pytest.raises(UserError, match=r"^none of the 2 training cases has a lesion"):
        run_train(
            "--dataset", str(root), "--output", str(tmp_path / "run"),
            "--config", str(tiny_config(tmp_path)), "--max-steps", "2",
        )  # fmt: skip
    assert not (tmp_path / "run" / "model.json").exists()


def test_a_group_file_naming_unknown_cases_is_refused(tiny_cache, tmp_path):
    groups = write_json(tmp_path / "groups.json", [["us0", "zzz"]])
    message = train_error(tiny_cache, tmp_path / "run", "--group-file", str(groups))
    assert message == f"group file {groups}: 1 case(s) not in the dataset: zzz"
    root = make_dataset(tmp_path / "ds", 2)
    groups = write_json(tmp_path / "raw-groups.json", [["case0", "zzz"]])
    with pytest.raises(UserError, match="1 case\\(s\\) not in the dataset: zzz"):
        run_preprocess(root, tmp_path / "cache", "--group-file", str(groups))
    assert not (tmp_path / "cache").exists()


def test_problem_counts_read_as_english():
    with pytest.raises(UserError) as info:
        datasets.fail(["x is wrong"], "the options")
    assert str(info.value).splitlines()[0] == "the options: 1 problem:"
    with pytest.raises(UserError) as info:
        datasets.fail(["x", "y"], "dataset ds")
    assert str(info.value).splitlines()[0] == "dataset ds: 2 problems:"


def test_geometry_mismatches_show_plain_numbers(tmp_path):
    root = make_dataset(tmp_path / "ds", 3, spacing=(1.0, 1.0, 2.5), origin=(1.0, 2.0, 3.0))
    label = sitk.ReadImage(str(root / "labelsTr" / "case0.nii.gz"))
    label.SetOrigin((2.5, 2.0, -3.0))
    sitk.WriteImage(label, str(root / "labelsTr" / "case0.nii.gz"))
    label.SetSpacing((1.0, 1.0 / 3, 2.5))
    sitk.WriteImage(label, str(root / "labelsTr" / "case1.nii.gz"))
    label = sitk.ReadImage(str(root / "labelsTr" / "case2.nii.gz"))
    label.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))
    sitk.WriteImage(label, str(root / "labelsTr" / "case2.nii.gz"))
    with pytest.raises(UserError) as info:
        datasets.open_dataset(root)
    message = str(info.value)
    assert "differ in origin (1, 2, 3) vs (2.5, 2, -3)" in message
    assert "differ in spacing (1, 1, 2.5) vs (1, 0.3333, 2.5)" in message
    # It had read "differ in direction cosines differ".
    assert "differ in direction (1, 0, 0, 0, 1, 0, 0, 0, 1) vs (0, 1, 0, 1, 0, 0, 0, 0, 1)" in message
    assert "np." not in message


def test_a_failed_preprocess_leaves_no_empty_cache_folder(tmp_path):
    root = make_dataset(tmp_path / "ds", 1)
    write_image(root / "labelsTr" / "case0.nii.gz", np.full((12, 16, 16), 0.5, np.float32))
    with pytest.raises(UserError, match="label values must be integers"):
        run_preprocess(root, tmp_path / "new" / "cache")
    assert not (tmp_path / "new" / "cache").exists()
    given = tmp_path / "given"
    given.mkdir()
    with pytest.raises(UserError, match="label values must be integers"):
        run_preprocess(root, given)
    assert given.is_dir()  # the user's own folder stays


def test_a_valid_group_file_is_accepted(tmp_path):
    root = make_dataset(tmp_path / "ds", 2)
    groups = write_json(tmp_path / "groups.json", [["case0", "case1"]])
    assert run_preprocess(root, tmp_path / "cache", "--group-file", str(groups)) == 0
    assert json.loads((tmp_path / "cache" / "cache.json").read_text())["groups"] == [["case0", "case1"]]
