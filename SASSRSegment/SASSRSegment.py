"""SASSRSegment: lesion segmentation at super-resolution in 3D Slicer.

The module runs the Slicer-free engine (`SASSRSegmentLib`) in a background process with Slicer's Python,
reads its JSON progress lines, and imports the high-resolution (HR) label map into a segmentation whose
reference geometry is the HR grid, so that editing in Segment Editor happens at HR.

Everything above the "Slicer module" section is plain Python: pytest imports this file without Slicer
to test the command line, the progress parsing, the model cards and the process runner. The Logic below
it needs no Qt and no parameter node, so that Testing/test_slicer_core.py runs it on Slicer's core
libraries (the slicer-core wheel) with small stand-ins for the application.
"""

import csv
import importlib.util
import json
import logging
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from SASSRSegmentLib.bundle import bundled_models, validation_dice

try:
    # Slicer's application, not just its core libraries (the slicer-core wheel has no Qt).
    import qt
    import slicer
except ImportError:
    slicer = None

if slicer is not None:
    import vtk
    from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
    from slicer.i18n import tr as _
    from slicer.i18n import translate
    from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
    from slicer.util import VTKObservationMixin
else:
    # Plain Python (pytest, CI): only the Slicer-free helpers are used; the Slicer classes get inert bases.
    qt = vtk = None
    vtkMRMLMarkupsROINode = vtkMRMLScalarVolumeNode = vtkMRMLSegmentationNode = object

    def _(text):
        return text

    def translate(context, text):
        return text

    def WithinRange(minimum, maximum):
        return (minimum, maximum)

    def parameterNodeWrapper(cls):
        return cls

    class _SlicerBase:
        """Stands in for Slicer's base classes outside Slicer."""

    ScriptedLoadableModule = ScriptedLoadableModuleLogic = _SlicerBase
    ScriptedLoadableModuleTest = ScriptedLoadableModuleWidget = _SlicerBase

    class VTKObservationMixin:
        """Stands in for slicer.util.VTKObservationMixin outside Slicer."""


MODULE_DIR = Path(__file__).resolve().parent
MODELS_DIR = MODULE_DIR / "Resources" / "Models"
SAMPLE_PATH = MODULE_DIR / "Resources" / "Samples" / "brats_2013_pat0005_1_flair_2mm.nrrd"
ICON_PATH = MODULE_DIR / "Resources" / "Icons" / "SASSRSegment.png"
ENGINE_PACKAGE = "SASSRSegmentLib"
TORCH_REQUIREMENT = ">=2.1"

LESION_SEGMENT_NAME = "Lesion"
LESION_COLOR = (0.95, 0.45, 0.15)
# Neoplasm is a type of the DICOM master list (CID 7159), not of Slicer's General Anatomy list: naming the
# context that holds it lets the terminology selector find the entry.
LESION_TERMINOLOGY = (
    "Segmentation category and type - DICOM master list"
    "~SCT^49755003^Morphologically Altered Structure~SCT^108369006^Neoplasm~^^"
    "~Anatomic codes - DICOM master list~^^~^^"
)
# Marks a segmentation that received a volume's lesions, with that volume (a node reference, so it
# follows the volume through scene save and load).
INPUT_VOLUME_REFERENCE_ROLE = "sassrSegmentInputVolume"

CITATION = (
    'Luo et al., "Scale-aware super-resolution network with dual affinity learning for lesion segmentation '
    'from medical images", IEEE Transactions on Neural Networks and Learning Systems, 2024 '
    '(<a href="https://arxiv.org/abs/2305.19063">arXiv 2305.19063</a>).'
)

