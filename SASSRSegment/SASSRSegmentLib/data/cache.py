"""Preprocessing to the model's HR working grid, and the memory-mapped training cache.

Per case: every channel and the lesion mask are resampled onto `geometry.training_hr_grid` (so the LR
input that training makes by block averaging lies on the grid inference will use), the channels are
normalised as the card says, 3D volumes are cropped to the body plus a margin, and the result is written
as `<case>_img.npy` (C, *spatial) and `<case>_seg.npy` (uint8) beside `cache.json`.

Reading a cache (`open_cache`) needs numpy only: a GPU machine without SimpleITK trains from a cache
folder made elsewhere. SimpleITK and the raw-data code are imported only where raw files are read.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..io.files import atomic_write, read_json
from ..runtime.errors import UserError
from ..runtime.progress import Progress
from .normalization import normalize

CACHE_FORMAT_VERSION = 1
CACHE_FILE = "cache.json"
# The axis order 3D training cases are stored in (`geometry.orientation`): ITK's identity direction,
# which is how BraTS, and most nnU-Net datasets read by ITK, already store them.
TRAINING_ORIENTATION = "LPS"
OPEN_CASES = 512  # memory maps kept open at once (each holds a file descriptor)


# ------------------------------------------------------------------------------------------ writing


def _atomic_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def cache_prep_key(prep: dict, crop_margin_lr: int) -> dict:
    """The parts of the preprocessing that change the cached arrays (patch size does not)."""
    keep = ("spatial_dims", "scale", "channels", "lr_spacing", "lr_longer_side", "normalization", "labels")
    return {
        "format": CACHE_FORMAT_VERSION,
        "crop_margin_lr": crop_margin_lr,
        **{k: prep.get(k) for k in keep},
        # Only where set, so that the caches made before it (and 2D ones) stay valid.
        **({"orientation": prep["orientation"]} if prep.get("orientation") else {}),
    }


def _case_key(prep_key: dict, files: Sequence[Path]) -> str:
    stats = []
    for f in files:
        st = f.stat()
        stats.append([f.name, st.st_size, st.st_mtime_ns])
    return _hash([prep_key, stats])


def storage_for(prep: dict) -> str:
    # 8-bit sources lose nothing as uint8 (normalised on load); everything else is normalised then float16.
    return "uint8" if prep["normalization"].get("kind") == "uint8" else "float16"


def body_box(arrays: Sequence[np.ndarray], mask: np.ndarray, margin: int, scale: int):
    """HR index box (start, stop per numpy axis) around the non-background voxels and the lesion.

    The background of a channel is its most frequent value; start and stop stay multiples of `scale`
    so the cropped volume still block-averages onto the LR working grid.
    """
    body = mask > 0
    for a in arrays:
        values, counts = np.unique(
            a[tuple(slice(None, None, max(1, n // 64)) for n in a.shape)], return_counts=True
        )
        body |= a != values[np.argmax(counts)]
    if not body.any():
        return [0] * mask.ndim, list(mask.shape)
    start, stop = [], []
    for axis in range(mask.ndim):
        other = tuple(i for i in range(mask.ndim) if i != axis)
        nz = np.flatnonzero(body.any(axis=other))
        lo = max(0, nz[0] - margin) // scale * scale
        hi = min(mask.shape[axis], -(-(nz[-1] + 1 + margin) // scale) * scale)
        start.append(int(lo))
        stop.append(int(hi))
    return start, stop


def lesion_components(mask: np.ndarray) -> list[dict]:
    """Connected lesions (diagonal neighbours join, as in `lesions`): centroid and bounding box in numpy
    index order, size in voxels, largest first."""
    import SimpleITK as sitk

    if not mask.any():
        return []
    cc = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(cc)
    d = mask.ndim
    out = []
    for label in stats.GetLabels():
        box = stats.GetBoundingBox(label)  # (x, y, z start, x, y, z size)
        start = list(box[:d])[::-1]
        size = list(box[d:])[::-1]
        out.append(
            {
                "centroid": [round(v, 2) for v in stats.GetCentroid(label)[::-1]],
                "size": int(stats.GetNumberOfPixels(label)),
                "box": [start, [s + n for s, n in zip(start, size)]],
            }
        )
    return sorted(out, key=lambda c: -c["size"])


def process_case(dataset, case, prep: dict, crop_margin_lr: int, folder: Path, key: str) -> dict:
    """Preprocess one raw case into `folder`; returns its cache entry (also written as `<case>.json`)."""
    import SimpleITK as sitk

    from ..io import geometry
    from .datasets import read_case

    images, mask = read_case(dataset, case)
    # Stored in the axis order `segment` gives the network (a sagittal case's voxels reordered, not moved).
    images = [geometry.reorient(image, prep.get("orientation")) for image in images]
    mask = geometry.reorient(mask, prep.get("orientation"))
    scale = int(prep["scale"])
    source = geometry.Grid.from_image(images[0])
    hr = geometry.training_hr_grid(source, prep)
    raw = [sitk.GetArrayFromImage(geometry.resample(img, hr)) for img in images]
    seg = sitk.GetArrayFromImage(geometry.resample_label(mask, hr)).astype(np.uint8)
    storage = storage_for(prep)
    if storage == "uint8":
        low, high = min(float(a.min()) for a in raw), max(float(a.max()) for a in raw)
        if low < -0.5 or high > 255.5:
            raise UserError(
                f"case {case.name}: intensities {low:g}..{high:g} do not fit 8 bits but the normalisation is "
                '"uint8"; set "normalization" to {"kind": "mri"} or {"kind": "ct", ...} in the config'
            )
    if prep["spatial_dims"] == 3:
        start, stop = body_box(raw, seg, crop_margin_lr * scale, scale)
    else:
        start, stop = [0] * seg.ndim, list(seg.shape)
    region = tuple(slice(a, b) for a, b in zip(start, stop))
    norm = [normalize(a, prep["normalization"]) for a in raw]
    background = []
    for a, n in zip(raw, norm):
        values, counts = np.unique(
            a[tuple(slice(None, None, max(1, s // 64)) for s in a.shape)], return_counts=True
        )
        at_mode = a == values[np.argmax(counts)]
        background.append(round(float(np.median(n[at_mode])) if at_mode.any() else float(n.min()), 4))
    if storage == "uint8":
        stored = np.stack([np.clip(np.rint(a[region]), 0, 255) for a in raw]).astype(np.uint8)
    else:
        stored = np.stack([np.clip(n[region], -6e4, 6e4) for n in norm]).astype(np.float16)
    seg = np.ascontiguousarray(seg[region])
    # The cropped grid: same spacing and direction, origin moved to the first kept voxel.
    origin = hr.index_to_physical(start[::-1])
    entry = {
        "key": key,
        "shape": list(seg.shape),
        "spacing": list(hr.spacing),
        "origin": [float(v) for v in origin],
        "direction": list(hr.direction),
        "crop_start": start,
        "working_shape": list(hr.size[::-1]),
        "source_size": list(source.size),
        "source_spacing": list(source.spacing),
        "lesion_voxels": int(seg.sum()),
        "components": lesion_components(seg),
        "background": background,
    }
    atomic_write(folder / f"{case.name}_img.npy", lambda f: np.save(f, stored))
    atomic_write(folder / f"{case.name}_seg.npy", lambda f: np.save(f, seg))
    _atomic_json(folder / f"{case.name}.json", entry)
    return entry


def _init_worker() -> None:
    import SimpleITK as sitk

    # Two workers on two cores: one ITK thread each.
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _holds(path: Path, keys: tuple[str, ...]) -> bool:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and all(k in content for k in keys)


def _case_entries(folder: Path) -> set[str]:
    """The cases whose entry `<case>.json` is in `folder`."""
    return {p.stem for p in folder.glob("*.json") if _holds(p, ("key", "lesion_voxels"))}


def _foreign_files(folder: Path, cases: set[str]) -> list[str]:
    """The files in `folder` that no cache writes: a user's config or split kept there had been deleted
    as a leftover, as every .json and .npy counted as the cache's."""
    entries = _case_entries(folder)
    foreign = []
    for path in folder.iterdir():
        name, stem = path.name, path.name.rsplit("_", 1)[0]
        ours = (
            (name == CACHE_FILE and _holds(path, ("key", "cases")))
            or (name.startswith(".") and name.endswith(".tmp"))  # `atomic_write`'s, interrupted
            or (path.suffix == ".json" and path.stem in entries)
            # In a cache, also a case's arrays written before its entry when it stopped, the case gone
            # since: left where they are (they might be someone's), as no cache reads an unlisted case.
            or (
                name.endswith(("_img.npy", "_seg.npy"))
                and (stem in entries or stem in cases or bool(entries))
            )
        )
        if not ours:
            foreign.append(name)
    return sorted(foreign)


