"""The engine's command line as the module runs it: the Python that runs it, its environment, the
`segment` command, its JSON progress lines, and its failures in one line, reworded for the panel."""

import json
import math
import os
import re
import shutil
import sys
from decimal import Decimal

from .devices import deviceArgument
from .paths import MODULE_DIR
from .slicerapi import _, slicer

ENGINE_PACKAGE = "SASSRSegmentLib"
EXIT_USER_ERROR = 2
EXIT_CANCELLED = 130
WARNING_PREFIX = "warning:"
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
    (r"convert it to greyscale first", "convert it to greyscale first (Vector to Scalar Volume module)"),
    (r"--threshold", "the Threshold"),
    (r"--roi", "the Region (ROI)"),
    (r"--model", "the Model"),
    (r"--device", "the Device"),
)


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


def processEnvironment():
    # PythonSlicer sets up Slicer's libraries itself and must start from the environment Slicer started with.
    base = slicer.util.startupEnvironment() if shutil.which("PythonSlicer") else os.environ
    return commandEnvironment(base)


def formatNumber(value):
    """Shortest exact text for a float on the command line, without an exponent: argparse reads
    "-1.8e-15" (an ROI edge at 0 after a transform's rounding) as an option, not a number."""
    return format(Decimal(repr(float(value))), "f")


def roiBoundsArguments(bounds):
    """The six `--roi` values (xmin xmax ymin ymax zmin zmax, RAS mm) as strings, after validation."""
    values = [float(v) for v in bounds]
    if len(values) != 6 or not all(math.isfinite(v) for v in values):
        raise ValueError(_("The Region (ROI) needs six finite bounds (xmin xmax ymin ymax zmin zmax)."))
    # The engine takes a box with a size along every axis; an ROI added but never placed has size 0.
    if any(values[2 * k] >= values[2 * k + 1] for k in range(3)):
        raise ValueError(_("The Region (ROI) is empty or flat: give it a size along every axis."))
    return [formatNumber(v) for v in values]


def devicesCommand(python):
    """The engine's `devices --json` command line: what PyTorch sees, asked in the engine's own Python."""
    return [str(python), "-m", ENGINE_PACKAGE, "devices", "--json"]


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
    numberedLesions=False,
    overwrite=False,
):
    """The `segment` command line the Logic runs (a list of strings, no shell).

    modelName None lets the engine pick the bundled model for the input's dimensionality; threshold
    None uses the one in the model card (chosen on its validation split). numberedLesions: each lesion's
    voxels hold its lesion-table id (1 = the largest) instead of 1, as the module's runs import them.
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
    if numberedLesions:
        command.append("--numbered-lesions")
    if overwrite:
        command.append("--overwrite")
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
    # PythonSlicer is CTK's launcher: when the Python it started is killed (the out-of-memory killer,
    # as a rule) or crashes, the launcher exits 1 with this line, not with the signal.
    if returnCode == -9 or any("exit abnormally" in line for line in lines):
        return _(
            "The segmentation process was stopped by the system, most likely for lack of memory: close other "
            "programs or choose a smaller region (ROI), then retry."
        )
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