DEVICE_CHOICES = ("auto", "cpu", "gpu")
ENGINE_DEVICES = ("auto", "cpu", "cuda", "mps")
CANCEL_GRACE_S = 2.0
POLL_INTERVAL_MS = 100
EXIT_USER_ERROR = 2
EXIT_CANCELLED = 130
STDERR_LINES_KEPT = 200
WARNING_PREFIX = "warning:"
IMAGE_EXTENSIONS = (".nii.gz", ".seg.nrrd", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd", ".png", ".jpg", ".jpeg")
IMAGE_EXTENSIONS += (".tiff", ".tif", ".bmp", ".dcm")
# DICOM modality -> words a model card's "modality" uses for it.
MODALITY_WORDS = {"MR": ("mr", "mri", "magnetic"), "US": ("ultrasound", "us"), "CT": ("ct", "computed")}
# Engine messages name command-line options; the panel names its own controls instead.
PANEL_WORDING = (
    (r"; segment a region with --roi .*$", "; draw a Region (ROI) around the lesions, then retry"),
    (r"choose a (\d)D model with --model( \(see `models`\))?", r"choose a \1D model in the Model list"),
    (r"choose a matching model with --model", "choose a matching model in the Model list"),
    (r"( \(image_sr=false\))?; drop --sr-image", '; untick "also create the super-resolved image"'),
    (
        r"--roi: each max must be larger than its min",
        "the Region (ROI) is flat: give it a size along every axis",
    ),
    (
        r"--roi does not overlap the image; check that it is given in RAS millimetres",
        "the Region (ROI) does not overlap the input volume: move it over the image",
    ),
    (
        r"--device \S+ was asked for but (.*); use --device cpu or auto",
        r"\1: choose Auto or CPU as the Device",
    ),
    (r"; pass --model with a bundle folder written by `train`", ": reinstall the SASSRSegment extension"),
    (r"--threshold", "the Threshold"),
    (r"--roi", "the Region (ROI)"),
    (r"--model", "the Model"),
    (r"--device", "the Device"),
)


#
# Slicer-free helpers
#


def readModelCards(modelsDir=MODELS_DIR):
    """The model cards (`<modelsDir>/<name>/model.json`), sorted by name.

    A card's "name" is its folder's name: that is what `--model` resolves for bundled models.
    Unreadable cards are skipped with a warning so one broken bundle does not hide the others.
    """
    cards = []
    for name, folder in bundled_models(Path(modelsDir)).items():
        path = folder / "model.json"
        try:
            card = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            logging.warning("SASSRSegment: skipping unreadable model card %s: %s", path, exc)
            continue
        if not isinstance(card, dict):
            logging.warning("SASSRSegment: skipping model card %s: not a JSON object", path)
            continue
        card["name"] = name
        card["folder"] = str(folder)
        cards.append(card)
    return cards


def cardSpatialDims(card):
    """2 or 3: the dimensionality of the images a model takes (0 when its card does not say)."""
    return int((card.get("preprocessing") or {}).get("spatial_dims") or 0)


def hasImageSrDecoder(card):
    """Whether the model's network has the image-SR decoder that the super-resolved image needs.

    The card's "network" block is the network configuration the weights were saved with; a card without
    "image_sr" predates the option, and the network's default (the full network, with the decoder) applies.
    """
    return bool((card.get("network") or {}).get("image_sr", True))


def cardMatchesModality(card, modality):
    """Whether a card's free-text modality names the DICOM modality (MR, US, CT)."""
    words = re.findall(r"[a-z]+", str(card.get("modality") or "").lower())
    return any(word in words for word in MODALITY_WORDS.get(str(modality or "").upper(), ()))


def defaultModelName(cards, spatialDims, modality=None):
    """The model for an input: the first card (by name, as the engine picks) of the input's dimensionality,
    preferring one of the input's DICOM modality when that is known; None when no card fits."""
    fitting = [card for card in cards if cardSpatialDims(card) == spatialDims]
    preferred = [card for card in fitting if cardMatchesModality(card, modality)]
    chosen = (preferred or fitting or [None])[0]
    return chosen["name"] if chosen else None


def gridSpatialDims(dimensions):
    """2 for a one-slice volume (how Slicer holds a 2D image, and how the engine treats it), else 3."""
    return 2 if int(dimensions[2]) == 1 else 3


def hrScales(card, dimensions):
    """Per-axis refinement of the engine's HR output: the card's scale, except across a 2D image's slice."""
    scale = int(card["preprocessing"]["scale"])
    return [scale, scale, 1 if gridSpatialDims(dimensions) == 2 else scale]


def expectedInputText(card):
    """One line saying what image a model expects, from its card's preprocessing block."""
    prep = card.get("preprocessing") or {}
    scale = prep.get("scale", "?")
    channels = ", ".join(prep.get("channels") or []) or _("one channel")
    if prep.get("spatial_dims") == 2:
        side = prep.get("lr_longer_side")
        size = _("longer side resampled to {pixels} pixels").format(pixels=side) if side else ""
        return _("2D image ({channels}); {size}; mask at x{scale} finer resolution").format(
            channels=channels, size=size, scale=scale
        )
    spacing = prep.get("lr_spacing")
    spacingText = " x ".join(f"{float(s):g}" for s in spacing) + " mm" if spacing else "?"
    return _("3D volume ({channels}) resampled to {spacing}; mask at x{scale} finer resolution").format(
        channels=channels, spacing=spacingText, scale=scale
    )


def modelSummary(card):
    """The model combo box tooltip: modality, expected input, scale and validation Dice from the card."""
    dice = validation_dice(card)
    diceText = f"{float(dice):.3f}" if isinstance(dice, (int, float)) else _("not recorded")
    lines = [
        card["name"] + (f": {card['description']}" if card.get("description") else ""),
        _("Modality: {modality}").format(modality=card.get("modality") or _("not stated")),
        _("Expected input: {text}").format(text=expectedInputText(card)),
        _("Scale: x{scale}").format(scale=(card.get("preprocessing") or {}).get("scale", "?")),
        _("Validation Dice (HR, mean): {dice}").format(dice=diceText),
    ]
    return "\n".join(lines)


def modelsHelpHtml(cards):
    """The part of the module help that says what each bundled model expects."""
    if not cards:
        return "<p>" + _("No bundled model was found in Resources/Models.") + "</p>"
    items = "".join(
        f"<li><b>{card['name']}</b> ({card.get('modality') or '?'}): {expectedInputText(card)}</li>"
        for card in cards
    )
    return f"<ul>{items}</ul>"


def detectTorchDevices():
    """What PyTorch sees in this Python: {"torch": version or None, "cuda": GPU name or None, "mps": bool}.

    Only imports torch when it is installed, so a missing torch costs nothing and raises nothing.
    """
    devices = {"torch": None, "cuda": None, "mps": False, "error": None}
    if importlib.util.find_spec("torch") is None:
        return devices
    try:
        import torch
    except Exception as exc:  # a broken install raises anything from OSError to RuntimeError
        devices["error"] = f"{type(exc).__name__}: {exc}"
        return devices
    devices["torch"] = torch.__version__
    if torch.cuda.is_available():
        devices["cuda"] = torch.cuda.get_device_name(0)
    mps = getattr(torch.backends, "mps", None)
    devices["mps"] = bool(mps is not None and mps.is_available())
    return devices


def deviceSummary(devices):
    """One line for the panel saying which device "Auto" will use."""
    if devices.get("error"):
        return _("PyTorch failed to load: {error}").format(error=devices["error"])
    if not devices.get("torch"):
        return _("PyTorch is not installed: it will be offered on the first run.")
    if devices.get("cuda"):
        return _("PyTorch {version}; GPU: {name} (CUDA)").format(
            version=devices["torch"], name=devices["cuda"]
        )
    if devices.get("mps"):
        return _("PyTorch {version}; GPU: Apple (MPS)").format(version=devices["torch"])
    return _("PyTorch {version}; no GPU found, the CPU will be used").format(version=devices["torch"])


def deviceArgument(choice, devices=None):
    """Map the panel's Auto/CPU/GPU choice (or an engine device name) to the engine's `--device` value.

    "gpu" means CUDA unless PyTorch only sees an Apple GPU; asking for an absent GPU is left to the
    engine, which says so in one line.
    """
    value = str(choice).strip().lower()
    if value == "gpu":
        devices = devices or {}
        return "mps" if devices.get("mps") and not devices.get("cuda") else "cuda"
    if value not in ENGINE_DEVICES and not re.fullmatch(r"cuda:\d+", value):
        raise ValueError(_("Unknown device '{device}': use auto, cpu or gpu.").format(device=choice))
    return value


def formatNumber(value):
    """Shortest exact text for a float on the command line."""
    return repr(float(value))


def roiBoundsArguments(bounds):
    """The six `--roi` values (xmin xmax ymin ymax zmin zmax, RAS mm) as strings, after validation."""
    values = [float(v) for v in bounds]
    if len(values) != 6 or not all(math.isfinite(v) for v in values):
        raise ValueError(_("The Region (ROI) needs six finite bounds (xmin xmax ymin ymax zmin zmax)."))
    # The engine takes a box with a size along every axis; an ROI added but never placed has size 0.
    if any(values[2 * k] >= values[2 * k + 1] for k in range(3)):
        raise ValueError(_("The Region (ROI) is empty or flat: give it a size along every axis."))
    return [formatNumber(v) for v in values]


def roiOverlapsGrid(bounds, rasToIjk, dimensions):
    """Whether a box (RAS bounds in the grid's own frame) touches a voxel of the grid.

    The same test as the engine's: the box's corners in continuous index must overlap the voxels'
    extent [-1/2, n - 1/2] along every axis.
    """
    indices = [
        [sum(rasToIjk[r][c] * v for c, v in enumerate((*corner, 1.0))) for r in range(3)]
        for corner in boxCorners(bounds)
    ]
    box = boundsOfPoints(indices)
    return all(box[2 * k + 1] > -0.5 and box[2 * k] < dimensions[k] - 0.5 for k in range(3))


def sliceAxisBounds(bounds, ijkToRas, dimensions):
    """For a 2D image (one slice), the box with its extent along the slice normal set to the slice's.

    An ROI drawn on a 2D image may be flat across it; the engine still needs a box with a thickness.
    """
    axis = max(range(3), key=lambda r: abs(ijkToRas[r][2]))
    sliceBounds = voxelCornerBounds(ijkToRas, dimensions)
    bounds = list(bounds)
    bounds[2 * axis : 2 * axis + 2] = sliceBounds[2 * axis : 2 * axis + 2]
    return bounds


def boxCorners(bounds):
    """The eight corners of an axis-aligned box given as (xmin, xmax, ymin, ymax, zmin, zmax)."""
    xs, ys, zs = bounds[0:2], bounds[2:4], bounds[4:6]
    return [(x, y, z) for x in xs for y in ys for z in zs]


def boundsOfPoints(points):
    """The axis-aligned bounds (xmin, xmax, ymin, ymax, zmin, zmax) of 3D points."""
    points = list(points)
    if not points:
        raise ValueError("boundsOfPoints needs at least one point")
    bounds = []
    for axis in range(3):
        values = [p[axis] for p in points]
        bounds += [min(values), max(values)]
    return bounds


def voxelCornerBounds(ijkToRas, dimensions):
    """Physical bounds of a grid: voxel corners at index -1/2 and n-1/2, mapped by a 4x4 IJK-to-RAS.

    `ijkToRas` is a 4x4 nested sequence (row-major). Two grids cover the same physical extent exactly
    when these bounds agree, whatever their spacing.
    """
    box = []
    for n in dimensions:
        box += [-0.5, n - 0.5]
    corners = []
    for i, j, k in boxCorners(box):
        corners.append([sum(ijkToRas[r][c] * v for c, v in enumerate((i, j, k, 1.0))) for r in range(3)])
    return boundsOfPoints(corners)


def superResolvedGrid(ijkToRas, dimensions, scales):
    """The input grid made `scales[k]` times finer along axis k over exactly the same physical extent.

    This is the grid of the engine's HR output (`hr_grid` in docs/DESIGN.md): fine voxel i sits at input
    continuous index (i + 1/2) / s - 1/2. Returns (4x4 IJK-to-RAS rows, dimensions).
    """
    fine = [[float(value) for value in row] for row in ijkToRas]
    for r in range(3):
        fine[r][3] += sum(fine[r][c] * (1.0 / scales[c] - 1.0) / 2.0 for c in range(3))
        for c in range(3):
            fine[r][c] /= scales[c]
    return fine, [int(dimensions[k]) * int(scales[k]) for k in range(3)]


def pythonExecutable():
    """Slicer's Python launcher when running in Slicer (it sets up Slicer's libraries), else this Python."""
    return shutil.which("PythonSlicer") or sys.executable


def commandEnvironment(baseEnvironment, moduleDir=MODULE_DIR):
    """The environment for the engine process: the module folder first on PYTHONPATH, unbuffered UTF-8 output."""
    env = dict(baseEnvironment)
    paths = [str(moduleDir)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    # Progress lines must arrive as they are printed, and decode the same whatever the system locale.
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def segmentCommand(
    python,
    inputPath,
    outputPath,
    modelName=None,
    device="auto",
    threshold=None,
    tta=False,
    roiBounds=None,
    srImagePath=None,
    lesionTablePath=None,
):
    """The `segment` command line the Logic runs (a list of strings, no shell).

    modelName None lets the engine pick the bundled model for the input's dimensionality; threshold
    None uses the one in the model card (chosen on its validation split).
    """
    command = [str(python), "-m", ENGINE_PACKAGE, "segment", str(inputPath), "-o", str(outputPath)]
    if modelName:
        command += ["--model", str(modelName)]
    command += ["--device", deviceArgument(device), "--progress", "json"]
    if threshold is not None:
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(_("The threshold must be between 0 and 1."))
        command += ["--threshold", formatNumber(threshold)]
    if tta:
        command.append("--tta")
    if roiBounds is not None:
        command += ["--roi", *roiBoundsArguments(roiBounds)]
    if srImagePath:
        command += ["--sr-image", str(srImagePath)]
    if lesionTablePath:
        command += ["--lesion-table", str(lesionTablePath)]
    return command


def parseProgressLine(line):
    """One stdout line of `--progress json` as an event dict, or None when it is not a progress record.

    Progress: {"kind": "progress", "stage", "fraction" (clamped to [0, 1]), "message", "elapsed"}.
    Log: {"kind": "log", "message"}; a log record starting "warning:" is {"kind": "warning", "message"}.
    Anything else (a stray print, malformed JSON) gives None.
    """
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    if "log" in record:
        message = str(record["log"])
        # The engine sends its warnings as log records prefixed "warning: " in JSON mode.
        if message.startswith(WARNING_PREFIX):
            return {"kind": "warning", "message": message[len(WARNING_PREFIX) :].strip()}
        return {"kind": "log", "message": message}
    if "stage" not in record or "fraction" not in record:
        return None
    try:
        fraction = float(record["fraction"])
        elapsed = float(record.get("elapsed") or 0.0)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(fraction):
        return None
    return {
        "kind": "progress",
        "stage": str(record["stage"]),
        "fraction": min(max(fraction, 0.0), 1.0),
        "message": str(record.get("message") or ""),
        "elapsed": elapsed,
    }


def failureMessage(returnCode, stderrLines):
    """One line explaining why the engine process failed, from its exit code and standard error."""
    if returnCode == EXIT_CANCELLED:
        return _("Segmentation was cancelled.")
    lines = [line.strip() for line in stderrLines if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:") :].strip()
    joined = "\n".join(lines)
    if "No module named 'torch'" in joined:
        return _("PyTorch is not installed in Slicer's Python: install it with the PyTorch Utils module.")
    if "out of memory" in joined.lower():
        return _("Out of memory: choose the CPU device or a smaller region (ROI), then retry.")
    if lines:
        return _("The segmentation process failed (exit code {code}): {line}").format(
            code=returnCode, line=lines[-1]
        )
    return _("The segmentation process failed (exit code {code}) without a message.").format(code=returnCode)


def panelMessage(message):
    """An engine message reworded for the panel: its controls instead of command-line options."""
    for pattern, replacement in PANEL_WORDING:
        message = re.sub(pattern, replacement, message)
    return " ".join(message.split())


def formatElapsed(seconds):
    """Elapsed time as m:ss (or h:mm:ss) for the status line."""
    seconds = int(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def uniqueName(base, existingNames):
    """`base`, or `base 2`, `base 3`, ... : the first not in existingNames (never replace silently)."""
    existing = set(existingNames)
    if base not in existing:
        return base
    index = 2
    while f"{base} {index}" in existing:
        index += 1
    return f"{base} {index}"


def outputNodeNames(inputName):
    """Names of the nodes a run adds to the scene, derived from the input volume's name."""
    return {
        "segmentation": _("{name} lesions").format(name=inputName),
        "srImage": _("{name} super-resolved").format(name=inputName),
        "table": _("{name} lesion table").format(name=inputName),
    }


def imageStem(path):
    """A file's name without its image extension (double extensions such as .nii.gz included)."""
    name = Path(path).name
    lower = name.lower()
    for extension in IMAGE_EXTENSIONS:
        if lower.endswith(extension) and len(name) > len(extension):
            return name[: -len(extension)]
    return name


def outputPathsForFiles(inputPaths, outputFolder, suffix="_lesions.nrrd"):
    """One output path per input (`<stem><suffix>` in outputFolder); equal stems get ` 2`, ` 3`, ..."""
    used = []
    paths = []
    for inputPath in inputPaths:
        stem = uniqueName(imageStem(inputPath), used)
        used.append(stem)
        paths.append(Path(outputFolder) / f"{stem}{suffix}")
    return paths


def readCsvColumns(path):
    """A CSV table as [(column name, values)], values converted to int or float when every cell allows.

    The lesion table is read this way (rather than by Slicer's CSV reader) so that numeric columns are
    numeric in the table node and sort as numbers.
    """
    with open(path, newline="", encoding="utf-8") as stream:
        rows = list(csv.reader(stream))
    if not rows:
        return []
    header, body = rows[0], rows[1:]
    columns = []
    for index, name in enumerate(header):
        cells = [row[index] if index < len(row) else "" for row in body]
        columns.append((name, _convertColumn(cells)))
    return columns


# The lesion table's column names end in their unit (engine convention); the table node shows it.
_UNIT_SUFFIXES = (("_ml", "mL"), ("_mm3", "mm3"), ("_mm2", "mm2"), ("_mm", "mm"))
COLUMN_DESCRIPTIONS = {
    "id": "lesion number (as in the segment names and the figure)",
    "axial_diameter_mm": "longest diameter in the measurement plane (RECIST 1.1 / RANO)",
    "perpendicular_diameter_mm": "extent across the axial diameter, in the same slice",
    "longest_diameter_mm": "longest 3D diameter",
    "mean_probability": "the network's mean lesion probability over the lesion (0..1)",
}


def columnUnit(name):
    """The unit a lesion-table column name ends in ("" when it has none)."""
    return next((unit for suffix, unit in _UNIT_SUFFIXES if name.endswith(suffix)), "")


def _convertColumn(cells):
    for convert in (int, float):
        try:
            return [convert(cell) for cell in cells]
        except ValueError:
            continue
    return cells


class SegmentRunner:
    """Runs one engine command in the background and turns its output into events.

    Slicer polls it from a timer so the application stays responsive; tests drive it directly.
    The process gets its own process group so that Cancel also reaches the Python child that the
    PythonSlicer launcher starts.
    """

    def __init__(self, command, env=None, cwd=None, cancelGraceS=CANCEL_GRACE_S):
        self.command = [str(part) for part in command]
        self.env = env
        self.cwd = cwd
        self.cancelGraceS = cancelGraceS
        self.returnCode = None
        self.cancelled = False
        self.stderrLines = deque(maxlen=STDERR_LINES_KEPT)
        self.warnings = []
        self._queue = queue.Queue()
        self._readers = []
        self._process = None
        self._killAt = None
        self._startTime = None

    def start(self):
        options = {}
        if os.name == "nt":
            options["creationflags"] = subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            options["start_new_session"] = True
        self._process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=self.cwd,
            text=True,
            encoding="utf-8",
            errors="replace",
            **options,
        )
        self._startTime = time.monotonic()
        for stream, kind in ((self._process.stdout, "stdout"), (self._process.stderr, "stderr")):
            reader = threading.Thread(target=self._read, args=(stream, kind), daemon=True)
            reader.start()
            self._readers.append(reader)

    def _read(self, stream, kind):
        with stream:
            for line in stream:
                self._queue.put((kind, line.rstrip("\r\n")))

    @property
    def finished(self):
        return self.returnCode is not None

    def elapsed(self):
        return 0.0 if self._startTime is None else time.monotonic() - self._startTime

    def poll(self):
        """New events since the last call; sets `returnCode` once the process and its output have ended."""
        if self._killAt is not None and time.monotonic() >= self._killAt:
            self._killAt = None
            self._signal(hard=True)
        # Decide "done" before draining: once the readers have ended, every line is already queued.
        done = self._process.poll() is not None and not any(reader.is_alive() for reader in self._readers)
        events = []
        while True:
            try:
                kind, line = self._queue.get_nowait()
            except queue.Empty:
                break
            event = self._event(kind, line)
            if event:
                events.append(event)
        if done and self.returnCode is None:
            self.returnCode = self._process.returncode
        return events

    def _event(self, kind, line):
        if kind == "stderr":
            if not line.strip():
                return None
            self.stderrLines.append(line)
            # Outside JSON mode the engine prints its warnings on standard error.
            if line.startswith(WARNING_PREFIX):
                event = {"kind": "warning", "message": line[len(WARNING_PREFIX) :].strip()}
            else:
                return {"kind": "stderr", "message": line}
        else:
            event = parseProgressLine(line)
        if event is None and line.strip():
            logging.debug("SASSRSegment: unparsed engine output: %s", line)
        elif event and event["kind"] == "warning":
            self.warnings.append(event["message"])
        return event

    def wait(self, onEvent=None, idle=None, interval=0.05):
        """Poll until finished, passing events to onEvent and calling idle() between polls."""
        while not self.finished:
            for event in self.poll():
                if onEvent:
                    onEvent(event)
            if idle:
                idle()
            time.sleep(interval)
        return self.returnCode

    def cancel(self):
        """Ask the process to stop (SIGTERM); poll() kills it if it is still there after the grace time."""
        if self.finished or self.cancelled or self._process is None:
            return
        self.cancelled = True
        self._signal(hard=False)
        self._killAt = time.monotonic() + self.cancelGraceS

    def terminate(self):
        """Cancel and wait until the process group has ended (killed after the grace time)."""
        if self._process is None:
            return
        self.cancel()
        try:
            self._process.wait(timeout=self.cancelGraceS)
        except subprocess.TimeoutExpired:
            pass
        # Also ends a child that outlived the launcher.
        self._signal(hard=True)
        self._process.wait()

    def _signal(self, hard):
        if os.name == "nt":
            # Windows has no SIGTERM for a console process group: end the whole tree at once.
            if self._process.poll() is None:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._process.pid)], capture_output=True)
            return
        try:
            os.killpg(self._process.pid, signal.SIGKILL if hard else signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass  # the group has already exited


@dataclass
class SegmentationResult:
    """What a run of segmentVolume ended with; passed to onFinished."""

    status: str  # "completed", "cancelled" or "failed"
    message: str = ""
    elapsed: float = 0.0
    segmentationNode: object = None
    segmentId: str = ""
    srImageNode: object = None
    tableNode: object = None
    lesionCount: int = -1
    warnings: list = field(default_factory=list)


@dataclass
class FileResult:
    """The outcome of segmentFiles for one input file."""

    inputPath: str
    outputPath: str = ""
    error: str = ""
    warnings: list = field(default_factory=list)


#
# Slicer module
#


def registerSampleData():
    """Register the shipped sample in the Sample Data module (one click for a first try)."""
    try:
        import SampleData
    except ImportError:
        logging.info("SASSRSegment: the Sample Data module is absent; the sample is not registered.")
        return
    if not SAMPLE_PATH.is_file():
        logging.warning("SASSRSegment: sample missing, not registered: %s", SAMPLE_PATH)
        return
    try:
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="SASSRSegment",
            sampleName="BraTS FLAIR 2 mm",
            uris=[SAMPLE_PATH.as_uri()],
            fileNames=[SAMPLE_PATH.name],
            nodeNames=["BraTS FLAIR 2mm"],
            thumbnailFileName=str(ICON_PATH),
        )
    except (TypeError, AttributeError) as exc:  # an older or newer Sample Data API must not break the module
        logging.warning("SASSRSegment: could not register the sample: %s", exc)


class SASSRSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SASSR Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SASSRSegment contributors"]
        self.parent.helpText = (
            _(
                "Segments lesions at twice the input's resolution: a low-resolution volume or image goes in, "
                "a lesion segmentation on a grid two times finer comes out, covering exactly the input's extent, "
                "so Segment Editor edits it at the higher resolution. Choose the input, a model matching its "
                "modality, and click <b>Segment lesions</b>. Each model expects:"
            )
            + modelsHelpHtml(readModelCards())
            + _("Intensities are normalised by the model itself; give the image as acquired. ")
            + _("Method: {citation}").format(citation=CITATION)
        )
        self.parent.acknowledgementText = _(
            "The sample volume is a 2 mm version of BraTS 2015 case brats_2013_pat0005_1 (Menze et al., "
            "IEEE TMI 2015), CC BY-NC-SA 3.0: see Resources/Samples for its licence and attribution."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


@parameterNodeWrapper
class SASSRSegmentParameterNode:
    """The module's state, saved with the scene.

    modelName and device are kept in sync with their combo boxes by the widget (their choices are only
    known at run time); the other fields are bound to the .ui through SlicerParameterName.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelName: str = ""
    device: str = "auto"
    useTta: bool = False
    threshold: Annotated[float, WithinRange(0.05, 0.95)] = 0.5
    roi: vtkMRMLMarkupsROINode
    createSrImage: bool = False
    createLesionTable: bool = True
    outputSegmentation: vtkMRMLSegmentationNode


class SASSRSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._inputVolumeId = None
        self._job = None
        self._cards = []
        self._devices = None
        self._statusTimer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SASSRSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SASSRSegmentLogic()
        self._cards = readModelCards()
        self._fillModelComboBox()
        self._fillDeviceComboBox()
        self.ui.progressBar.hide()
        self._statusTimer = qt.QTimer()
        self._statusTimer.setInterval(500)
        self._statusTimer.connect("timeout()", self._updateRunningStatus)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)

        self.initializeParameterNode()
        # Importing torch takes seconds: let the panel appear first.
        qt.QTimer.singleShot(0, self._detectDevices)

    def cleanup(self):
        # Reload and quit: no process may outlive the module, no copy of the patient image may stay on disk.
        if self.logic:
            self.logic.cleanup()
        self._job = None
        if self._statusTimer:
            self._statusTimer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateFromParameterNode
            )

    def onSceneStartClose(self, caller, event):
        # Results of a run cannot go into a scene that is being closed.
        if self._job:
            self._job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(SASSRSegmentParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            volumes = [
                node
                for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                if not node.IsA("vtkMRMLLabelMapVolumeNode")
            ]
            if volumes:
                self._parameterNode.inputVolume = volumes[0]

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateFromParameterNode
            )
        self._parameterNode = inputParameterNode
        # A model already chosen for the input (a scene saved with one, a return to the module) is kept.
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        keepModel = volume is not None and bool(self._parameterNode.modelName)
        self._inputVolumeId = volume.GetID() if keepModel else None
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateFromParameterNode)
            self._updateFromParameterNode()

    def _fillModelComboBox(self):
        combo = self.ui.modelComboBox
        combo.clear()
        for index, card in enumerate(self._cards):
            combo.addItem(card["name"], card["name"])
            combo.setItemData(index, modelSummary(card), qt.Qt.ToolTipRole)
        combo.enabled = bool(self._cards)
        if not self._cards:
            combo.addItem(_("(no bundled model found)"), "")

    def _fillDeviceComboBox(self):
        combo = self.ui.deviceComboBox
        combo.clear()
        for label, value in ((_("Auto"), "auto"), (_("CPU"), "cpu"), (_("GPU"), "gpu")):
            combo.addItem(label, value)

    def _detectDevices(self):
        self._devices = detectTorchDevices()
        self.ui.deviceInfoLabel.text = deviceSummary(self._devices)
        gpuName = self._devices.get("cuda") or (_("Apple") if self._devices.get("mps") else None)
        self.ui.deviceComboBox.setItemText(2, _("GPU ({name})").format(name=gpuName or _("none found")))
        self.ui.deviceComboBox.setItemText(0, _("Auto ({device})").format(device=gpuName or _("CPU")))

    def _updateFromParameterNode(self, caller=None, event=None):
        if not self._parameterNode:
            return
        volume = self._parameterNode.inputVolume
        volumeId = volume.GetID() if volume else None
        if volumeId != self._inputVolumeId:
            self._inputVolumeId = volumeId
            self._onInputVolumeChanged(volume)
        for combo, value in (
            (self.ui.modelComboBox, self._parameterNode.modelName),
            (self.ui.deviceComboBox, self._parameterNode.device),
        ):
            index = combo.findData(value)
            if index >= 0 and index != combo.currentIndex:
                wasBlocked = combo.blockSignals(True)
                combo.currentIndex = index
                combo.blockSignals(wasBlocked)
        card = self._currentCard()
        self.ui.modelComboBox.toolTip = modelSummary(card) if card else _("No bundled model was found.")
        self._updateSrImageOption(card)
        self._checkCanApply()

    def _onInputVolumeChanged(self, volume):
        if volume is None:
            return
        name = self.logic.defaultModelName(volume)
        if name:
            self._selectModel(name)
        # A segmentation made for another volume must not receive this one's lesions.
        segmentation = self._parameterNode.outputSegmentation
        madeFor = segmentationInputVolume(segmentation) if segmentation else None
        if madeFor is not None and madeFor.GetID() != volume.GetID():
            self._parameterNode.outputSegmentation = None

    def _updateSrImageOption(self, card):
        available = card is None or hasImageSrDecoder(card)
        self.ui.srImageCheckBox.enabled = available
        if available:
            self.ui.srImageCheckBox.toolTip = _(
                "Also create the network's super-resolved image as a volume (for review; the segmentation "
                "does not need it)."
            )
            return
        self.ui.srImageCheckBox.toolTip = _(
            "The model '{name}' has no image super-resolution decoder: it cannot create this image."
        ).format(name=card["name"])
        if self._parameterNode.createSrImage:
            self._parameterNode.createSrImage = False

    def _currentCard(self):
        name = self._parameterNode.modelName if self._parameterNode else ""
        return next((card for card in self._cards if card["name"] == name), None)

    def _checkCanApply(self):
        if self._job:
            self.ui.applyButton.enabled = True
            self.ui.applyButton.toolTip = _("Stop the running segmentation.")
        elif self.logic.installingTorch:
            self.ui.applyButton.enabled = False
            self.ui.applyButton.toolTip = _("PyTorch is being installed.")
        elif self._parameterNode and self._parameterNode.inputVolume and self._currentCard():
            self.ui.applyButton.enabled = True
            self.ui.applyButton.toolTip = _("Segment lesions at super-resolution in the input volume.")
        else:
            self.ui.applyButton.enabled = False
            self.ui.applyButton.toolTip = _("Select an input volume and a model.")

    def onModelChanged(self, index):
        if self._parameterNode:
            self._selectModel(self.ui.modelComboBox.itemData(index) or "")

    def _selectModel(self, name):
        self._parameterNode.modelName = name
        card = self._currentCard()
        # Each model's card carries the threshold chosen on its validation split.
        if card and isinstance(card.get("threshold"), (int, float)):
            self._parameterNode.threshold = min(max(float(card["threshold"]), 0.05), 0.95)

    def onDeviceChanged(self, index):
        if self._parameterNode:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index) or "auto"

    def onApplyButton(self):
        if self._job:
            self._job.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            return
        if not self._ensureTorch():
            return
        parameters = self._parameterNode
        try:
            output = self._chooseOutput(parameters)
            if output is None:
                return
            self.ui.logTextEdit.clear()
            self._job = self.logic.segmentVolume(
                parameters.inputVolume,
                modelName=parameters.modelName,
                device=deviceArgument(parameters.device, self._devices),
                tta=parameters.useTta,
                roiNode=parameters.roi,
                wait=False,
                threshold=parameters.threshold,
                srImage=parameters.createSrImage,
                lesionTable=parameters.createLesionTable,
                onFinished=self._onFinished,
                onProgress=self._onProgress,
                onLog=self._appendLog,
                **output,
            )
        except (RuntimeError, ValueError) as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self._setRunning(True)

    def _ensureTorch(self):
        """Install PyTorch when it is missing; False when it is not usable (the user was told why)."""
        self.ui.applyButton.enabled = False  # the installer keeps the application responsive
        try:
            installed = self.logic.ensureTorch()
        except RuntimeError as exc:
            slicer.util.errorDisplay(str(exc))
            return False
        finally:
            self._checkCanApply()
        if installed:
            self._detectDevices()
        return True

    def _chooseOutput(self, parameters):
        """The segmentVolume arguments saying where the Lesion segment goes; None when the user cancels."""
        segmentation = parameters.outputSegmentation
        changeGrid = False
        if segmentation:
            status = self.logic.outputSegmentationStatus(
                segmentation, parameters.inputVolume, parameters.modelName
            )
            if status == "changeGrid":
                answer = self._askChangeGrid(segmentation, parameters.inputVolume)
                if answer is None:
                    return None
                changeGrid = answer
                segmentation = segmentation if changeGrid else None
        replaceSegment = False
        if segmentation and segmentIdByName(segmentation, LESION_SEGMENT_NAME):
            replaceSegment = self._askReplaceSegment()
            if replaceSegment is None:
                return None
        return {
            "outputSegmentation": segmentation,
            "replaceSegment": replaceSegment,
            "changeGrid": changeGrid,
        }

    def _askChangeGrid(self, segmentation, volume):
        """True: switch the segmentation to the HR grid; False: make a new segmentation; None: do not run."""
        text = _(
            "The segmentation '{segmentation}' is not on the high-resolution grid of '{volume}'. "
            "Adding the lesions switches its geometry to that grid."
        ).format(segmentation=segmentation.GetName(), volume=volume.GetName())
        return self._askChoice(
            _("Segmentation geometry"), text, _("Switch its geometry"), _("Create a new segmentation")
        )

    def _askReplaceSegment(self):
        """True: replace the existing Lesion segment; False: add a new one; None: do not run."""
        text = _("The segmentation already has a '{name}' segment.").format(name=LESION_SEGMENT_NAME)
        return self._askChoice(_("Lesion segment exists"), text, _("Replace it"), _("Add a new segment"))

    def _askChoice(self, title, text, changeLabel, keepLabel):
        """True for the button that changes the user's data, False for the other one, None for Cancel."""
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setWindowTitle(title)
        box.setText(text)
        changeButton = box.addButton(changeLabel, qt.QMessageBox.DestructiveRole)
        keepButton = box.addButton(keepLabel, qt.QMessageBox.AcceptRole)
        box.addButton(qt.QMessageBox.Cancel)
        box.exec_()
        if box.clickedButton() == changeButton:
            return True
        if box.clickedButton() == keepButton:
            return False
        return None

    def _setRunning(self, running):
        self.ui.applyButton.text = _("Cancel") if running else _("Segment lesions")
        for widget in (
            self.ui.inputsCollapsibleButton,
            self.ui.optionsCollapsibleButton,
            self.ui.outputsCollapsibleButton,
        ):
            widget.enabled = not running
        self.ui.progressBar.visible = running
        self.ui.progressBar.value = 0
        if running:
            self.ui.statusLabel.text = _("Starting...")
            self._statusTimer.start()
        else:
            self._statusTimer.stop()
        self._checkCanApply()

    def _updateRunningStatus(self):
        if not self._job:
            return
        progress = self._job.lastProgress
        stage = f"{progress['stage']}: {progress['message']}" if progress else _("Starting")
        self.ui.statusLabel.text = f"{stage} ({formatElapsed(self._job.elapsed())})"

    def _onProgress(self, event):
        self.ui.progressBar.value = int(round(100 * event["fraction"]))
        self.ui.progressBar.format = f"{event['stage']} %p%"
        self._updateRunningStatus()

    def _appendLog(self, text):
        self.ui.logTextEdit.appendPlainText(text)

    def _onFinished(self, result):
        self._job = None
        self._setRunning(False)
        elapsed = formatElapsed(result.elapsed)
        warnings = [_("Warning: {message}").format(message=message) for message in result.warnings]
        if result.status == "completed":
            found = (
                _("{count} lesion(s).").format(count=result.lesionCount) if result.lesionCount >= 0 else ""
            )
            done = _("Done in {elapsed}.").format(elapsed=elapsed)
            self.ui.statusLabel.text = " ".join(text for text in [done, found, *warnings] if text)
            if self._parameterNode:
                self._parameterNode.outputSegmentation = result.segmentationNode
                slicer.util.setSliceViewerLayers(background=self._parameterNode.inputVolume, fit=False)
        elif result.status == "cancelled":
            self.ui.statusLabel.text = _("Cancelled after {elapsed}.").format(elapsed=elapsed)
        else:
            failed = _("Failed after {elapsed}: {message}").format(elapsed=elapsed, message=result.message)
            self.ui.statusLabel.text = " ".join([failed, *warnings])
            slicer.util.errorDisplay(result.message)


def segmentIdByName(segmentationNode, name):
    """The id of the segment called `name`, or "" when there is none."""
    return segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(name) or ""


def segmentationInputVolume(segmentationNode):
    """The volume whose lesions this module put into a segmentation; None for any other segmentation."""
    return segmentationNode.GetNodeReference(INPUT_VOLUME_REFERENCE_ROLE)


class SASSRSegmentLogic(ScriptedLoadableModuleLogic):
    """Runs the engine on scene volumes or on files; usable from the Python console without the widget.

    modelsDir is where model names are looked up (the bundled models by default).
    """

    def __init__(self, modelsDir=MODELS_DIR):
        ScriptedLoadableModuleLogic.__init__(self)
        self.modelsDir = Path(modelsDir)
        self.activeJob = None
        self.installingTorch = False

    def cleanup(self):
        """Stop a running segmentation at once and delete its temporary files (module reload, quit)."""
        if self.activeJob:
            self.activeJob.abort()

    def ensureTorch(self):
        """Make sure torch is importable, offering to install it through PyTorch Utils.

        Returns True when this call installed it (what PyTorch sees must then be detected again).
        """
        if self.installingTorch:
            raise RuntimeError(_("PyTorch is being installed: wait for the installation to finish."))
        if importlib.util.find_spec("torch") is not None:
            return False
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError(
                _(
                    "PyTorch is required: install the PyTorch extension from the Extensions Manager, then retry."
                )
            ) from None
        # The installer processes events while it runs: a second click must not start another one.
        self.installingTorch = True
        try:
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if torchLogic.torchInstalled():
                return False
            torch = torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT)
        except subprocess.CalledProcessError as exc:
            logging.error("SASSRSegment: installing PyTorch failed: %s\n%s", exc, exc.output or "")
            raise RuntimeError(
                _(
                    "Installing PyTorch failed (exit code {code}): check the network connection, then retry, "
                    "or install it in the PyTorch Utils module."
                ).format(code=exc.returncode)
            ) from None
        except (ImportError, OSError) as exc:
            logging.error("SASSRSegment: PyTorch was installed but cannot be loaded: %s", exc)
            raise RuntimeError(
                _("PyTorch was installed but cannot be loaded: restart Slicer, then retry.")
            ) from None
        finally:
            self.installingTorch = False
        importlib.invalidate_caches()
        if torch is not None:
            return True
        if importlib.util.find_spec("torch") is not None:
            raise RuntimeError(_("PyTorch was installed: restart Slicer, then retry."))
        raise RuntimeError(_("PyTorch is required to segment lesions and was not installed."))

    def modelCards(self):
        return readModelCards(self.modelsDir)

    def defaultModelName(self, volumeNode):
        """The model for a volume: by its dimensionality (one slice: 2D), then by its DICOM modality."""
        imageData = volumeNode.GetImageData()
        if imageData is None:
            return None
        return defaultModelName(
            self.modelCards(), gridSpatialDims(imageData.GetDimensions()), dicomModality(volumeNode)
        )

    def modelCard(self, modelName, volumeNode):
        """The card of a model name or bundle folder ("folder" says where it is); None picks by the input."""
        if not modelName:
            modelName = self.defaultModelName(volumeNode)
            if not modelName:
                raise RuntimeError(_("No installed model takes this input: choose a model bundle folder."))
        cards = self.modelCards()
        card = next((card for card in cards if card["name"] == modelName), None)
        folder = Path(modelName)
        if card is None and (folder / "model.json").is_file():
            try:
                card = json.loads((folder / "model.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise RuntimeError(
                    _("Cannot read the model card of {folder}: {error}").format(folder=folder, error=exc)
                ) from None
            card = {**card, "name": folder.name, "folder": str(folder)}
        if card is not None:
            # The HR grid is computed here from the card, before the engine runs.
            if not isinstance((card.get("preprocessing") or {}).get("scale"), int):
                raise RuntimeError(
                    _("The model card of '{name}' gives no scale: reinstall the model.").format(
                        name=card["name"]
                    )
                )
            return card
        choices = ", ".join(card["name"] for card in cards) or _("no bundled model is installed")
        raise RuntimeError(
            _("Unknown model '{name}': choose one of: {names}.").format(name=modelName, names=choices)
        )

    def outputSegmentationStatus(self, segmentationNode, volumeNode, modelName=None):
        """What adding `volumeNode`'s lesions to `segmentationNode` would do.

        "ready": it is on the input's HR grid already (or has no grid yet), or holds this input's lesions;
        "changeGrid": it is the user's own segmentation on another grid, which the run would switch to the
        HR grid; "otherVolume": it holds the lesions of another volume (never mixed).
        """
        madeFor = segmentationInputVolume(segmentationNode)
        if madeFor is not None and madeFor.GetID() != volumeNode.GetID():
            return "otherVolume"
        card = self.modelCard(modelName, volumeNode)
        geometry = hrGeometryInFrameOf(
            segmentationNode, volumeNode, hrScales(card, volumeNode.GetImageData().GetDimensions())
        )
        if madeFor is None and not hasReferenceGeometry(segmentationNode, *geometry):
            return "changeGrid"
        return "ready"

    def segmentVolume(
        self,
        volumeNode,
        modelName=None,
        device="auto",
        tta=False,
        roiNode=None,
        wait=True,
        threshold=None,
        srImage=False,
        lesionTable=True,
        onFinished=None,
        outputSegmentation=None,
        replaceSegment=False,
        onProgress=None,
        onLog=None,
        changeGrid=False,
    ):
        """Segment lesions in `volumeNode` at super-resolution.

        modelName None picks the bundled model for the input (its dimensionality, then its DICOM modality);
        threshold None uses the model card's. wait=True returns the segmentation node (None when cancelled)
        and raises RuntimeError on failure.
        wait=False returns the running SegmentationJob at once (it has .cancel()); onFinished(result) is
        called with a SegmentationResult in both modes. A new "Lesion" segment is added to
        `outputSegmentation` (a new node, named after the volume, when None); replaceSegment=True reuses an
        existing one instead. A segmentation of another volume is refused; the user's own segmentation on
        another grid is switched to the HR grid only with changeGrid=True.
        """
        if self.activeJob and not self.activeJob.done:
            raise RuntimeError(_("A segmentation is already running: wait for it or cancel it."))
        if (
            volumeNode is None
            or not volumeNode.IsA("vtkMRMLScalarVolumeNode")
            or not volumeNode.GetImageData()
        ):
            raise RuntimeError(_("Select an input volume that holds an image."))
        self.ensureTorch()
        card = self.modelCard(modelName, volumeNode)
        if srImage and not hasImageSrDecoder(card):
            raise RuntimeError(
                _(
                    "The model '{name}' has no image super-resolution decoder: untick \"also create the "
                    'super-resolved image".'
                ).format(name=card["name"])
            )
        if outputSegmentation is not None:
            status = self.outputSegmentationStatus(outputSegmentation, volumeNode, card["folder"])
            if status == "otherVolume":
                raise RuntimeError(
                    _(
                        "The segmentation '{segmentation}' holds the lesions of '{other}': choose "
                        '"Create new segmentation".'
                    ).format(
                        segmentation=outputSegmentation.GetName(),
                        other=segmentationInputVolume(outputSegmentation).GetName(),
                    )
                )
            if status == "changeGrid" and not changeGrid:
                raise RuntimeError(
                    _(
                        "The segmentation '{segmentation}' is on another grid: choose \"Create new "
                        'segmentation", or allow switching it to the high-resolution grid.'
                    ).format(segmentation=outputSegmentation.GetName())
                )
        job = SegmentationJob(
            volumeNode,
            card=card,
            scales=hrScales(card, volumeNode.GetImageData().GetDimensions()),
            device=device,
            tta=tta,
            roiBounds=None if roiNode is None else roiBoundsForVolume(roiNode, volumeNode),
            threshold=threshold,
            srImage=srImage,
            lesionTable=lesionTable,
            outputSegmentation=outputSegmentation,
            replaceSegment=replaceSegment,
            onFinished=onFinished,
            onProgress=onProgress,
            onLog=onLog,
        )
        job.start()
        self.activeJob = job
        if not wait:
            job.startTimer()
            return job
        job.runToEnd()
        if job.result.status == "failed":
            raise RuntimeError(job.result.message)
        return job.result.segmentationNode

    def cancel(self):
        """Cancel the running segmentVolume job, if any."""
        if self.activeJob:
            self.activeJob.cancel()

    def segmentFiles(
        self, inputPaths, outputFolder, modelName=None, device="auto", tta=False, lesionTable=False
    ):
        """Segment image files (or DICOM series folders) without loading them into the scene.

        Writes `<stem>_lesions.nrrd` (and `<stem>_lesions.csv` with lesionTable=True) per input into
        outputFolder. modelName None lets the engine pick the bundled model for each input's
        dimensionality. A failing input is reported and skipped; returns one FileResult per input.
        """
        inputPaths = [str(path) for path in inputPaths]
        self.ensureTorch()
        model = self.modelCard(modelName, None)["folder"] if modelName else None
        Path(outputFolder).mkdir(parents=True, exist_ok=True)
        results = []
        outputPaths = outputPathsForFiles(inputPaths, outputFolder)
        for index, inputPath in enumerate(inputPaths):
            outputPath = outputPaths[index]
            tablePath = outputPath.with_suffix(".csv") if lesionTable else None
            command = segmentCommand(
                pythonExecutable(), inputPath, outputPath, model, device, tta=tta, lesionTablePath=tablePath
            )
            runner = SegmentRunner(command, env=_processEnvironment(), cwd=str(MODULE_DIR))
            runner.start()
            logging.info("SASSRSegment: segmenting %s", inputPath)
            runner.wait(onEvent=_logEvent, idle=slicer.app.processEvents)
            if runner.returnCode == 0:
                results.append(FileResult(inputPath, str(outputPath), warnings=runner.warnings))
            else:
                message = failureMessage(runner.returnCode, runner.stderrLines)
                logging.error("SASSRSegment: %s: %s", inputPath, message)
                results.append(FileResult(inputPath, error=message, warnings=runner.warnings))
        return results


def _processEnvironment():
    # PythonSlicer sets up Slicer's libraries itself and must start from the environment Slicer started with.
    base = slicer.util.startupEnvironment() if shutil.which("PythonSlicer") else os.environ
    return commandEnvironment(base)


def _logEvent(event):
    if event["kind"] == "progress":
        logging.info("SASSRSegment: %s %3.0f%% %s", event["stage"], 100 * event["fraction"], event["message"])
    elif event["kind"] == "warning":
        logging.warning("SASSRSegment: %s", event["message"])
    else:
        logging.info("SASSRSegment: %s", event["message"])


class SegmentationJob:
    """One run of the engine on a scene volume: temporary files, the process, and the import of results."""

    def __init__(self, volumeNode, **options):
        self.volumeNode = volumeNode
        self.options = options
        self.tempDir = None
        self.paths = {}
        self.runner = None
        self.result = None
        self.lastProgress = None
        self.warnings = []
        self._timer = None

    @property
    def done(self):
        return self.result is not None

    def elapsed(self):
        return self.runner.elapsed() if self.runner else 0.0

    def start(self):
        self.tempDir = Path(tempfile.mkdtemp(prefix="SASSRSegment-", dir=slicer.app.temporaryPath))
        try:
            self.paths = {
                "input": self.tempDir / "input.nrrd",
                "output": self.tempDir / "lesions.nrrd",
                "srImage": self.tempDir / "super-resolved.nrrd" if self.options["srImage"] else None,
                "table": self.tempDir / "lesions.csv" if self.options["lesionTable"] else None,
            }
            command = segmentCommand(
                pythonExecutable(),
                self.paths["input"],
                self.paths["output"],
                modelName=self.options["card"]["folder"],
                device=self.options["device"],
                threshold=self.options["threshold"],
                tta=self.options["tta"],
                roiBounds=self.options["roiBounds"],
                srImagePath=self.paths["srImage"],
                lesionTablePath=self.paths["table"],
            )
            writeVolumeToFile(self.volumeNode, self.paths["input"])
            self._log(_("Running: {command}").format(command=subprocess.list2cmdline(command)))
            self.runner = SegmentRunner(command, env=_processEnvironment(), cwd=str(MODULE_DIR))
            self.runner.start()
        except ValueError as exc:
            self._removeTempDir()
            raise RuntimeError(str(exc)) from None
        except Exception:
            self._removeTempDir()
            raise

    def startTimer(self):
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.step)
        self._timer.start()

    def runToEnd(self):
        while not self.done:
            self.step()
            slicer.app.processEvents()
            time.sleep(POLL_INTERVAL_MS / 1000.0)

    def cancel(self):
        if self.runner and not self.done:
            self._log(_("Cancelling..."))
            self.runner.cancel()

    def abort(self):
        """End the process now and delete the temporary files, importing nothing and calling no callback."""
        if self.done:
            return
        if self._timer:
            self._timer.stop()
        self.runner.terminate()
        self._removeTempDir()
        self.result = SegmentationResult("cancelled", _("Segmentation was cancelled."), self.elapsed())

    def step(self):
        """Handle new output; once the process has ended, import its results and report."""
        if self.done:
            return
        for event in self.runner.poll():
            self._dispatch(event)
        if self.runner.finished:
            self._finish()

    def _dispatch(self, event):
        if event["kind"] == "progress":
            if not self.lastProgress or self.lastProgress["stage"] != event["stage"]:
                self._log(f"{event['stage']}: {event['message']}")
            self.lastProgress = event
            if self.options["onProgress"]:
                self.options["onProgress"](event)
        elif event["kind"] == "warning":
            self.warnings.append(panelMessage(event["message"]))
            self._log(_("Warning: {message}").format(message=self.warnings[-1]))
        else:
            self._log(event["message"])

    def _log(self, text):
        logging.info("SASSRSegment: %s", text)
        if self.options["onLog"]:
            self.options["onLog"](text)

    def _finish(self):
        if self._timer:
            self._timer.stop()
        elapsed = self.runner.elapsed()
        try:
            if self.runner.cancelled:
                self.result = SegmentationResult("cancelled", _("Segmentation was cancelled."), elapsed)
            elif self.runner.returnCode != 0:
                message = panelMessage(failureMessage(self.runner.returnCode, self.runner.stderrLines))
                self.result = SegmentationResult("failed", message, elapsed)
            else:
                self.result = self._importResults(elapsed)
        except Exception as exc:
            logging.exception("SASSRSegment: importing the results failed")
            message = _("Importing the results failed: {error}").format(error=" ".join(str(exc).split()))
            self.result = SegmentationResult("failed", message, elapsed)
        finally:
            self._removeTempDir()
        self.result.warnings = list(self.warnings)
        self._log(self.result.message or _("Done in {elapsed}.").format(elapsed=formatElapsed(elapsed)))
        if self.options["onFinished"]:
            self.options["onFinished"](self.result)

    def _removeTempDir(self):
        if self.tempDir is not None:
            shutil.rmtree(self.tempDir, ignore_errors=True)

    def _importResults(self, elapsed):
        """Add the results to the scene; if any step fails, what was added or changed is put back."""
        names = outputNodeNames(self.volumeNode.GetName())
        segmentationNode = self.options["outputSegmentation"]
        restorePoint = SegmentationRestorePoint(segmentationNode) if segmentationNode else None
        added = []
        try:
            if segmentationNode is None:
                segmentationNode = createSegmentation(self.volumeNode, uniqueNodeName(names["segmentation"]))
                added.append(segmentationNode)
            segmentId = importLesionSegmentation(
                self.paths["output"],
                self.volumeNode,
                segmentationNode,
                self.options["scales"],
                self.options["replaceSegment"],
                restorePoint,
            )
            result = SegmentationResult("completed", "", elapsed, segmentationNode, segmentId)
            if self.paths["srImage"]:
                result.srImageNode = loadSuperResolvedImage(
                    self.paths["srImage"], self.volumeNode, uniqueNodeName(names["srImage"])
                )
                added.append(result.srImageNode)
            if self.paths["table"]:
                result.tableNode = loadLesionTable(
                    self.paths["table"], self.volumeNode, uniqueNodeName(names["table"])
                )
                added.append(result.tableNode)
                result.lesionCount = result.tableNode.GetNumberOfRows()
            return result
        except Exception:
            for node in reversed(added):
                removeNodeWithHelpers(node)
            if restorePoint:
                restorePoint.restore()
            raise