def build_cache(
    dataset,
    prep: dict,
    folder: str | Path,
    crop_margin_lr: int = 8,
    groups: Sequence[Sequence[str]] = (),
    workers: int = 2,
    progress: Progress | None = None,
) -> Path:
    """Preprocess every case of a validated `RawDataset` into `folder`, reusing what is still valid.

    Each case is keyed by the preprocessing and its files' sizes and times; a case whose key matches its
    existing `<case>.json` is not redone, so an interrupted run resumes where it stopped. `cache.json`
    is written last: a folder without it is never taken for a finished cache.
    """
    progress = progress or Progress("quiet")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"cache folder {folder} is a file; choose a folder")
    folder.mkdir(parents=True, exist_ok=True)
    foreign = _foreign_files(folder, {c.name for c in dataset.cases})
    if foreign:
        raise UserError(
            f"{folder} holds files that are not a training cache ({', '.join(foreign[:3])}); "
            "choose an empty or new folder"
        )
    prep_key = cache_prep_key(prep, crop_margin_lr)
    keys = {c.name: _case_key(prep_key, (*c.images, c.label)) for c in dataset.cases}
    overall = _hash([prep_key, sorted(keys.items())])
    existing = folder / CACHE_FILE
    if _still_valid(folder, dataset, overall, progress):
        return folder
    entries, todo = _reusable_cases(folder, dataset, keys)
    n = len(dataset.cases)
    progress.update("preprocess", len(entries) / n, f"{len(entries)} cached, {len(todo)} to do")
    if todo:
        if workers > 1 and len(todo) > 1:
            _run_pool(dataset, todo, prep, crop_margin_lr, folder, keys, entries, workers, progress, n)
        else:
            _init_worker()
            for case in todo:
                entries[case.name] = process_case(
                    dataset, case, prep, crop_margin_lr, folder, keys[case.name]
                )
                progress.update("preprocess", len(entries) / n, case.name)
    meta = {
        "format_version": CACHE_FORMAT_VERSION,
        "key": overall,
        "prep": prep,
        "crop_margin_lr": crop_margin_lr,
        "storage": storage_for(prep),
        "dataset": {"name": dataset.name, "root": str(dataset.root), "dataset_json": dataset.meta},
        "groups": [list(g) for g in groups],
        "cases": {name: entries[name] for name in sorted(entries)},
    }
    _atomic_json(existing, meta)
    progress.update("preprocess", 1.0, f"{n} cases in {folder}")
    return folder


