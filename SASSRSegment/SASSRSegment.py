"""SASSRSegment: lesion segmentation at super-resolution in 3D Slicer.

The module runs the Slicer-free engine (`SASSRSegmentLib`) in a background process with Slicer's Python,
reads its JSON progress lines, and imports the high-resolution (HR) label map into a segmentation whose
reference geometry is the HR grid, so that editing in Segment Editor happens at HR.

Everything above the "Slicer module" section is plain Python: pytest imports this file without Slicer
to test the command line, the progress parsing, the model cards and the process runner.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from SASSRSegmentLib.bundle import bundled_models, validation_dice

try:
    import slicer
except ImportError:
    slicer = None

if slicer is not None:
    import qt
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
LESION_TERMINOLOGY = (
    "Segmentation category and type - 3D Slicer General Anatomy list"
    "~SCT^49755003^Morphologically Altered Structure~SCT^108369006^Neoplasm~^^"
    "~Anatomic codes - DICOM master list~^^~^^"
)

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
IMAGE_EXTENSIONS = (".nii.gz", ".seg.nrrd", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd", ".png", ".jpg", ".jpeg")
IMAGE_EXTENSIONS += (".tiff", ".tif", ".bmp", ".dcm")


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
        cards.append(card)
    return cards


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
        raise ValueError(_("The ROI needs six finite bounds (xmin xmax ymin ymax zmin zmax)."))
    if any(values[2 * k] > values[2 * k + 1] for k in range(3)):
        raise ValueError(_("The ROI is empty: place it over the region to segment."))
    return [formatNumber(v) for v in values]


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


def scaleFactors(inputSpacing, outputSpacing):
    """Per-axis integer scale between the input and the engine's output (1 where an axis was kept)."""
    return [max(1, int(round(inputSpacing[k] / outputSpacing[k]))) for k in range(3)]


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
    Log: {"kind": "log", "message"}. Anything else (a stray print, malformed JSON) gives None.
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
        return {"kind": "log", "message": str(record["log"])}
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
            return {"kind": "stderr", "message": line}
        event = parseProgressLine(line)
        if event is None and line.strip():
            logging.debug("SASSRSegment: unparsed engine output: %s", line)
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


@dataclass
class FileResult:
    """The outcome of segmentFiles for one input file."""

    inputPath: str
    outputPath: str = ""
    error: str = ""


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
        if self._job:
            self._job.cancel()
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
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volumes = [
                node
                for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                if not node.IsA("vtkMRMLLabelMapVolumeNode")
            ]
            if volumes:
                self._parameterNode.inputVolume = volumes[0]
        if not self._parameterNode.modelName and self._cards:
            self._selectModel(self._cards[0]["name"])

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateFromParameterNode
            )
        self._parameterNode = inputParameterNode
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
        self._checkCanApply()

    def _currentCard(self):
        name = self._parameterNode.modelName if self._parameterNode else ""
        return next((card for card in self._cards if card["name"] == name), None)

    def _checkCanApply(self):
        if self._job:
            self.ui.applyButton.enabled = True
            self.ui.applyButton.toolTip = _("Stop the running segmentation.")
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
        parameters = self._parameterNode
        replaceSegment = False
        if parameters.outputSegmentation and segmentIdByName(
            parameters.outputSegmentation, LESION_SEGMENT_NAME
        ):
            replaceSegment = self._askReplaceSegment()
            if replaceSegment is None:
                return
        self.ui.logTextEdit.clear()
        try:
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
                outputSegmentation=parameters.outputSegmentation,
                replaceSegment=replaceSegment,
                onFinished=self._onFinished,
                onProgress=self._onProgress,
                onLog=self._appendLog,
            )
        except (RuntimeError, ValueError) as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self._setRunning(True)

    def _askReplaceSegment(self):
        """True: replace the existing Lesion segment; False: add a new one; None: do not run."""
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setWindowTitle(_("Lesion segment exists"))
        box.setText(_("The segmentation already has a '{name}' segment.").format(name=LESION_SEGMENT_NAME))
        replaceButton = box.addButton(_("Replace it"), qt.QMessageBox.DestructiveRole)
        addButton = box.addButton(_("Add a new segment"), qt.QMessageBox.AcceptRole)
        box.addButton(qt.QMessageBox.Cancel)
        box.exec_()
        if box.clickedButton() == replaceButton:
            return True
        if box.clickedButton() == addButton:
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
        if result.status == "completed":
            found = _("{count} lesion(s)").format(count=result.lesionCount) if result.lesionCount >= 0 else ""
            self.ui.statusLabel.text = _("Done in {elapsed}. {found}").format(elapsed=elapsed, found=found)
            if self._parameterNode:
                self._parameterNode.outputSegmentation = result.segmentationNode
                slicer.util.setSliceViewerLayers(background=self._parameterNode.inputVolume, fit=False)
        elif result.status == "cancelled":
            self.ui.statusLabel.text = _("Cancelled after {elapsed}.").format(elapsed=elapsed)
        else:
            self.ui.statusLabel.text = _("Failed after {elapsed}: {message}").format(
                elapsed=elapsed, message=result.message
            )
            slicer.util.errorDisplay(result.message)