def uniqueNodeName(base):
    """`base`, or `base 2`, ...: no two runs' nodes share a name, whatever failed in between."""
    scene = slicer.mrmlScene
    return uniqueName(base, (scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes())))


def dicomModality(volumeNode):
    """The DICOM modality (MR, US, CT, ...) of a volume loaded from DICOM, else ""."""
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    item = shNode.GetItemByDataNode(volumeNode)
    if not item:
        return ""
    attribute = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName()
    return shNode.GetItemAttribute(item, attribute) or ""


def writeVolumeToFile(volumeNode, path):
    """Write a volume without touching its own storage node (the scene keeps pointing at the user's file)."""
    storageNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    try:
        storageNode.SetFileName(str(path))
        storageNode.UseCompressionOff()
        if not storageNode.WriteData(volumeNode):
            raise RuntimeError(_("Could not write the input volume to a temporary file."))
    finally:
        slicer.mrmlScene.RemoveNode(storageNode)


def roiBoundsForVolume(roiNode, volumeNode):
    """The ROI's bounding box in the input volume's own coordinates (those of the file the engine reads).

    Refuses, naming the panel's Region control, an ROI the engine could not use: never placed, flat, or
    beside the volume.
    """
    name = roiNode.GetName()
    if roiNode.GetNumberOfDefinedControlPoints() == 0:
        raise RuntimeError(
            _(
                "The Region (ROI) '{name}' is not placed: place it over the lesions, or choose Whole volume."
            ).format(name=name)
        )
    bounds = [0.0] * 6
    roiNode.GetRASBounds(bounds)
    transformNode = volumeNode.GetParentTransformNode()
    if transformNode is not None:
        if not transformNode.IsTransformToWorldLinear():
            raise RuntimeError(
                _("The input volume is under a non-linear transform: harden it before using a Region (ROI).")
            )
        worldToVolume = vtk.vtkMatrix4x4()
        transformNode.GetMatrixTransformFromWorld(worldToVolume)
        bounds = boundsOfPoints(
            worldToVolume.MultiplyPoint([*corner, 1.0])[:3] for corner in boxCorners(bounds)
        )
    ijkToRas = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRas)
    dimensions = volumeNode.GetImageData().GetDimensions()
    if gridSpatialDims(dimensions) == 2:
        bounds = sliceAxisBounds(bounds, matrixRows(ijkToRas), dimensions)
    try:
        roiBoundsArguments(bounds)
    except ValueError:
        raise RuntimeError(
            _("The Region (ROI) '{name}' is flat: give it a size along every axis.").format(name=name)
        ) from None
    rasToIjk = vtk.vtkMatrix4x4()
    volumeNode.GetRASToIJKMatrix(rasToIjk)
    if not roiOverlapsGrid(bounds, matrixRows(rasToIjk), dimensions):
        raise RuntimeError(
            _("The Region (ROI) '{name}' does not overlap the input volume: move it over the image.").format(
                name=name
            )
        )
    return bounds