def _still_valid(folder: Path, dataset, overall: str, progress: Progress) -> bool:
    """Whether `folder` already holds this dataset's finished cache for this key; a stale cache.json is
    removed (the cases it lists are rechecked one by one)."""
    existing = folder / CACHE_FILE
    if existing.is_file():
        try:
            previous = json.loads(existing.read_text())
        except (OSError, ValueError):
            previous = {}
        other = previous.get("dataset", {}).get("name")
        if other and other != dataset.name:
            raise UserError(
                # Not "delete it": a resumed run's own cache is one of these.
                f"{folder} holds the cache of dataset {other}, not {dataset.name}: give that dataset, or another "
                "cache folder (train --cache, preprocess --output)"
            )
        try:
            if previous.get("key") == overall:
                open_cache(folder)  # also checks that every array is there
                progress.log(f"reusing the valid cache in {folder}")
                return True
        except (UserError, ValueError, OSError):
            pass
        existing.unlink()

    return False


def _reusable_cases(folder: Path, dataset, keys: dict[str, str]) -> tuple[dict[str, dict], list]:
    """(entries of the cases still valid in `folder`, cases to preprocess); removes leftovers of
    interrupted writes and of cases that left the dataset."""
    entries: dict[str, dict] = {}
    todo = []
    for case in dataset.cases:
        try:
            entry = json.loads((folder / f"{case.name}.json").read_text())
            if entry.get("key") == keys[case.name] and all(
                (folder / f"{case.name}_{part}.npy").is_file() for part in ("img", "seg")
            ):
                entries[case.name] = entry
                continue
        except (OSError, ValueError):
            pass
        todo.append(case)
    gone = _case_entries(folder) - {c.name for c in dataset.cases}
    for path in folder.iterdir():  # leftovers of interrupted writes, cases that left the dataset
        stem = path.name.rsplit("_", 1)[0] if path.suffix == ".npy" else path.stem
        if (path.name.startswith(".") and path.name.endswith(".tmp")) or (
            path.suffix in (".npy", ".json") and stem in gone
        ):
            path.unlink()

    return entries, todo


