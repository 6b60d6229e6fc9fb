"""nnU-Net v2 raw datasets: reading, up-front validation, label selection and the train/validation split.

Layout: `dataset.json` (`channel_names`, `labels`, `file_ending`), `imagesTr/<case>_<XXXX><ending>` (one
file per channel XXXX), `labelsTr/<case><ending>`. Any format SimpleITK reads works, 2D or 3D.

SimpleITK is imported only inside the functions that read raw files: training from a preprocessed cache
uses the split helpers of this module on machines that have torch and numpy but no SimpleITK.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..io.files import read_json
from ..runtime.errors import UserError

# Geometry differences below these are rounding in file headers, not a different grid.
SPACING_RTOL = 1e-3
ORIGIN_ATOL_VOXELS = 1e-2
DIRECTION_ATOL = 1e-3
MAX_LISTED_PROBLEMS = 50


@dataclass(frozen=True)
class Case:
    name: str
    images: tuple[Path, ...]  # one file per channel, in channel order
    label: Path
    size: tuple[int, ...] = ()  # from the label header, SimpleITK (x, y[, z]) order
    spacing: tuple[float, ...] = ()
    direction: tuple[float, ...] = ()


@dataclass
class RawDataset:
    root: Path
    meta: dict  # dataset.json
    channels: list[str]
    file_ending: str
    spatial_dims: int
    cases: list[Case]
    lesion_values: list[int] | None  # None: every label > 0 is lesion

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.root.name)

    def case(self, name: str) -> Case:
        for case in self.cases:
            if case.name == name:
                return case
        raise KeyError(name)


def fail(problems: Sequence[str], what: str) -> None:
    """Raise one UserError listing every problem, one per line (capped so a broken folder stays readable)."""
    if not problems:
        return
    shown = list(problems[:MAX_LISTED_PROBLEMS])
    if len(problems) > len(shown):
        shown.append(f"... and {len(problems) - len(shown)} more")
    # "what: N problems" reads right whether `what` is singular ("dataset X") or plural ("the options").
    noun = "problem" if len(problems) == 1 else "problems"
    raise UserError(f"{what}: {len(problems)} {noun}:\n  " + "\n  ".join(shown))


def read_dataset_json(root: Path) -> dict:
    path = root / "dataset.json"
    if not path.is_file():
        raise UserError(f"{root} has no dataset.json; is it an nnU-Net v2 raw dataset folder?")
    meta = read_json(path, lambda exc: f"{path} is not valid JSON ({exc})")
    problems = []
    if not isinstance(meta, dict):
        raise UserError(f"{path} must hold a JSON object")
    channels = meta.get("channel_names", meta.get("modality"))
    if not isinstance(channels, dict) or not channels:
        problems.append('dataset.json: "channel_names" must map "0", "1", ... to channel names')
    elif sorted(channels) != [str(i) for i in range(len(channels))]:
        problems.append(
            f'dataset.json: "channel_names" keys must be "0".."{len(channels) - 1}", got {sorted(channels)}'
        )
    ending = meta.get("file_ending")
    if not isinstance(ending, str) or not ending.startswith("."):
        problems.append('dataset.json: "file_ending" must be a file extension such as ".nii.gz" or ".png"')
    if "labels" in meta and not _label_map_ok(meta["labels"]):
        problems.append(
            'dataset.json: "labels" must map each label name to its value, e.g. {"background": 0, "lesion": 1}'
        )
    fail(problems, str(path))
    return meta


def _label_map_ok(labels) -> bool:
    """nnU-Net v2 "labels": name -> integer value, or name -> list of values (region-based training)."""

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    return isinstance(labels, dict) and all(
        is_int(v) or (isinstance(v, list) and v and all(map(is_int, v))) for v in labels.values()
    )


def declared_label_values(meta: dict) -> dict[str, list[int]]:
    """dataset.json "labels" as name -> values (nnU-Net region labels map a name to several values)."""
    out = {}
    for name, value in (meta.get("labels") or {}).items():
        values = value if isinstance(value, list) else [value]
        out[str(name)] = [int(v) for v in values]
    return out


def declared_values(meta: dict) -> set[int]:
    """Every label value dataset.json declares (empty when it declares none)."""
    return {v for values in declared_label_values(meta).values() for v in values}


def resolve_lesion_values(meta: dict, labels: Sequence[int | str] | None) -> list[int] | None:
    """The label values that count as lesion: None (every value > 0) or a checked list.

    Entries may be values or names from dataset.json "labels".
    """
    if labels is None or len(labels) == 0:
        return None
    declared = declared_label_values(meta)
    known_values = declared_values(meta)
    values, problems = [], []
    for item in labels:
        if isinstance(item, str) and not item.lstrip("-").isdigit():
            if item not in declared:
                problems.append(f"label name {item!r} is not in dataset.json labels {sorted(declared)}")
                continue
            values += declared[item]
            continue
        value = int(item)
        if value <= 0:
            problems.append(f"label value {value} is background; lesion values must be > 0")
        elif declared and value not in known_values:
            problems.append(f"label value {value} is not in dataset.json labels {sorted(known_values)}")
        values.append(value)
    fail(problems, "the label selection")
    return sorted(set(values))


def binarize_label(array: np.ndarray, lesion_values: Sequence[int] | None) -> np.ndarray:
    """uint8 lesion mask (1 = lesion) from a label array."""
    if lesion_values is None:
        return (array > 0).astype(np.uint8)
    return np.isin(array, np.asarray(lesion_values)).astype(np.uint8)


def _header(path: Path) -> dict:
    """Size/spacing/origin/direction/components of an image file without reading its pixels."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return {
        "size": tuple(reader.GetSize()),
        "spacing": tuple(reader.GetSpacing()),
        "origin": tuple(reader.GetOrigin()),
        "direction": tuple(reader.GetDirection()),
        "components": reader.GetNumberOfComponents(),
    }