def placeLikeInput(node, volumeNode):
    """Same parent transform (for nodes that can have one) and subject-hierarchy folder as the input volume."""
    if node.IsA("vtkMRMLTransformableNode"):
        node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    inputItem = shNode.GetItemByDataNode(volumeNode)
    if inputItem:
        shNode.SetItemParent(shNode.GetItemByDataNode(node), shNode.GetItemParent(inputItem))


def removeNodeWithHelpers(node):
    """Remove a loaded node together with its display and storage nodes."""
    helpers = []
    if node.IsA("vtkMRMLDisplayableNode"):
        helpers += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if node.IsA("vtkMRMLStorableNode"):
        helpers.append(node.GetStorageNode())
    slicer.mrmlScene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and helper.GetScene():
            slicer.mrmlScene.RemoveNode(helper)


def detachFromTemporaryFile(node):
    """Drop the storage node of a node read from a temporary file, so that saving the scene writes it anew."""
    storageNode = node.GetStorageNode()
    if storageNode is not None:
        node.SetAndObserveStorageNodeID(None)
        slicer.mrmlScene.RemoveNode(storageNode)


def createSegmentation(volumeNode, name):
    """A new segmentation for the lesions of `volumeNode`, beside it (same transform and study)."""
    segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentationNode.CreateDefaultDisplayNodes()
    placeLikeInput(segmentationNode, volumeNode)
    return segmentationNode