def segmentIdByName(segmentationNode, name):
    """The id of the segment called `name`, or "" when there is none."""
    return segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(name) or ""


class SASSRSegmentLogic(ScriptedLoadableModuleLogic):
    """Runs the engine on scene volumes or on files; usable from the Python console without the widget."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.activeJob = None

    def getParameterNode(self):
        return SASSRSegmentParameterNode(super().getParameterNode())

    def ensureTorch(self):
        """Make sure torch is importable, offering to install it through the PyTorch extension."""
        if importlib.util.find_spec("torch") is not None:
            return
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError(
                _(
                    "PyTorch is required: install the PyTorch extension from the Extensions Manager, then retry."
                )
            ) from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if torchLogic.torchInstalled():
            return
        torch = torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is not None:
            return
        importlib.invalidate_caches()
        if importlib.util.find_spec("torch") is not None:
            raise RuntimeError(_("PyTorch was installed: restart Slicer, then retry."))
        raise RuntimeError(_("PyTorch is required to segment lesions and was not installed."))

    def resolveModel(self, modelName):
        """A bundled model's name or a bundle folder; None lets the engine pick the default model."""
        if not modelName:
            return None
        names = [card["name"] for card in readModelCards()]
        if modelName in names or Path(modelName).is_dir():
            return str(modelName)
        choices = ", ".join(names) or _("no bundled model is installed")
        raise RuntimeError(
            _("Unknown model '{name}': choose one of: {names}.").format(name=modelName, names=choices)
        )

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
        lesionTable=False,
        onFinished=None,
        outputSegmentation=None,
        replaceSegment=False,
        onProgress=None,
        onLog=None,
    ):
        """Segment lesions in `volumeNode` at super-resolution.

        modelName None picks the bundled model matching the input's dimensionality; threshold None uses
        the model card's. wait=True returns the segmentation node (None when cancelled) and raises
        RuntimeError on failure.
        wait=False returns the running SegmentationJob at once (it has .cancel()); onFinished(result) is
        called with a SegmentationResult in both modes. A new "Lesion" segment is added to
        `outputSegmentation` (a new node when None); replaceSegment=True reuses an existing one instead.
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
        job = SegmentationJob(
            volumeNode,
            modelName=self.resolveModel(modelName),
            device=device,
            tta=tta,
            roiNode=roiNode,
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
        outputFolder. A failing input is reported and skipped; returns one FileResult per input.
        """
        inputPaths = [str(path) for path in inputPaths]
        self.ensureTorch()
        model = self.resolveModel(modelName)
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
                results.append(FileResult(inputPath, str(outputPath)))
            else:
                message = failureMessage(runner.returnCode, runner.stderrLines)
                logging.error("SASSRSegment: %s: %s", inputPath, message)
                results.append(FileResult(inputPath, error=message))
        return results