def _plain(values: Sequence[float]) -> str:
    """Numbers as a user writes them, (1, 2.5, 3): numpy's reprs (np.float64(1.0)) mean nothing to them."""
    # Four decimals show every difference the tolerances below report; + 0.0 turns -0 into 0.
    return "(" + ", ".join(f"{round(float(v), 4) + 0.0:.4f}".rstrip("0").rstrip(".") for v in values) + ")"


def _geometry_difference(a: dict, b: dict) -> str | None:
    if a["size"] != b["size"]:
        return f"size {a['size']} vs {b['size']}"
    sa, sb = np.asarray(a["spacing"]), np.asarray(b["spacing"])
    if not np.allclose(sa, sb, rtol=SPACING_RTOL, atol=0):
        return f"spacing {_plain(sa)} vs {_plain(sb)}"
    if not np.allclose(a["origin"], b["origin"], rtol=0, atol=ORIGIN_ATOL_VOXELS * sa.min()):
        return f"origin {_plain(a['origin'])} vs {_plain(b['origin'])}"
    if not np.allclose(a["direction"], b["direction"], rtol=0, atol=DIRECTION_ATOL):
        return f"direction {_plain(a['direction'])} vs {_plain(b['direction'])}"
    return None


def open_dataset(
    root: str | Path,
    labels: Sequence[int | str] | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> RawDataset:
    """Find and validate every case of an nnU-Net v2 raw dataset; raise one UserError listing all problems.

    Checks file naming, channel count per case, presence of each label, readability of every header,
    one dimensionality for all cases, and identical size and geometry of a case's channels and label.
    Pixel contents (label values) are checked when the case is read (`read_case`).
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist")
    meta = read_dataset_json(root)
    lesion_values = resolve_lesion_values(meta, labels)
    channel_names = meta.get("channel_names", meta.get("modality"))
    channels = [str(channel_names[str(i)]) for i in range(len(channel_names))]
    ending = meta["file_ending"]
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise UserError(f"{root} has no {folder.name} folder (nnU-Net v2 raw layout)")

    problems: list[str] = []
    cases = _find_cases(images_dir, labels_dir, channels, ending, problems)
    checked, dims = _check_headers(cases, problems, progress)
    if len(dims) > 1:
        summary = ", ".join(f"{d}D: {len(names)} (e.g. {names[0]})" for d, names in sorted(dims.items()))
        problems.append(f"cases mix dimensionalities ({summary}); a dataset must be all 2D or all 3D")
    fail(problems, f"dataset {root}")
    if progress is not None:
        progress(1.0, f"{len(cases)} cases")
    spatial_dims = next(iter(dims)) if dims else 3
    if spatial_dims not in (2, 3):
        raise UserError(f"dataset {root}: images are {spatial_dims}D; only 2D and 3D are supported")
    return RawDataset(root, meta, channels, ending, spatial_dims, checked, lesion_values)


def _find_cases(
    images_dir: Path, labels_dir: Path, channels: list[str], ending: str, problems: list[str]
) -> list[Case]:
    """The cases whose files are all there, by nnU-Net's naming; adds what is wrong to `problems`."""
    pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(ending) + "$")
    by_case: dict[str, dict[int, Path]] = {}
    image_files = sorted(
        p for p in images_dir.iterdir() if p.name.endswith(ending) and not p.name.startswith(".")
    )
    if not image_files:
        others = sorted({"".join(p.suffixes) for p in images_dir.iterdir() if not p.name.startswith(".")})
        hint = f"; it holds {', '.join(others)} files: fix file_ending in dataset.json" if others else ""
        raise UserError(f"{images_dir} has no *{ending} images (dataset.json file_ending){hint}")
    for path in image_files:
        match = pattern.match(path.name)
        if not match:
            problems.append(
                f"imagesTr/{path.name}: name must be <case>_<XXXX>{ending} (XXXX = channel index)"
            )
            continue
        by_case.setdefault(match["case"], {})[int(match["channel"])] = path
    label_files = {
        p.name[: -len(ending)]: p
        for p in labels_dir.iterdir()
        if p.name.endswith(ending) and not p.name.startswith(".")
    }

    cases: list[Case] = []
    for name in sorted(by_case):
        found = by_case[name]
        missing = [i for i in range(len(channels)) if i not in found]
        extra = sorted(i for i in found if i >= len(channels))
        if missing or extra:
            parts = [f"missing channel {i:04d} ({channels[i]})" for i in missing]
            parts += [f"unexpected channel file {found[i].name}" for i in extra]
            problems.append(
                f"case {name}: {len(found)} channel file(s) but dataset.json lists {len(channels)}: "
                + ", ".join(parts)
            )
            continue
        if name not in label_files:
            problems.append(f"case {name}: missing label labelsTr/{name}{ending}")
            continue
        cases.append(Case(name, tuple(found[i] for i in range(len(channels))), label_files[name]))
    for name in sorted(set(label_files) - set(by_case)):
        problems.append(f"labelsTr/{name}{ending}: label without image files in imagesTr")

    return cases