class SegmentationRestorePoint:
    """What a run changes in an existing segmentation, put back by restore() when the import fails."""

    def __init__(self, segmentationNode):
        self.node = segmentationNode
        segmentation = segmentationNode.GetSegmentation()
        self.geometry = segmentation.GetConversionParameter(_geometryParameterName())
        self.references = {
            role: segmentationNode.GetNodeReferenceID(role)
            for role in (
                segmentationNode.GetReferenceImageGeometryReferenceRole(),
                INPUT_VOLUME_REFERENCE_ROLE,
            )
        }
        self.segmentIds = _segmentIds(segmentation)
        self.replaced = {}

    def keepSegment(self, segmentId):
        """Remember a segment's content before it is replaced."""
        copy = slicer.vtkSegment()
        copy.DeepCopy(self.node.GetSegmentation().GetSegment(segmentId))
        self.replaced[segmentId] = copy

    def restore(self):
        segmentation = self.node.GetSegmentation()
        for segmentId in _segmentIds(segmentation):
            if segmentId not in self.segmentIds or segmentId in self.replaced:
                segmentation.RemoveSegment(segmentId)
        for segmentId, copy in self.replaced.items():
            following = self.segmentIds[self.segmentIds.index(segmentId) + 1 :]
            segmentation.AddSegment(copy, segmentId, next(iter(following), ""))
        segmentation.SetConversionParameter(_geometryParameterName(), self.geometry)
        for role, nodeId in self.references.items():
            self.node.SetNodeReferenceID(role, nodeId)


