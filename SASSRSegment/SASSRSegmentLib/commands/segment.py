"""The `segment` command: files, folders or DICOM series in; HR masks, probabilities, SR images, lesion
tables and figures out, each input's outputs staged and committed together."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from ..inference import lesions, provenance
from ..inference.inputs import effective_dims
from ..inference.pipeline import card_threshold, segment_lesions, super_resolve_image, to_8_bit
from ..io import headers, imageio
from ..io.files import PICTURE_FORMATS
from ..io.geometry import Grid
from ..runtime.errors import UserError
from ..runtime.progress import Progress

# The command line runs this command in a worker thread: a cancel then takes effect within a second at
# every stage (see commands/runner.run_command).
RUNS_IN_WORKER = True


SAMPLE_NAME = "brats_2013_pat0005_1_flair_2mm.nrrd"


MASK_SUFFIX, PROB_SUFFIX, SR_SUFFIX = "_mask", "_probabilities", "_sr"


def samples_dir() -> Path:
    from ..model.bundle import MODELS_DIR

    return MODELS_DIR.parent / "Samples"


def add_prediction_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `segment` and `evaluate` share; `check_prediction_arguments` checks them."""
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument(
        "--tta",
        action="store_true",
        help="average over the axis flips the model was trained with (up to 2^d times slower)",
    )
    parser.add_argument("--threshold", type=float, help="probability threshold (default: the model card's)")
    parser.add_argument(
        "--face-connected",
        action="store_true",
        help="lesions connect through faces only (default: also diagonals)",
    )


