"""Dataset reading: every validation error on constructed datasets, label selection, and the split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SASSRSegmentLib.data import datasets as data
from SASSRSegmentLib.runtime.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def write_image(path: Path, array: np.ndarray, spacing=None, origin=None, direction=None) -> None:
    image = sitk.GetImageFromArray(array)
    if spacing is not None:
        image.SetSpacing(spacing)
    if origin is not None:
        image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def blob_label(shape, centres_radii) -> np.ndarray:
    """uint8 label with value-1 balls of the given (centre, radius) in numpy index order."""
    grid = np.indices(shape)
    label = np.zeros(shape, np.uint8)
    for centre, radius in centres_radii:
        dist2 = sum((g - c) ** 2 for g, c in zip(grid, centre))
        label[dist2 <= radius**2] = 1
    return label


def make_dataset(
    root: Path,
    cases: dict[str, dict] | int = 3,
    shape=(12, 16, 16),
    channels=("T1",),
    ending=".nii.gz",
    spacing=None,
    origin=None,
    direction=None,
    labels=None,
) -> Path:
    """A small nnU-Net v2 raw dataset: each case a bright body box with a ball lesion inside.

    `cases` maps name -> overrides ({"shape", "lesions", "seed"}) or is a count.
    """
    if isinstance(cases, int):
        cases = {f"case{i}": {} for i in range(cases)}
    root.mkdir(parents=True, exist_ok=True)
    meta = {
        "name": root.name,
        "channel_names": {str(i): c for i, c in enumerate(channels)},
        "labels": labels or {"background": 0, "lesion": 1},
        "file_ending": ending,
        "numTraining": len(cases),
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    for k, (name, spec) in enumerate(cases.items()):
        s = spec.get("shape", shape)
        rng = np.random.default_rng(spec.get("seed", k))
        lesions = spec.get("lesions", [(tuple(n // 2 for n in s), max(1, min(s) // 5))])
        label = blob_label(s, lesions)
        body = np.zeros(s, np.float32)
        body[tuple(slice(1, n - 1) for n in s)] = 1
        for c in range(len(channels)):
            image = (100 + 20 * rng.standard_normal(s)) * body + 80 * label
            image = image.astype(np.uint8 if ending == ".png" else np.float32)
            write_image(root / "imagesTr" / f"{name}_{c:04d}{ending}", image, spacing, origin, direction)
        write_image(root / "labelsTr" / f"{name}{ending}", label, spacing, origin, direction)
    return root


def problems_of(root: Path, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        data.open_dataset(root, **kwargs)
    return str(info.value)


def test_valid_dataset_opens(tmp_path):
    root = make_dataset(tmp_path / "ds", 3, channels=("T1", "FLAIR"), spacing=(1.0, 1.0, 2.5))
    ds = data.open_dataset(root)
    assert [c.name for c in ds.cases] == ["case0", "case1", "case2"]
    assert ds.channels == ["T1", "FLAIR"] and ds.spatial_dims == 3
    assert [p.name for p in ds.cases[1].images] == ["case1_0000.nii.gz", "case1_0001.nii.gz"]
    assert ds.cases[0].size == (16, 16, 12) and ds.cases[0].spacing == pytest.approx((1.0, 1.0, 2.5))
    images, mask = data.read_case(ds, ds.cases[0])
    assert len(images) == 2 and mask.GetPixelID() == sitk.sitkUInt8
    assert sitk.GetArrayFromImage(mask).sum() > 0


def test_missing_label(tmp_path):
    root = make_dataset(tmp_path / "ds", 2)
    (root / "labelsTr" / "case1.nii.gz").unlink()
    message = problems_of(root)
    assert "case case1: missing label labelsTr/case1.nii.gz" in message
    assert "1 problem" in message


def test_label_without_image(tmp_path):
    root = make_dataset(tmp_path / "ds", 2)
    for f in (root / "imagesTr").glob("case1_*"):
        f.unlink()
    assert "labelsTr/case1.nii.gz: label without image" in problems_of(root)


def test_size_mismatch(tmp_path):
    root = make_dataset(tmp_path / "ds", 2)
    write_image(root / "labelsTr" / "case0.nii.gz", np.zeros((12, 16, 14), np.uint8))
    assert (
        "case case0: image case0_0000.nii.gz and its label differ in size (16, 16, 12) vs (14, 16, 12)"
        in problems_of(root)
    )


def test_geometry_mismatch(tmp_path):
    root = make_dataset(tmp_path / "ds", 2)
    label = sitk.ReadImage(str(root / "labelsTr" / "case1.nii.gz"))
    label.SetOrigin((5.0, 0.0, 0.0))
    sitk.WriteImage(label, str(root / "labelsTr" / "case1.nii.gz"))
    label.SetSpacing((1.0, 1.0, 3.0))
    sitk.WriteImage(label, str(root / "labelsTr" / "case0.nii.gz"))
    message = problems_of(root)
    assert "case case1: image case1_0000.nii.gz and its label differ in origin" in message
    assert "case case0: image case0_0000.nii.gz and its label differ in spacing" in message
    assert "2 problems" in message


def test_empty_folder(tmp_path):
    root = make_dataset(tmp_path / "ds", 1)
    for f in (root / "imagesTr").iterdir():
        f.unlink()
    assert "has no *.nii.gz images" in problems_of(root)
    empty = tmp_path / "nothing"
    empty.mkdir()
    assert "has no dataset.json" in problems_of(empty)


def test_wrong_file_ending_is_explained(tmp_path):
    root = make_dataset(tmp_path / "ds", 1, ending=".mha")
    meta = json.loads((root / "dataset.json").read_text())
    meta["file_ending"] = ".nii.gz"
    (root / "dataset.json").write_text(json.dumps(meta))
    assert "it holds .mha files: fix file_ending" in problems_of(root)


def test_unreadable_file(tmp_path):
    root = make_dataset(tmp_path / "ds", 2)
    (root / "imagesTr" / "case1_0000.nii.gz").write_bytes(b"not an image at all")
    assert "imagesTr/case1_0000.nii.gz: cannot be read as an image" in problems_of(root)


def test_wrong_channel_count(tmp_path):
    root = make_dataset(tmp_path / "ds", 3, channels=("T1", "FLAIR"))
    (root / "imagesTr" / "case0_0001.nii.gz").unlink()
    write_image(root / "imagesTr" / "case2_0002.nii.gz", np.zeros((12, 16, 16), np.float32))
    message = problems_of(root)
    assert "case case0: 1 channel file(s) but dataset.json lists 2: missing channel 0001 (FLAIR)" in message
    assert (
        "case case2: 3 channel file(s) but dataset.json lists 2: unexpected channel file case2_0002.nii.gz"
        in message
    )


def test_badly_named_image(tmp_path):
    root = make_dataset(tmp_path / "ds", 1)
    write_image(root / "imagesTr" / "scan.nii.gz", np.zeros((4, 4, 4), np.float32))
    assert "imagesTr/scan.nii.gz: name must be <case>_<XXXX>.nii.gz" in problems_of(root)


def test_mixed_dimensions_and_rgb(tmp_path):
    root = make_dataset(tmp_path / "ds", 2, ending=".nrrd")
    write_image(root / "imagesTr" / "flat_0000.nrrd", np.zeros((16, 16), np.float32))
    write_image(root / "labelsTr" / "flat.nrrd", np.zeros((16, 16), np.uint8))
    rgb = sitk.GetImageFromArray(np.zeros((16, 16, 12, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(root / "imagesTr" / "case0_0000.nrrd"))
    message = problems_of(root)
    assert "cases mix dimensionalities (2D: 1 (e.g. flat), 3D: 2 (e.g. case0))" in message
    assert "imagesTr/case0_0000.nrrd: 3 components per pixel" in message


def test_all_problems_reported_together(tmp_path):
    root = make_dataset(tmp_path / "ds", 4)
    (root / "labelsTr" / "case0.nii.gz").unlink()
    (root / "imagesTr" / "case1_0000.nii.gz").write_bytes(b"garbage")
    write_image(root / "labelsTr" / "case2.nii.gz", np.zeros((12, 16, 14), np.uint8))
    lines = problems_of(root).splitlines()
    assert lines[0].endswith(": 3 problems:") and len(lines) == 4


def test_dataset_json_errors(tmp_path):
    root = make_dataset(tmp_path / "ds", 1)
    (root / "dataset.json").write_text("{broken")
    assert "is not valid JSON" in problems_of(root)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"1": "T1"}, "file_ending": "nii.gz"}))
    message = problems_of(root)
    assert '"channel_names" keys must be "0".."0"' in message and '"file_ending" must be' in message


def test_label_selection(tmp_path):
    labels = {"background": 0, "oedema": 1, "enhancing": 2}
    root = make_dataset(tmp_path / "ds", 1, labels=labels)
    array = np.zeros((12, 16, 16), np.uint8)
    array[2:5, 2:5, 2:5] = 1
    array[6:8, 6:8, 6:8] = 2
    write_image(root / "labelsTr" / "case0.nii.gz", array)
    for selection, expected in ((None, 27 + 8), ([2], 8), (["oedema"], 27), ([1, "enhancing"], 35)):
        ds = data.open_dataset(root, labels=selection)
        _, mask = data.read_case(ds, ds.cases[0])
        assert sitk.GetArrayFromImage(mask).sum() == expected, selection
    assert "label value 3 is not in dataset.json labels [0, 1, 2]" in problems_of(root, labels=[3])
    assert "label name 'tumour' is not in dataset.json labels" in problems_of(root, labels=["tumour"])
    assert "label value 0 is background" in problems_of(root, labels=[0])
    # A dataset.json that declares no labels leaves every value open to a selection, as resolving it does.
    meta = json.loads((root / "dataset.json").read_text())
    del meta["labels"]
    (root / "dataset.json").write_text(json.dumps(meta))
    ds = data.open_dataset(root, labels=[2])
    assert sitk.GetArrayFromImage(data.read_case(ds, ds.cases[0])[1]).sum() == 8


def test_fractional_label_is_refused(tmp_path):
    root = make_dataset(tmp_path / "ds", 1)
    write_image(root / "labelsTr" / "case0.nii.gz", np.full((12, 16, 16), 0.5, np.float32))
    ds = data.open_dataset(root)
    with pytest.raises(UserError, match="label values must be integers"):
        data.read_case(ds, ds.cases[0])


def test_split_is_reproducible_and_keeps_groups():
    names = [f"c{i:02d}" for i in range(20)]
    groups = [["c03", "c04", "c05"], ["c05", "c11"], ["c07", "nonexistent"]]
    first = data.make_split(names, 0.25, seed=1, groups=groups)
    assert first == data.make_split(names, 0.25, seed=1, groups=groups)
    seen_val_sets = set()
    for seed in range(30):
        split = data.make_split(names, 0.25, seed=seed, groups=groups)
        assert sorted(split["train"] + split["val"]) == names
        assert 1 <= len(split["val"]) <= 5
        together = {"c03", "c04", "c05", "c11"}
        assert together <= set(split["val"]) or together <= set(split["train"])
        seen_val_sets.add(tuple(split["val"]))
    assert len(seen_val_sets) > 10  # the seed matters
    assert data.make_split(["a", "b"], 0.2)["val"] in (["a"], ["b"])
    assert data.make_split(names, 0.0)["val"] == []


def test_split_file_checks(tmp_path):
    names = ["a", "b", "c", "d"]
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["a", "b"], "val": ["c"]}))
    assert data.read_split_file(path, names) == {"train": ["a", "b"], "val": ["c"]}
    path.write_text(json.dumps([{"train": ["a"], "val": ["b"]}, {"train": ["c"], "val": ["d"]}]))
    assert data.read_split_file(path, names, fold=1) == {"train": ["c"], "val": ["d"]}
    path.write_text(json.dumps({"train": ["a", "x"], "val": ["a", "b"]}))
    with pytest.raises(UserError) as info:
        data.read_split_file(path, names, groups=[["b", "c"]])
    message = str(info.value)
    assert "train lists 1 case(s) not in the dataset: x" in message
    assert "1 case(s) are on both sides: a" in message
    path.write_text(json.dumps({"train": ["a", "c"], "val": ["b"]}))
    with pytest.raises(UserError, match="same-patient cases b, c are split between train and val"):
        data.read_split_file(path, names, groups=[["b", "c"]])
    path.write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(UserError, match="split file .* cannot be read as JSON"):
        data.read_split_file(path, names)
    with pytest.raises(UserError, match="group file .* cannot be read as JSON"):
        data.read_groups(path)
    with pytest.raises(UserError, match="cannot be read as JSON"):
        data.read_split_file(tmp_path / "absent.json", names)


def test_brain_config_split_keeps_the_same_patient_together(shared_data):
    root = shared_data / "Dataset001_BraTSFLAIR"
    names = sorted(p.name[: -len(".nii.gz")] for p in (root / "labelsTr").glob("*.nii.gz"))
    config = json.loads((REPO / "configs" / "brain-tumour-flair-3d.json").read_text())
    assert ["brats_2013_pat0006_1", "Brats18_2013_20_1"] in config["groups"]
    split = data.read_split_file(REPO / "configs" / config["split_file"], names, config["groups"])
    assert sorted(split["train"] + split["val"]) == names
    for seed in range(10):
        random_split = data.make_split(names, 0.2, seed, config["groups"])
        side = [s for s in ("train", "val") if "brats_2013_pat0006_1" in random_split[s]][0]
        assert "Brats18_2013_20_1" in random_split[side]