def _processEnvironment():
    # PythonSlicer sets up Slicer's libraries itself and must start from the environment Slicer started with.
    base = slicer.util.startupEnvironment() if shutil.which("PythonSlicer") else os.environ
    return commandEnvironment(base)


def _logEvent(event):
    if event["kind"] == "progress":
        logging.info("SASSRSegment: %s %3.0f%% %s", event["stage"], 100 * event["fraction"], event["message"])
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
            roiBounds = None
            if self.options["roiNode"] is not None:
                roiBounds = roiBoundsInVolumeFrame(self.options["roiNode"], self.volumeNode)
            command = segmentCommand(
                pythonExecutable(),
                self.paths["input"],
                self.paths["output"],
                modelName=self.options["modelName"],
                device=self.options["device"],
                threshold=self.options["threshold"],
                tta=self.options["tta"],
                roiBounds=roiBounds,
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
                message = failureMessage(self.runner.returnCode, self.runner.stderrLines)
                self.result = SegmentationResult("failed", message, elapsed)
            else:
                self.result = self._importResults(elapsed)
        except Exception as exc:
            logging.exception("SASSRSegment: importing the results failed")
            message = _("Importing the results failed: {error}").format(error=exc)
            self.result = SegmentationResult("failed", message, elapsed)
        finally:
            self._removeTempDir()
        self._log(self.result.message or _("Done in {elapsed}.").format(elapsed=formatElapsed(elapsed)))
        if self.options["onFinished"]:
            self.options["onFinished"](self.result)

    def _removeTempDir(self):
        if self.tempDir is not None:
            shutil.rmtree(self.tempDir, ignore_errors=True)

    def _importResults(self, elapsed):
        names = outputNodeNames(self.volumeNode.GetName())
        segmentationNode, segmentId = importLesionSegmentation(
            self.paths["output"],
            self.volumeNode,
            self.options["outputSegmentation"],
            names["segmentation"],
            self.options["replaceSegment"],
        )
        result = SegmentationResult("completed", "", elapsed, segmentationNode, segmentId)
        if self.paths["srImage"]:
            result.srImageNode = loadSuperResolvedImage(
                self.paths["srImage"], self.volumeNode, names["srImage"]
            )
        if self.paths["table"]:
            result.tableNode = loadLesionTable(self.paths["table"], self.volumeNode, names["table"])
            result.lesionCount = result.tableNode.GetNumberOfRows()
        return result


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


def roiBoundsInVolumeFrame(roiNode, volumeNode):
    """The ROI's RAS bounding box in the input volume's own coordinates (those of the file the engine reads)."""
    bounds = [0.0] * 6
    roiNode.GetRASBounds(bounds)
    roiBoundsArguments(bounds)
    transformNode = volumeNode.GetParentTransformNode()
    if transformNode is None:
        return bounds
    if not transformNode.IsTransformToWorldLinear():
        raise RuntimeError(
            _("The input volume is under a non-linear transform: harden it before using an ROI.")
        )
    worldToVolume = vtk.vtkMatrix4x4()
    transformNode.GetMatrixTransformFromWorld(worldToVolume)
    return boundsOfPoints(worldToVolume.MultiplyPoint([*corner, 1.0])[:3] for corner in boxCorners(bounds))


def placeLikeInput(node, volumeNode):
    """Same parent transform and subject-hierarchy folder (study) as the input volume."""
    node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    inputItem = shNode.GetItemByDataNode(volumeNode)
    if inputItem:
        shNode.SetItemParent(shNode.GetItemByDataNode(node), shNode.GetItemParent(inputItem))


def removeNodeWithHelpers(node):
    """Remove a loaded node together with its display and storage nodes."""
    helpers = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
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


def importLesionSegmentation(labelPath, volumeNode, segmentationNode, segmentationName, replaceSegment):
    """Import the HR label map as the "Lesion" segment; the HR grid becomes the reference geometry."""
    labelNode = slicer.util.loadLabelVolume(str(labelPath), {"show": False})
    try:
        labelNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        if segmentationNode is None:
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", segmentationName)
            segmentationNode.CreateDefaultDisplayNodes()
            placeLikeInput(segmentationNode, volumeNode)
        # The input stays the source volume that Segment Editor proposes (and DICOM export refers to) ...
        segmentationNode.SetNodeReferenceID(
            segmentationNode.GetReferenceImageGeometryReferenceRole(), volumeNode.GetID()
        )
        # ... but editing happens at the reference geometry: the input's whole HR grid (not the LR grid,
        # and not just the ROI that the label map may cover).
        scales = scaleFactors(volumeNode.GetSpacing(), labelNode.GetSpacing())
        setReferenceGeometry(segmentationNode, volumeNode, scales)
        segmentation = segmentationNode.GetSegmentation()
        segmentId = segmentIdByName(segmentationNode, LESION_SEGMENT_NAME) if replaceSegment else ""
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
        return segmentationNode, segmentId
    finally:
        removeNodeWithHelpers(labelNode)


def matrixRows(matrix):
    return [[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]


def setReferenceGeometry(segmentationNode, volumeNode, scales):
    """Make the segmentation's reference geometry the input's grid refined by `scales`."""
    inputMatrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(inputMatrix)
    rows, dimensions = superResolvedGrid(
        matrixRows(inputMatrix), volumeNode.GetImageData().GetDimensions(), scales
    )
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, rows[r][c])
    geometry = slicer.vtkOrientedImageData()
    geometry.SetImageToWorldMatrix(matrix)
    geometry.SetExtent(0, dimensions[0] - 1, 0, dimensions[1] - 1, 0, dimensions[2] - 1)
    converter = slicer.vtkSegmentationConverter
    segmentationNode.GetSegmentation().SetConversionParameter(
        converter.GetReferenceImageGeometryParameterName(), converter.SerializeImageGeometry(geometry)
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
        self.test_segmentSampleAtSuperResolution()
        self.setUp()
        self.test_cancelLeavesSceneClean()

    def _loadSample(self):
        self.assertTrue(SAMPLE_PATH.is_file(), f"sample missing: {SAMPLE_PATH}")
        return slicer.util.loadVolume(str(SAMPLE_PATH))

    def test_segmentSampleAtSuperResolution(self):
        self.delayDisplay("Segmenting the shipped sample on the CPU")
        volume = self._loadSample()
        segmentationNode = SASSRSegmentLogic().segmentVolume(volume, device="cpu", wait=True)
        self.assertIsNotNone(segmentationNode)

        segmentId = segmentIdByName(segmentationNode, LESION_SEGMENT_NAME)
        self.assertTrue(segmentId, "no Lesion segment")
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId)
        self.assertGreater(int(mask.sum()), 0, "the Lesion segment is empty")

        geometry = slicer.vtkOrientedImageData()
        parameter = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
        geometryText = segmentationNode.GetSegmentation().GetConversionParameter(parameter)
        slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometryText, geometry, False)
        hrSpacing, lrSpacing = geometry.GetSpacing(), volume.GetSpacing()
        for axis in range(3):
            self.assertAlmostEqual(hrSpacing[axis], lrSpacing[axis] / 2, places=5)
        extent = geometry.GetExtent()
        hrDimensions = [extent[2 * k + 1] - extent[2 * k] + 1 for k in range(3)]
        self.assertEqual(hrDimensions, [2 * n for n in volume.GetImageData().GetDimensions()])
        # Same physical extent (voxel corners), so the HR segmentation overlays the input exactly.
        hrMatrix = vtk.vtkMatrix4x4()
        geometry.GetImageToWorldMatrix(hrMatrix)
        lrMatrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(lrMatrix)
        hrBounds = voxelCornerBounds(_shiftedRows(hrMatrix, [extent[0], extent[2], extent[4]]), hrDimensions)
        lrBounds = voxelCornerBounds(matrixRows(lrMatrix), volume.GetImageData().GetDimensions())
        for index in range(6):
            self.assertAlmostEqual(hrBounds[index], lrBounds[index], places=3)
        self.delayDisplay("Sample segmented at x2 resolution, aligned with the input")

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