def check_prediction_arguments(args: argparse.Namespace) -> None:
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise UserError(f"--threshold must lie between 0 and 1, got {args.threshold}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs", nargs="*", metavar="INPUT", help="image files, DICOM series folders or folders of images"
    )
    parser.add_argument(
        "-o", "--output", help="output file (one input) or folder (several inputs, a folder, --demo)"
    )
    parser.add_argument(
        "--model",
        help="bundled model name or bundle folder (default: the bundled model for the input's dims)",
    )
    add_prediction_arguments(parser)
    parser.add_argument(
        "--roi",
        nargs="+",
        type=float,
        metavar="MM",
        help="segment only this box: xmin xmax ymin ymax [zmin zmax] in RAS mm",
    )
    parser.add_argument(
        "--output-grid",
        choices=("hr", "input"),
        default="hr",
        help="hr: scale x finer than the input (default); input: the input grid",
    )
    parser.add_argument(
        "--probabilities", metavar="PATH", help="also write the lesion probabilities (a folder for batches)"
    )
    parser.add_argument(
        "--sr-image", metavar="PATH", help="also write the super-resolved image (a folder for batches)"
    )
    parser.add_argument(
        "--lesion-table",
        metavar="PATH",
        help="write the connected lesions to .csv or .json (one table for batches)",
    )
    parser.add_argument(
        "--figure", metavar="PATH", help="write a PNG overlay of the HR mask outline on the input (one input)"
    )
    parser.add_argument(
        "--numbered-lesions",
        action="store_true",
        help="give each lesion its lesion-table number as mask value (a .seg.nrrd gets one segment each)",
    )
    parser.add_argument(
        "--format", choices=imageio.OUTPUT_EXTENSIONS, help="output extension when -o is a folder"
    )
    parser.add_argument(
        "--overlap",
        type=float,
        help="sliding-window overlap, 0 to 0.9 (default 0.5; 0.25 for a batch-normalised model, which "
        "predicts the whole image in one window where it fits)",
    )
    parser.add_argument(
        "--batch-size", type=int, help="windows per network call (default 1 on CPU, 4 on GPU)"
    )
    parser.add_argument(
        "--memory-limit", type=float, metavar="GB", help="memory budget (default: the available RAM)"
    )
    parser.add_argument(
        "--progress", choices=("bar", "json", "quiet"), default="bar", help="json: one JSON object per line"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--quiet", action="store_true", help="print only warnings and errors")
    parser.add_argument(
        "--demo",
        action="store_true",
        help=f"segment the bundled sample {SAMPLE_NAME} into -o (default demo-output)",
    )


@dataclass
class _Job:
    item: imageio.InputItem
    mask: Path
    probabilities: Path | None = None
    sr_image: Path | None = None


def _default_extension(item: imageio.InputItem, fmt: str | None) -> str:
    if fmt:
        return fmt
    ext = imageio.split_extension(item.path)[1] if item.series_id is None else ""
    if ext in imageio.OUTPUT_EXTENSIONS:
        return ext
    return ".png" if ext in (".jpg", ".jpeg", ".bmp", ".tif", ".tiff") else ".nrrd"


def _is_folder_target(path: str) -> bool:
    return Path(path).is_dir() or path.endswith(("/", "\\")) or imageio.split_extension(path)[1] == ""


def _plan(args: argparse.Namespace, items: list[imageio.InputItem], batch: bool) -> list[_Job]:
    """Every output path, checked (extension, writable folder, no clobbering) before any work starts."""
    if not args.output:
        raise UserError("give the output with -o (a file for one input, a folder for several)")
    if batch and not _is_folder_target(args.output):
        # Named, since a folder can hold several DICOM series where one was meant.
        raise UserError(
            f"several inputs ({len(items)}: {_names([str(i) for i in items])}): -o must be a folder, "
            f"not {args.output}"
        )
    extras = {"probabilities": PROB_SUFFIX, "sr_image": SR_SUFFIX}
    if batch:
        for key in extras:
            value = getattr(args, key)
            if value and not _is_folder_target(value):
                raise UserError(f"several inputs: --{key.replace('_', '-')} must be a folder, not {value}")
        if args.figure:
            raise UserError("--figure draws one input; segment that input on its own")
    jobs = []
    for item in items:
        ext = _default_extension(item, args.format)
        if _is_folder_target(args.output):
            mask = Path(args.output) / f"{item.name}{MASK_SUFFIX}{ext}"
        else:
            mask = Path(args.output)
        job = _Job(item, imageio.check_output_path(mask, args.overwrite))
        for key, suffix in extras.items():
            value = getattr(args, key)
            if value:
                path = Path(value) / f"{item.name}{suffix}{ext}" if batch else Path(value)
                setattr(job, key, imageio.check_output_path(path, args.overwrite))
        jobs.append(job)
    outputs = [p for j in jobs for p in (j.mask, j.probabilities, j.sr_image) if p is not None]
    for path, kinds in ((args.lesion_table, (".csv", ".json")), (args.figure, (".png",))):
        if path:
            outputs.append(imageio.check_output_path(path, args.overwrite, kinds))
    resolved = [p.resolve() for p in outputs]
    if len(set(resolved)) != len(resolved):
        raise UserError("two outputs would be written to the same file; give distinct output names")
    inputs = {j.item.path.resolve() for j in jobs}
    if clash := inputs & set(resolved):
        raise UserError(f"an output would replace its input {sorted(clash)[0]}; choose another output name")
    return jobs


def _without_earlier_outputs(items: list[imageio.InputItem], inputs: list[str]) -> list[imageio.InputItem]:
    """A folder's images less this tool's own earlier outputs in it (`a_mask.nrrd` beside `a.nrrd`, left
    by `segment folder -o folder`): segmenting a mask as a scan gives nonsense without a word."""
    folders = {Path(p).resolve() for p in inputs if Path(p).is_dir()}
    in_folder = [i for i in items if i.series_id is None and i.path.parent.resolve() in folders]
    names = {(i.path.parent.resolve(), i.name) for i in in_folder}
    skipped = {
        i
        for i in in_folder
        for suffix in (MASK_SUFFIX, PROB_SUFFIX, SR_SUFFIX)
        if i.name.endswith(suffix) and (i.path.parent.resolve(), i.name[: -len(suffix)]) in names
    }
    if skipped:
        shown = _names(sorted(i.path.name for i in skipped))
        print(
            f"warning: skipped {len(skipped)} earlier output(s) of this tool: {shown}",
            file=sys.stderr,
            flush=True,
        )
    # An output always lies beside its input, so something is left.
    return [i for i in items if i not in skipped]


def _demo(args: argparse.Namespace) -> None:
    """Point the arguments at the bundled sample, the bundled 3D model and files in the -o folder."""
    from ..model.bundle import MODELS_DIR, bundled_models, read_card

    if args.inputs:
        raise UserError("--demo takes no inputs")
    sample = samples_dir() / SAMPLE_NAME
    missing = []
    if not sample.is_file():
        missing.append(f"the sample image {sample}")
    if args.model is None and not any(
        read_card(f)["preprocessing"].get("spatial_dims") == 3 for f in bundled_models().values()
    ):
        missing.append(f"a bundled 3D model in {MODELS_DIR}")
    if missing:
        raise UserError(
            f"--demo needs {' and '.join(missing)}, which this installation lacks; reinstall the extension"
        )
    folder = Path(args.output or "demo-output")
    stem = imageio.split_extension(sample)[0]
    args.inputs = [str(sample)]
    args.output = str(folder / f"{stem}{MASK_SUFFIX}.seg.nrrd")
    args.lesion_table = args.lesion_table or str(folder / f"{stem}_lesions.csv")
    args.figure = args.figure or str(folder / f"{stem}_figure.png")


def _check_not_a_picture_stack(image: sitk.Image, path: Path) -> None:
    """Refuse pictures read as one volume (a multi-page TIFF of ultrasound frames): the brain MRI model
    had "found" a 15 mL lesion in one. A picture file stores no slice spacing, so no 3D model can take
    it, and a 2D model takes one picture."""
    suffix = path.suffix.lower()
    if suffix in PICTURE_FORMATS and effective_dims(image) == 3:
        raise UserError(
            f"input {path.name} is a stack of {image.GetSize()[2]} {suffix[1:].upper()} pictures, not a scan (a "
            "picture file stores no slice spacing): give one picture for a 2D model, or the scan as NIfTI, "
            "NRRD or DICOM"
        )


def _check_args(args: argparse.Namespace) -> None:
    check_prediction_arguments(args)
    if args.overlap is not None and not 0.0 <= args.overlap <= 0.9:
        raise UserError(f"--overlap must lie between 0 and 0.9, got {args.overlap}")
    if args.roi is not None and (len(args.roi) not in (4, 6) or not all(math.isfinite(v) for v in args.roi)):
        raise UserError(
            "--roi needs xmin xmax ymin ymax (2D) or xmin xmax ymin ymax zmin zmax (3D), in RAS mm"
        )
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if args.memory_limit is not None and not 0 < args.memory_limit < math.inf:
        raise UserError("--memory-limit must be a positive number of GB")
    if args.lesion_table:
        lesions.check_table_path(args.lesion_table)


class _Models:
    """Loads each needed model once (the default model depends on the input's dimensionality)."""

    def __init__(self, name: str | None, device):
        self.name, self.device, self._cache = name, device, {}

    def get(self, spatial_dims: int | None):
        from ..model.bundle import load_bundle

        key = None if self.name else spatial_dims
        if key not in self._cache:
            self._cache[key] = load_bundle(
                self.name, self.device, spatial_dims=spatial_dims, for_prediction=True
            )
        return self._cache[key]


class _Session:
    """What every input of one `segment` call shares: arguments, device, models, progress."""

    def __init__(self, args: argparse.Namespace, batch: bool):
        from ..runtime.devices import describe, select_device

        self.args, self.batch = args, batch
        self.mode = "quiet" if args.quiet and args.progress == "bar" else args.progress
        self.progress = Progress(self.mode)
        self.device = select_device(args.device)
        self.models = _Models(args.model, self.device)
        if args.model:
            self.models.get(None)  # a broken --model fails now, not once per input
        self.progress.log(f"device: {describe(self.device)}")
        self.batch_size = args.batch_size or (1 if self.device.type == "cpu" else 4)
        self.memory_limit = int(args.memory_limit * 2**30) if args.memory_limit else None

    def warn(self, message: str) -> None:
        if self.mode == "json":
            self.progress.log(f"warning: {message}")
        else:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def _check_formats(self, job: _Job, image: sitk.Image, card: dict, net) -> None:
        if effective_dims(image) == 3:
            for path in (job.mask, job.probabilities, job.sr_image):
                if path and imageio.split_extension(path)[1] in imageio.TWO_D_ONLY:
                    raise UserError(
                        f"output {path}: PNG holds 2D images only; use .nrrd, .seg.nrrd or .nii.gz"
                    )
        if job.sr_image:
            if getattr(net, "sr_decoder", None) is None:
                raise UserError(f"model {card.get('name', '?')!r} has no image-SR decoder; drop --sr-image")
            kind = card["preprocessing"]["normalization"].get("kind")
            if imageio.split_extension(job.sr_image)[1] == ".png" and kind != "uint8":
                raise UserError(
                    "--sr-image: PNG holds 8-bit intensities only; use .nrrd or .nii.gz for this model"
                )

    def _write_float(self, image: sitk.Image, path: Path, staging: imageio.Staging) -> None:
        # PNG stores 8 bits: probabilities and 8-bit intensities in [0, 1] become 0..255.
        is_png = imageio.split_extension(path)[1] == ".png"
        imageio.write_image(to_8_bit(image, 255.0) if is_png else image, path, self.args.overwrite, staging)

    def segment(self, job: _Job, where: str, staging: imageio.Staging) -> tuple[list[dict], dict]:
        """Segment one input and stage its outputs; returns its lesion rows and the table's metadata."""
        args = self.args

        def report(stage: str, fraction: float) -> None:
            self.progress.update(stage, fraction, where)

        warnings: list[str] = []

        def warn(message: str) -> None:
            warnings.append(message)
            self.warn(f"{job.item.name}: {message}" if self.batch else message)

        report("read", 0.0)
        image = imageio.read_image(job.item, warn)
        _check_not_a_picture_stack(image, job.item.path)
        card, net = self.models.get(effective_dims(image))
        self._check_formats(job, image, card, net)
        common = dict(
            roi=args.roi, output_grid=args.output_grid, overlap=args.overlap, memory_limit=self.memory_limit
        )
        result = segment_lesions(
            image,
            net,
            card,
            self.device,
            tta=args.tta,
            threshold=args.threshold,
            batch_size=self.batch_size,
            progress=report,
            warn=warn,
            # The table's mean probabilities need 8-bit ones only; without either, memory stays at a
            # few bytes per HR voxel.
            probabilities="float32" if job.probabilities else ("uint8" if args.lesion_table else "none"),
            number_lesions=True,
            fully_connected=not args.face_connected,
            **common,
        )
        mask, probabilities = result.mask, result.probabilities
        sr = None
        if job.sr_image:
            sr = super_resolve_image(image, net, card, self.device, tta=args.tta, progress=report, **common)
        report("write", 0.0)
        threshold = card_threshold(card, args.threshold)
        # Labelled once, for the table and the numbered mask (the probabilities lie on the mask's grid).
        rows = lesions.lesion_rows(
            result.numbered, probabilities, diameters=bool(args.lesion_table), planar=lesions.is_planar(mask)
        )
        confidence = lesions.low_confidence(rows, card.get("plausibility", {}).get("min_mean_probability"))
        if confidence:
            warn(confidence)
        unmeasured = headers.unmeasured_pixels(image, job.item.path) if args.lesion_table and rows else None
        if unmeasured and effective_dims(image) == 2:
            spacing = " x ".join(f"{v:g}" for v in image.GetSpacing()[:2])
            warn(
                f"the lesion table's sizes in mm are not measured ones: {unmeasured} (its pixels are read as "
                f"{spacing} mm); calibrate them, or read them as pixels"
            )
        record = provenance.record(card, args, threshold, job.item.path.name, Grid.from_image(mask), warnings)
        written, names = mask, ("lesion",)
        if args.numbered_lesions:
            written, count = lesions.numbered_mask(mask, result.numbered)
            names = [f"Lesion {k}" for k in range(1, count + 1)] or ["Lesion"]
        written.SetMetaData(provenance.METADATA_KEY, json.dumps(record))
        imageio.write_image(written, job.mask, args.overwrite, staging, names)
        if job.probabilities:
            self._write_float(probabilities, job.probabilities, staging)
        if sr is not None:
            self._write_float(sr, job.sr_image, staging)
        if args.figure:
            from ..inference.figure import FigureInfo, overlay_figure

            info = FigureInfo(record["model"], record["threshold"], fully_connected=not args.face_connected)
            overlay_figure(image, mask, args.figure, args.overwrite, staging, info)
        report("write", 1.0)
        return rows, record


def run(args: argparse.Namespace) -> int:
    import time

    _check_args(args)
    if args.demo:
        _demo(args)
    if not args.inputs:
        raise UserError("give at least one input image (or --demo)")
    items, batch = imageio.find_inputs(args.inputs)
    items = _without_earlier_outputs(items, args.inputs)
    jobs = _plan(args, items, batch)
    session = _Session(args, batch)
    table: list[dict] = []
    records: list[dict] = []
    failures: list[str] = []
    done: list[str] = []
    started = time.monotonic()
    for k, job in enumerate(jobs):
        where = f"{job.item.name} ({k + 1}/{len(jobs)})" if len(jobs) > 1 else job.item.name
        try:
            # One input's outputs appear together or not at all (a single input's table included).
            with imageio.Staging(args.overwrite) as staging:
                rows, record = session.segment(job, where, staging)
                if args.lesion_table and not batch:
                    lesions.write_lesion_table(
                        rows, args.lesion_table, args.overwrite, record, staging, _columns(record)
                    )
                written = staging.commit()
            session.progress.log(
                _summary(job.item.name, rows, written, volumes=int(record["spatial_dims"]) == 3)
            )
        except UserError as exc:
            if not batch:
                raise
            failures.append(job.item.path.name)
            print(f"error: {job.item}: {exc}", file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt:
            if batch:
                _finish_batch(args, table, records)
                finished = f"finished and kept: {_names(done)}; " if done else ""
                # Said even with --quiet, like an error: the user must know what the folder now holds.
                left = _names([j.item.path.name for j in jobs[k:]])
                print(f"{finished}not done: {left}", file=sys.stderr, flush=True)
            raise
        done.append(job.item.path.name)
        records.append(record)
        table += [{"case": job.item.name, **r} for r in rows] if batch else rows
    if batch:
        _finish_batch(args, table, records)
    session.progress.log(
        f"segmented {len(jobs) - len(failures)} of {len(jobs)} input(s) in {time.monotonic() - started:.1f} s"
    )
    if failures:
        raise UserError(f"{len(failures)} of {len(jobs)} input(s) failed (reasons above): {_names(failures)}")
    return 0


def _summary(name: str, rows: list[dict], written: list[Path], volumes: bool) -> str:
    """What one input gave and where each output went (volumes in mL, as clinicians read them; a volume
    without lesions too, which the rows alone cannot tell from an image)."""
    if volumes:
        amount = f"{sum(r['volume_mm3'] for r in rows) / 1000:.2f} mL"
    else:
        amount = f"{sum(r.get('area_mm2', 0.0) for r in rows):.1f} mm2"
    return f"{name}: {len(rows)} lesion(s), {amount} in total; wrote {', '.join(str(p) for p in written)}"


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


def _columns(record: dict) -> list[str]:
    planar = record["spatial_dims"] == 2 and len(record["mask_spacing_mm"]) == 3
    return lesions.table_columns(int(record["spatial_dims"]), planar=planar)


def _finish_batch(args: argparse.Namespace, table: list[dict], records: list[dict]) -> None:
    """A batch's table holds the inputs that finished (all of them, or those before a cancel)."""
    if args.lesion_table and records:
        meta = {**provenance.shared(records), "inputs": [r["input"] for r in records]}
        lesions.write_lesion_table(
            table, args.lesion_table, args.overwrite, meta, columns=_columns(records[0])
        )