def _check_headers(
    cases: list[Case], problems: list[str], progress: Callable[[float, str], None] | None
) -> tuple[list[Case], dict[int, list[str]]]:
    """(cases with their size and spacing, case names by dimensionality) from every file's header; adds
    unreadable files, vector pixels and channel/label geometry mismatches to `problems`."""
    dims: dict[int, list[str]] = {}
    checked: list[Case] = []
    for k, case in enumerate(cases):
        if progress is not None:
            progress(k / max(1, len(cases)), f"checking {case.name}")
        headers = {}
        for path in (*case.images, case.label):
            try:
                headers[path] = _header(path)
            except RuntimeError as exc:
                reason = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else "unreadable"
                problems.append(f"{path.parent.name}/{path.name}: cannot be read as an image ({reason})")
        if len(headers) != len(case.images) + 1:
            continue
        label = headers[case.label]
        dims.setdefault(len(label["size"]), []).append(case.name)
        if label["components"] != 1:
            problems.append(
                f"case {case.name}: label has {label['components']} components per pixel; labels must be scalar"
            )
        for path in case.images:
            header = headers[path]
            if header["components"] != 1:
                problems.append(
                    f"imagesTr/{path.name}: {header['components']} components per pixel (RGB?); save it as greyscale "
                    "or as one file per channel"
                )
            diff = _geometry_difference(header, label)
            if diff:
                problems.append(f"case {case.name}: image {path.name} and its label differ in {diff}")
        checked.append(
            replace(case, size=label["size"], spacing=label["spacing"], direction=label["direction"])
        )
    return checked, dims


