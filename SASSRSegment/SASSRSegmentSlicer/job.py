"""A segmentation job: one run of the engine on a scene volume, from the temporary copy of the input to
the results in the scene (put back as they were when the import fails), and what a run ends with."""

import logging
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .command import failureMessage, panelMessage, processEnvironment, pythonExecutable, segmentCommand
from .naming import formatElapsed, outputNodeNames
from .runner import SegmentRunner
from .scene import (
    loadSuperResolvedImage,
    removeNodeWithHelpers,
    uniqueNodeName,
    unmeasuredPixelsNote,
    writeVolumeToFile,
)
from .segmentation import SegmentationRestorePoint, createSegmentation, importLesionSegmentation
from .slicerapi import _, qt, slicer
from .tables import loadLesionTable

POLL_INTERVAL_MS = 100
RUN_FOLDER_PREFIX = "SASSRSegment-"
# A run's folder older than this is left over from a Slicer that crashed mid-run: it holds a copy of a
# patient's image. Younger ones may belong to a run of another Slicer instance.
STALE_RUN_FOLDER_S = 24 * 3600


def removeStaleRunFolders(temporaryPath, now=None):
    """Delete run folders older than STALE_RUN_FOLDER_S under Slicer's temporary folder."""
    now = time.time() if now is None else now
    for folder in temporaryPath.glob(RUN_FOLDER_PREFIX + "*"):
        try:
            if folder.is_dir() and now - folder.stat().st_mtime > STALE_RUN_FOLDER_S:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue


@dataclass
class SegmentationResult:
    """What a run of segmentVolume ended with; passed to onFinished."""

    status: str  # "completed", "cancelled" or "failed"
    message: str = ""
    elapsed: float = 0.0
    segmentationNode: object = None
    segmentId: str = ""  # lesion 1's segment (or the empty result's "Lesion")
    segmentIds: list = field(default_factory=list)  # one per lesion, in the lesion table's order
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

    @property
    def cancelling(self):
        """Cancel was asked for and the engine has not ended yet (up to its grace time)."""
        return bool(self.runner and self.runner.cancelled) and not self.done

    def elapsed(self):
        return self.runner.elapsed() if self.runner else 0.0

    def start(self):
        removeStaleRunFolders(Path(slicer.app.temporaryPath))
        self.tempDir = Path(tempfile.mkdtemp(prefix=RUN_FOLDER_PREFIX, dir=slicer.app.temporaryPath))
        try:
            self.paths = {
                "input": self.tempDir / "input.nrrd",
                "output": self.tempDir / "lesions.nrrd",
                "srImage": self.tempDir / "super-resolved.nrrd" if self.options["srImage"] else None,
                "table": self.tempDir / "lesions.csv" if self.options["lesionTable"] else None,
            }
            # Bare names, read and written in the run's folder: ITK cannot open a path with non-ASCII
            # characters on Windows (a user name such as "José" is in every temporary path there).
            names = {key: Path(path.name) if path else None for key, path in self.paths.items()}
            command = segmentCommand(
                pythonExecutable(),
                names["input"],
                names["output"],
                modelName=self.options["card"]["folder"],
                device=self.options["device"],
                threshold=self.options["threshold"],
                tta=self.options["tta"],
                roiBounds=self.options["roiBounds"],
                srImagePath=names["srImage"],
                lesionTablePath=names["table"],
                numberedLesions=True,
            )
            writeVolumeToFile(self.volumeNode, self.paths["input"])
            note = unmeasuredPixelsNote(self.volumeNode) if self.options["lesionTable"] else ""
            if note:
                self.warnings.append(note)
                self._log(_("Warning: {message}").format(message=note))
            self._log(_("Running: {command}").format(command=subprocess.list2cmdline(command)))
            self.runner = SegmentRunner(command, env=processEnvironment(), cwd=str(self.tempDir))
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
        try:
            while not self.done:
                self.step()
                slicer.app.processEvents()
                time.sleep(POLL_INTERVAL_MS / 1000.0)
        except BaseException:
            # A caller's callback that raised (or Ctrl+C) had left the engine running, the patient's copy
            # on disk and the Logic refusing every later run as "already running".
            self.abort()
            raise

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
            removed = self._removedDuringRun()
            if self.runner.cancelled:
                self.result = SegmentationResult("cancelled", _("Segmentation was cancelled."), elapsed)
            elif self.runner.returnCode != 0:
                message = panelMessage(failureMessage(self.runner.returnCode, self.runner.stderrLines))
                self.result = SegmentationResult("failed", message, elapsed)
            elif removed:
                self.result = SegmentationResult("failed", removed, elapsed)
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

    def _removedDuringRun(self):
        """Why the results have nowhere to go ("" where they have): the panel leaves the Data module
        free during a run, and results had gone into a deleted segmentation (lost) or beside a deleted
        volume (a segmentation referring to no image)."""
        if not slicer.mrmlScene.IsNodePresent(self.volumeNode):
            return _("The input volume was deleted during the run: nothing was added.")
        segmentationNode = self.options["outputSegmentation"]
        if segmentationNode is not None and not slicer.mrmlScene.IsNodePresent(segmentationNode):
            return _("The output segmentation was deleted during the run: nothing was added.")
        return ""

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
            segmentIds = importLesionSegmentation(
                self.paths["output"],
                self.volumeNode,
                segmentationNode,
                self.options["scales"],
                self.options["replaceSegment"],
                restorePoint,
            )
            result = SegmentationResult("completed", "", elapsed, segmentationNode, segmentIds[0], segmentIds)
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