def _segmentIds(segmentation):
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def _geometryParameterName():
    return slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()


def importLesionSegmentation(
    labelPath, volumeNode, segmentationNode, scales, replaceSegment, restorePoint=None
):
    """Import the HR label map as the "Lesion" segment; the HR grid becomes the reference geometry."""
    labelNode = slicer.util.loadLabelVolume(str(labelPath), {"show": False})
    try:
        labelNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        # The segmentation now holds this volume's lesions: no other volume's may join them.
        segmentationNode.SetNodeReferenceID(INPUT_VOLUME_REFERENCE_ROLE, volumeNode.GetID())
        # The input stays the source volume that Segment Editor proposes (and DICOM export refers to) ...
        segmentationNode.SetNodeReferenceID(
            segmentationNode.GetReferenceImageGeometryReferenceRole(), volumeNode.GetID()
        )
        # ... but editing happens at the reference geometry: the input's whole HR grid (not the LR grid,
        # and not just the ROI that the label map may cover).
        setReferenceGeometry(segmentationNode, *hrGeometryInFrameOf(segmentationNode, volumeNode, scales))
        segmentation = segmentationNode.GetSegmentation()
        segmentId = segmentIdByName(segmentationNode, LESION_SEGMENT_NAME) if replaceSegment else ""
        if segmentId and restorePoint:
            restorePoint.keepSegment(segmentId)
        if not segmentId:
            existing = [
                segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())
            ]
            segmentId = segmentation.AddEmptySegment(
                "", uniqueName(LESION_SEGMENT_NAME, existing), LESION_COLOR
            )
        segmentIds = vtk.vtkStringArray()
        segmentIds.InsertNextValue(segmentId)
        # Importing into a named segment keeps an empty result as an empty segment (no lesion found).
        if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(
            labelNode, segmentationNode, segmentIds
        ):
            raise RuntimeError(_("Could not import the label map into the segmentation."))
        segment = segmentation.GetSegment(segmentId)
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), LESION_TERMINOLOGY)
        segment.SetColor(LESION_COLOR)
        segmentationNode.CreateClosedSurfaceRepresentation()
        return segmentId
    finally:
        removeNodeWithHelpers(labelNode)