def read_case(dataset: RawDataset, case: Case):
    """Read one case: (list of float32 SimpleITK channel images, uint8 lesion-mask image on the same grid).

    Raises UserError for unreadable pixels or non-integer label values.
    """
    import SimpleITK as sitk

    from ..io.imageio import read_file

    images = []
    for path in case.images:
        try:
            images.append(sitk.Cast(read_file(path), sitk.sitkFloat32))
        except RuntimeError as exc:
            raise UserError(
                f"imagesTr/{path.name}: cannot be read ({str(exc).strip().splitlines()[-1][:160]})"
            ) from None
    try:
        label = read_file(case.label)
    except RuntimeError as exc:
        raise UserError(
            f"labelsTr/{case.label.name}: cannot be read ({str(exc).strip().splitlines()[-1][:160]})"
        ) from None
    array = sitk.GetArrayViewFromImage(label)
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise UserError(f"labelsTr/{case.label.name}: label values must be integers (found fractions)")
    declared = declared_values(dataset.meta)
    if dataset.lesion_values is not None and declared:
        # Chosen lesion values leave the others as background: an undeclared value (a 0/255 mask under a
        # dataset.json saying 1) would then score as an empty reference without a word. A dataset.json
        # declaring no labels leaves every value open, as `resolve_lesion_values` does.
        declared |= {0}
        undeclared = sorted(set(np.unique(array).astype(int).tolist()) - declared)
        if undeclared:
            raise UserError(
                f"labelsTr/{case.label.name} holds label value(s) {', '.join(map(str, undeclared[:5]))}, which "
                f"dataset.json does not declare ({', '.join(map(str, sorted(declared)))}); fix the labels or "
                "dataset.json"
            )
    mask = sitk.GetImageFromArray(binarize_label(array, dataset.lesion_values))
    # Header rounding differences within tolerance must not break resampling: put the mask on the image grid.
    mask.CopyInformation(images[0])
    return images, mask


# ----------------------------------------------------------------------------------------------- split


def read_groups(path: str | Path) -> list[list[str]]:
    """A groups file: JSON list of lists of case names that must stay on one side of the split."""
    path = Path(path)
    groups = read_json(path, lambda exc: f"group file {path}: cannot be read as JSON ({exc})")
    check_groups(groups, str(path))
    return groups


def check_group_file(path: str | Path, names: Sequence[str]) -> None:
    """Refuse a group file naming cases the dataset lacks: a misspelt name silently leaves its patient's
    cases free to straddle the split (a config's `groups`, written for a whole dataset, may name cases
    that a subset of it lacks)."""
    unknown = sorted({n for group in read_groups(path) for n in group} - set(names))
    if unknown:
        raise UserError(
            f"group file {path}: {len(unknown)} case(s) not in the dataset: {', '.join(unknown[:10])}"
        )