def _run_pool(dataset, todo, prep, crop_margin_lr, folder, keys, entries, workers, progress, n) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn: the parent may hold torch's thread pools, which fork would copy half-initialised.
    pool = ProcessPoolExecutor(
        max_workers=min(workers, len(todo)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
    )
    try:
        futures = {
            pool.submit(process_case, dataset, case, prep, crop_margin_lr, folder, keys[case.name]): case
            for case in todo
        }
        for future in as_completed(futures):
            case = futures[future]
            entries[case.name] = future.result()
            progress.update("preprocess", len(entries) / n, case.name)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------ reading


def is_cache(folder: str | Path) -> bool:
    return (Path(folder) / CACHE_FILE).is_file()


class Cache:
    """A preprocessed dataset: arrays are memory-mapped on first use (per process, a bounded number open).

    `image(name)` is (C, *spatial) as stored (uint8 or float16); `normalized(array)` turns a stored crop
    into float32 network intensities.
    """

    def __init__(self, folder: Path, meta: dict):
        self.folder = folder
        self.meta = meta
        self.prep: dict = meta["prep"]
        self.storage: str = meta["storage"]
        self.cases: dict[str, dict] = meta["cases"]
        self._open: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()

    @property
    def names(self) -> list[str]:
        return sorted(self.cases)

    def __getstate__(self):
        # Worker processes open their own maps.
        return {**self.__dict__, "_open": OrderedDict()}

    def _array(self, name: str, part: str) -> np.ndarray:
        key = (name, part)
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        array = np.load(self.folder / f"{name}_{part}.npy", mmap_mode="r")
        self._open[key] = array
        if len(self._open) > OPEN_CASES:
            self._open.popitem(last=False)
        return array

    def image(self, name: str) -> np.ndarray:
        return self._array(name, "img")

    def seg(self, name: str) -> np.ndarray:
        return self._array(name, "seg")

    def normalized(self, array: np.ndarray) -> np.ndarray:
        if self.storage == "uint8":
            return normalize(array, self.prep["normalization"])
        return np.asarray(array, dtype=np.float32)

    def background(self, name: str) -> np.ndarray:
        """Per-channel normalised background value (what padding uses)."""
        return np.asarray(self.cases[name]["background"], dtype=np.float32)


def open_cache(folder: str | Path) -> Cache:
    """Open and check a cache folder; one UserError listing every missing or inconsistent array."""
    folder = Path(folder)
    path = folder / CACHE_FILE
    meta = read_json(
        path,
        lambda exc: f"{path} cannot be read ({exc}); run `preprocess` again",
        missing=f"{folder} is not a training cache ({CACHE_FILE} missing); run `preprocess` first",
    )
    if meta.get("format_version") != CACHE_FORMAT_VERSION:
        raise UserError(
            f"{path} has cache format {meta.get('format_version')}, this version reads {CACHE_FORMAT_VERSION}; "
            "run `preprocess` again"
        )
    problems = []
    channels = len(meta["prep"]["channels"])
    dtype = np.uint8 if meta["storage"] == "uint8" else np.float16
    for name, entry in sorted(meta["cases"].items()):
        for part, shape, want in (
            ("img", [channels, *entry["shape"]], dtype),
            ("seg", entry["shape"], np.uint8),
        ):
            file = folder / f"{name}_{part}.npy"
            try:
                array = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as exc:
                problems.append(f"{file.name}: cannot be read ({exc})")
                continue
            if list(array.shape) != list(shape) or array.dtype != want:
                problems.append(
                    f"{file.name}: {array.dtype}{list(array.shape)}, expected {np.dtype(want)}{shape}"
                )
    if not meta["cases"]:
        problems.append("no cases")
    from .datasets import fail

    fail(problems, f"cache {folder}")
    return Cache(folder, meta)


# ------------------------------------------------------------------------------------------ command


def make_prep(options, dataset) -> dict:
    """The card's "preprocessing" dict from training options (`training.config.TrainConfig`) and a raw dataset."""
    from ..io import geometry
    from .normalization import choose_normalization

    d = dataset.spatial_dims
    scale = int(options.scale)
    lr_spacing = lr_longer_side = None
    if d == 3:
        if options.lr_spacing:
            lr_spacing = [float(v) for v in options.lr_spacing]
        else:  # HR working spacing = the data's median spacing, in the axis order the cases are cached in
            spacings = [
                geometry.reoriented_spacing(c.spacing, c.direction, TRAINING_ORIENTATION)
                for c in dataset.cases
            ]
            median = np.median(np.asarray(spacings), axis=0)
            lr_spacing = [round(float(v) * scale, 4) for v in median]
        if len(lr_spacing) != 3 or min(lr_spacing) <= 0:
            raise UserError(
                f"lr_spacing must be three positive numbers for 3D data, got {options.lr_spacing}"
            )
    else:
        lr_longer_side = int(options.lr_longer_side or 160)
        if lr_longer_side < 8:
            raise UserError(f"lr_longer_side must be at least 8, got {lr_longer_side}")
    return {
        "spatial_dims": d,
        "scale": scale,
        # 3D cases are learnt, and inputs segmented, in one axis order whatever order each is stored in.
        "orientation": TRAINING_ORIENTATION if d == 3 else None,
        "channels": dataset.channels,
        "lr_spacing": lr_spacing,
        "lr_longer_side": lr_longer_side,
        "normalization": dict(options.normalization or choose_normalization(dataset.meta)),
        "patch_size_lr": options.patch_size(d, lr_longer_side),
        # None: every value > 0, as training reads them; `evaluate` reads the labels by the same rule (the
        # values dataset.json declares had stood here, and a 0/255 mask then scored as empty).
        "labels": dataset.lesion_values,
    }


def prepare(options, dataset_dir: str | Path, cache_dir: str | Path, progress: Progress) -> Path:
    """Validate a raw dataset and build (or reuse) its cache; returns the cache folder."""
    from .datasets import open_dataset

    dataset = open_dataset(dataset_dir, options.labels, lambda f, m: progress.update("check", f, m))
    prep = make_prep(options, dataset)
    progress.log(
        f"{dataset.name}: {len(dataset.cases)} {dataset.spatial_dims}D cases, channels {dataset.channels}, "
        f"normalisation {prep['normalization']}, "
        + (
            f"LR spacing {prep['lr_spacing']}"
            if prep["lr_spacing"]
            else f"LR longer side {prep['lr_longer_side']}"
        )
        + f", scale {prep['scale']}"
    )
    return build_cache(
        dataset, prep, cache_dir, options.crop_margin_lr, options.groups, options.workers, progress
    )