def matrixRows(matrix):
    return [[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]


def hrGeometryInFrameOf(segmentationNode, volumeNode, scales):
    """The input's HR grid as (image-to-world 4x4 rows, dimensions) in the segmentation's own coordinates.

    A segmentation's reference geometry is in its local frame: when it is not under the volume's
    transform, the grid is carried from the volume's frame into the segmentation's.
    """
    inputMatrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(inputMatrix)
    rows, dimensions = superResolvedGrid(
        matrixRows(inputMatrix), volumeNode.GetImageData().GetDimensions(), scales
    )
    volumeToSegmentation = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
        volumeNode.GetParentTransformNode(), segmentationNode.GetParentTransformNode(), volumeToSegmentation
    ):
        raise RuntimeError(
            _("The input volume and the segmentation are related by a non-linear transform: harden it first.")
        )
    transform = matrixRows(volumeToSegmentation)
    rows = [[sum(transform[r][k] * rows[k][c] for k in range(4)) for c in range(4)] for r in range(4)]
    return rows, dimensions


def referenceGeometry(segmentationNode):
    """The segmentation's reference geometry as (image-to-world rows of index 0, dimensions), or None."""
    text = segmentationNode.GetSegmentation().GetConversionParameter(_geometryParameterName())
    if not text:
        return None
    geometry = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(text, geometry, False)
    matrix = vtk.vtkMatrix4x4()
    geometry.GetImageToWorldMatrix(matrix)
    extent = geometry.GetExtent()
    dimensions = [extent[2 * k + 1] - extent[2 * k] + 1 for k in range(3)]
    return _shiftedRows(matrix, [extent[0], extent[2], extent[4]]), dimensions


def hasReferenceGeometry(segmentationNode, rows, dimensions):
    """Whether the segmentation has no reference geometry yet or already this one (to 1e-4 mm)."""
    current = referenceGeometry(segmentationNode)
    if current is None:
        return True
    currentRows, currentDimensions = current
    return list(currentDimensions) == list(dimensions) and all(
        abs(currentRows[r][c] - rows[r][c]) <= 1e-4 for r in range(3) for c in range(4)
    )


def setReferenceGeometry(segmentationNode, rows, dimensions):
    """Make the segmentation's reference geometry the grid (image-to-world rows, dimensions)."""
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, rows[r][c])
    geometry = slicer.vtkOrientedImageData()
    geometry.SetImageToWorldMatrix(matrix)
    geometry.SetExtent(0, dimensions[0] - 1, 0, dimensions[1] - 1, 0, dimensions[2] - 1)
    segmentationNode.GetSegmentation().SetConversionParameter(
        _geometryParameterName(), slicer.vtkSegmentationConverter.SerializeImageGeometry(geometry)
    )


def loadSuperResolvedImage(path, volumeNode, name):
    imageNode = slicer.util.loadVolume(str(path), {"show": False, "name": name})
    detachFromTemporaryFile(imageNode)
    placeLikeInput(imageNode, volumeNode)
    return imageNode


def loadLesionTable(path, volumeNode, name):
    tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = tableNode.GetTable()
    for columnName, values in readCsvColumns(path):
        kind = type(values[0]) if values else str
        array = {int: vtk.vtkIntArray, float: vtk.vtkDoubleArray}.get(kind, vtk.vtkStringArray)()
        array.SetName(columnName)
        for value in values:
            array.InsertNextValue(value)
        table.AddColumn(array)
        tableNode.SetColumnUnitLabel(columnName, columnUnit(columnName))
        if columnName in COLUMN_DESCRIPTIONS:
            tableNode.SetColumnDescription(columnName, COLUMN_DESCRIPTIONS[columnName])
    tableNode.Modified()
    placeLikeInput(tableNode, volumeNode)
    return tableNode


#
# Self-test (run with "Reload and Test", or ctest: py_SASSRSegment)
#


class SASSRSegmentTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segmentSampleWithThePanelDefaults()
        self.setUp()
        self.test_cancelLeavesSceneClean()

    def _loadSample(self):
        self.assertTrue(SAMPLE_PATH.is_file(), f"sample missing: {SAMPLE_PATH}")
        return slicer.util.loadVolume(str(SAMPLE_PATH))

    def test_segmentSampleWithThePanelDefaults(self):
        self.delayDisplay("Segmenting the shipped sample on the CPU, with the panel's default options")
        volume = self._loadSample()
        results = []
        segmentationNode = SASSRSegmentLogic().segmentVolume(
            volume, device="cpu", wait=True, onFinished=results.append
        )
        self.assertIsNotNone(segmentationNode)
        result = results[0]
        self.assertEqual(result.status, "completed", result.message)
        self.assertEqual(segmentationNode.GetName(), f"{volume.GetName()} lesions")

        segmentId = segmentIdByName(segmentationNode, LESION_SEGMENT_NAME)
        self.assertTrue(segmentId, "no Lesion segment")
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        terminology = vtk.reference("")
        self.assertTrue(segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology))
        self.assertEqual(terminology.get(), LESION_TERMINOLOGY)
        # The segment is held at HR: its own labelmap, not one resampled to the input's grid.
        labelmap = slicer.util.arrayFromSegmentInternalBinaryLabelmap(segmentationNode, segmentId)
        hrVoxels = int((labelmap == segment.GetLabelValue()).sum())
        self.assertGreater(hrVoxels, 0, "the Lesion segment is empty")

        # The lesion table is on by default: one row per lesion, the engine's voxel counts.
        self.assertIsNotNone(result.tableNode, "no lesion table")
        self.assertGreater(result.tableNode.GetNumberOfRows(), 0)
        self.assertEqual(result.lesionCount, result.tableNode.GetNumberOfRows())
        voxels = slicer.util.arrayFromTableColumn(result.tableNode, "voxels")
        self.assertEqual(int(voxels.sum()), hrVoxels)

        rows, hrDimensions = referenceGeometry(segmentationNode)
        self.assertEqual(hrDimensions, [2 * n for n in volume.GetImageData().GetDimensions()])
        lrMatrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(lrMatrix)
        for axis in range(3):
            hrSpacing = math.sqrt(sum(rows[r][axis] ** 2 for r in range(3)))
            self.assertAlmostEqual(hrSpacing, volume.GetSpacing()[axis] / 2, places=5)
        # Same physical extent (voxel corners), so the HR segmentation overlays the input exactly.
        hrBounds = voxelCornerBounds(rows, hrDimensions)
        lrBounds = voxelCornerBounds(matrixRows(lrMatrix), volume.GetImageData().GetDimensions())
        for index in range(6):
            self.assertAlmostEqual(hrBounds[index], lrBounds[index], places=3)
        self.delayDisplay("Sample segmented at x2 resolution, aligned with the input, lesion table made")

    def test_cancelLeavesSceneClean(self):
        self.delayDisplay("Starting and cancelling a segmentation")
        volume = self._loadSample()
        nodesBefore = _sceneNodeIds()
        results = []
        job = SASSRSegmentLogic().segmentVolume(volume, device="cpu", wait=False, onFinished=results.append)
        self.delayDisplay("Running; cancelling in a second", 1000)
        job.cancel()
        deadline = time.monotonic() + 60
        while not results and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertEqual(len(results), 1, "the cancelled job did not finish")
        self.assertEqual(results[0].status, "cancelled")
        self.assertEqual(_sceneNodeIds(), nodesBefore)
        self.assertFalse(job.tempDir.exists(), "temporary files left behind")
        self.delayDisplay("Cancel left the scene and the disk clean")


def _sceneNodeIds():
    scene = slicer.mrmlScene
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _shiftedRows(matrix, offset):
    """A vtkMatrix4x4 as nested rows, with the grid's first index moved to 0 (extents need not start at 0)."""
    rows = matrixRows(matrix)
    for r in range(3):
        rows[r][3] += sum(rows[r][c] * offset[c] for c in range(3))
    return rows