def check_groups(groups, where: str = "groups") -> None:
    if not isinstance(groups, list) or not all(
        isinstance(g, list) and all(isinstance(n, str) for n in g) for g in groups
    ):
        raise UserError(f'{where}: must be a list of lists of case names, e.g. [["caseA", "caseB"]]')


def _units(names: Sequence[str], groups: Iterable[Sequence[str]]) -> list[list[str]]:
    """Cases merged into same-patient units (union of overlapping groups); names absent from `names` ignored."""
    parent = {n: n for n in names}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for group in groups:
        present = [n for n in group if n in parent]
        for other in present[1:]:
            parent[find(other)] = find(present[0])
    units: dict[str, list[str]] = {}
    for n in sorted(names):
        units.setdefault(find(n), []).append(n)
    return sorted(units.values())


def make_split(
    names: Sequence[str], val_fraction: float = 0.2, seed: int = 0, groups: Iterable[Sequence[str]] = ()
) -> dict[str, list[str]]:
    """Case-level split, reproducible for a seed, never separating the cases of one group.

    About `val_fraction` of the cases go to validation (at least one when there are two or more units
    and the fraction is > 0), never more than the target.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    units = _units(names, groups)
    target = int(round(val_fraction * len(names)))
    if val_fraction > 0 and len(units) > 1:
        target = max(target, 1)
    order = np.random.default_rng(seed).permutation(len(units))
    val: list[str] = []
    for i in order:
        if len(val) + len(units[i]) <= target:
            val += units[i]
    if not val and target > 0 and len(units) > 1:
        val = min(
            units, key=len
        )  # every unit exceeds the target: the smallest one still gives a validation set
    val_set = set(val)
    return {"train": sorted(n for n in names if n not in val_set), "val": sorted(val_set)}


def load_split_file(path: str | Path, fold: int = 0) -> dict:
    """A split file's {"train": [...], "val": [...]} (the fold's, from nnU-Net's list of folds), its
    form checked; the cases are checked against the data by `read_split_file`."""
    path = Path(path)
    split = read_json(path, lambda exc: f"split file {path}: cannot be read as JSON ({exc})")
    if isinstance(split, list):
        if not 0 <= fold < len(split):
            raise UserError(f"split file {path}: has {len(split)} folds, fold {fold} asked for")
        split = split[fold]
    if (
        not isinstance(split, dict)
        or not isinstance(split.get("train"), list)
        or not isinstance(split.get("val"), list)
    ):
        raise UserError(
            f'split file {path}: must be {{"train": [...], "val": [...]}} or a list of such folds'
        )
    return split


def read_split_file(
    path: str | Path, names: Sequence[str], groups: Iterable[Sequence[str]] = (), fold: int = 0
) -> dict[str, list[str]]:
    """An explicit split: {"train": [...], "val": [...]} or nnU-Net's splits_final.json (list of folds).

    Every listed case must exist, no case may be on both sides, and no group may straddle the sides.
    Cases listed on neither side are left out of training.
    """
    split = load_split_file(path, fold)
    path = Path(path)
    problems = []
    known = set(names)
    for side in ("train", "val"):
        unknown = sorted(set(split[side]) - known)
        if unknown:
            problems.append(
                f"{side} lists {len(unknown)} case(s) not in the dataset: {', '.join(unknown[:10])}"
            )
    both = sorted(set(split["train"]) & set(split["val"]))
    if both:
        problems.append(f"{len(both)} case(s) are on both sides: {', '.join(both[:10])}")
    train, val = set(split["train"]), set(split["val"])
    for unit in _units(names, groups):
        if len(unit) > 1 and set(unit) & train and set(unit) & val:  # one case: said above
            problems.append(f"same-patient cases {', '.join(unit)} are split between train and val")
    fail(problems, f"split file {path}")
    if not train:
        raise UserError(f"split file {path}: the training side is empty")
    if not val:
        raise UserError(f"split file {path}: the validation side is empty; list at least one validation case")
    return {"train": sorted(train), "val": sorted(val)}
