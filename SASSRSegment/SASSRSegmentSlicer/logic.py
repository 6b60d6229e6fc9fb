"""SASSRSegmentLogic: the module's Logic, used by the panel and from Slicer's Python console.

It needs no Qt and no parameter node, so that Testing/test_slicer_core.py runs it on Slicer's core
libraries (the slicer-core wheel) with small stand-ins for the application.
"""

import importlib.util
import json
import logging
import subprocess
from pathlib import Path

from .cards import defaultModelName, hasImageSrDecoder, readModelCards
from .command import failureMessage, processEnvironment, pythonExecutable, segmentCommand
from .geometry import gridSpatialDims, hrScales
from .job import FileResult, SegmentationJob
from .naming import outputPathsForFiles
from .paths import MODELS_DIR, MODULE_DIR
from .roi import roiBoundsForVolume
from .runner import SegmentRunner
from .scene import dicomModality, pictureFormat
from .segmentation import (
    hasReferenceGeometry,
    hrGeometryInFrameOf,
    segmentationInputVolume,
    storesLabelmaps,
)
from .slicerapi import ScriptedLoadableModuleLogic, _, slicer

TORCH_MINIMUM = (2, 1)
TORCH_REQUIREMENT = ">={}.{}".format(*TORCH_MINIMUM)


def _installedTorchVersion():
    """(major, minor) of the torch Slicer's Python has installed, None when its version is not known."""
    import importlib.metadata
    import re

    try:
        match = re.match(r"(\d+)\.(\d+)", importlib.metadata.version("torch"))
    except importlib.metadata.PackageNotFoundError:
        return None
    return (int(match.group(1)), int(match.group(2))) if match else None


def _volumeSpatialDims(volumeNode):
    """2 or 3 (one slice: 2D); 0 for a volume without image data."""
    imageData = volumeNode.GetImageData()
    return gridSpatialDims(imageData.GetDimensions()) if imageData is not None else 0


# Scalar volumes in Slicer's class tree that hold no image to segment: a label map (a mask given as the
# image had been segmented into "0 lesions"), diffusion data.
NOT_IMAGES = (
    "vtkMRMLLabelMapVolumeNode",
    "vtkMRMLDiffusionWeightedVolumeNode",
    "vtkMRMLDiffusionTensorVolumeNode",
)


def _isNode(node, kind):
    return node is not None and hasattr(node, "IsA") and node.IsA(kind)


def _checkNodes(volumeNode, roiNode, outputSegmentation):
    """Refuse, in one line, nodes a console caller passed of the wrong kind (AttributeErrors before)."""
    if (
        not _isNode(volumeNode, "vtkMRMLScalarVolumeNode")
        or any(volumeNode.IsA(kind) for kind in NOT_IMAGES)
        or not volumeNode.GetImageData()
    ):
        raise RuntimeError(_("Select an input volume that holds an image (not a label map)."))
    if roiNode is not None and not _isNode(roiNode, "vtkMRMLMarkupsROINode"):
        raise RuntimeError(_("The Region must be a markups ROI node."))
    if outputSegmentation is not None and not _isNode(outputSegmentation, "vtkMRMLSegmentationNode"):
        raise RuntimeError(_("The output segmentation must be a segmentation node."))


def _pictureStack(volumeNode):
    """A 3D volume of colour pixels or from picture files: numbered PNG or JPEG images (an ultrasound
    clip's frames) read as one stack, as Slicer does where "Single file" is unticked, and does by itself
    for names of digits only (0001.png). No 3D model is made for them, and the brain MRI model had been
    chosen for such a stack by its dimensionality alone."""
    imageData = volumeNode.GetImageData()
    return _volumeSpatialDims(volumeNode) == 3 and (
        imageData.GetNumberOfScalarComponents() > 1 or bool(pictureFormat(volumeNode))
    )


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
            # Another extension may have installed an older torch; the engine would then fail in ways
            # that do not name the cause.
            version = _installedTorchVersion()
            if version is not None and version < TORCH_MINIMUM:
                raise RuntimeError(
                    _(
                        "PyTorch {found} is installed, but this module needs {needed} or newer: update it in the "
                        "PyTorch Utils module, restart Slicer, then retry."
                    ).format(found="{}.{}".format(*version), needed="{}.{}".format(*TORCH_MINIMUM))
                )
            return False
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError(
                _(
                    "PyTorch is required: install the PyTorch extension from the Extensions Manager (View menu), "
                    "restart Slicer, then retry."
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
        dims = _volumeSpatialDims(volumeNode)
        if not dims or _pictureStack(volumeNode):
            return None
        return defaultModelName(self.modelCards(), dims, dicomModality(volumeNode))

    def noModelMessage(self, volumeNode):
        """Why no installed model is chosen for a volume, in one line."""
        modality = dicomModality(volumeNode)
        dims = _volumeSpatialDims(volumeNode)
        if _pictureStack(volumeNode) and not modality:  # from DICOM, its modality says more
            return _(
                "This is a 3D {what} (image files read as one stack?): no installed model takes it. "
                "Load one image with Single file ticked (Add Data, Show Options) for a 2D model."
            ).format(
                what=_("colour volume")
                if volumeNode.GetImageData().GetNumberOfScalarComponents() > 1
                else _("stack of {format} pictures").format(format=pictureFormat(volumeNode)[1:].upper())
            )
        if modality and dims:
            return _(
                "No installed model is made for {dims}D {modality} images: choose a model only if it fits them."
            ).format(dims=dims, modality=modality)
        return _("No installed model takes this input: choose a model in the list only if it fits it.")

    def modelCard(self, modelName, volumeNode):
        """The card of a model name or bundle folder ("folder" says where it is); None picks by the input."""
        if not modelName:
            modelName = self.defaultModelName(volumeNode)
            if not modelName:
                raise RuntimeError(self.noModelMessage(volumeNode))
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
        HR grid; "otherVolume": it holds the lesions of another volume (never mixed); "notLabelmap": it
        keeps closed surfaces (loaded from STL or OBJ), which no label map can be added to.
        """
        madeFor = segmentationInputVolume(segmentationNode)
        if madeFor is not None and madeFor.GetID() != volumeNode.GetID():
            return "otherVolume"
        if not storesLabelmaps(segmentationNode):
            return "notLabelmap"
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
        called with a SegmentationResult in both modes. One segment per lesion, "Lesion 1" (the largest)
        to "Lesion N" as in the lesion table (one empty "Lesion" when none is found), is added to
        `outputSegmentation` (a new node, named after the volume, when None); replaceSegment=True replaces
        the module's earlier lesion segments there instead. A segmentation of another volume is refused; the user's own segmentation on
        another grid is switched to the HR grid only with changeGrid=True.
        """
        if self.activeJob and not self.activeJob.done:
            raise RuntimeError(_("A segmentation is already running: wait for it or cancel it."))
        _checkNodes(volumeNode, roiNode, outputSegmentation)
        self.ensureTorch()
        card = self.modelCard(modelName, volumeNode)
        if _pictureStack(volumeNode) and pictureFormat(volumeNode):
            # A picture stores no slice spacing: no model can take the stack, even one chosen by hand
            # (as `segment` refuses a multi-page TIFF).
            raise RuntimeError(self.noModelMessage(volumeNode))
        if srImage and not hasImageSrDecoder(card):
            raise RuntimeError(
                _(
                    "The model '{name}' has no image super-resolution decoder: untick \"also create the "
                    'super-resolved image".'
                ).format(name=card["name"])
            )
        if outputSegmentation is not None:
            self._checkOutputSegmentation(outputSegmentation, volumeNode, card, changeGrid)
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

    def _checkOutputSegmentation(self, outputSegmentation, volumeNode, card, changeGrid):
        """Refuse a segmentation that holds another volume's lesions, that keeps closed surfaces, or that
        is on another grid (unless changeGrid allows switching it to the HR grid)."""
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
        if status == "notLabelmap":
            raise RuntimeError(
                _(
                    "The segmentation '{segmentation}' keeps closed surfaces, to which lesions cannot be "
                    'added: choose "Create new segmentation".'
                ).format(segmentation=outputSegmentation.GetName())
            )
        if status == "changeGrid" and not changeGrid:
            raise RuntimeError(
                _(
                    "The segmentation '{segmentation}' is on another grid: choose \"Create new "
                    'segmentation", or allow switching it to the high-resolution grid.'
                ).format(segmentation=outputSegmentation.GetName())
            )

    def cancel(self):
        """Cancel the running segmentVolume job, if any."""
        if self.activeJob:
            self.activeJob.cancel()

    def segmentFiles(
        self,
        inputPaths,
        outputFolder,
        modelName=None,
        device="auto",
        tta=False,
        lesionTable=False,
        numberedLesions=False,
        overwrite=False,
    ):
        """Segment image files (or DICOM series folders) without loading them into the scene.

        Writes `<stem>_lesions.nrrd` (and `<stem>_lesions.csv` with lesionTable=True) per input into
        outputFolder: a 0/1 mask, or with numberedLesions=True each lesion's voxels hold its lesion-table
        id (1 = the largest; uint16 past 255 lesions). modelName None lets the engine pick the bundled model for each input's
        dimensionality. Outputs that exist are replaced only with overwrite=True (a re-run into the same
        folder). A failing input is reported and skipped; returns one FileResult per input.
        """
        # One path given as a string had been read as paths of one character each: "/" first, which the
        # engine walked for images. Relative paths are the caller's, not the engine's working folder's.
        if isinstance(inputPaths, (str, Path)):
            inputPaths = [inputPaths]
        inputPaths = [str(Path(path).absolute()) for path in inputPaths]
        outputFolder = Path(outputFolder).absolute()
        self.ensureTorch()
        model = self.modelCard(modelName, None)["folder"] if modelName else None
        try:
            outputFolder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RuntimeError(
                _("Cannot make the output folder {folder}: {error}").format(
                    folder=outputFolder, error=exc.strerror
                )
            ) from None
        results = []
        outputPaths = outputPathsForFiles(inputPaths, outputFolder)
        for index, inputPath in enumerate(inputPaths):
            outputPath = outputPaths[index]
            tablePath = outputPath.with_suffix(".csv") if lesionTable else None
            try:
                command = segmentCommand(
                    pythonExecutable(),
                    inputPath,
                    outputPath,
                    model,
                    device,
                    tta=tta,
                    lesionTablePath=tablePath,
                    numberedLesions=numberedLesions,
                    overwrite=overwrite,
                )
            except ValueError as exc:  # an unknown device: wrong for every input
                raise RuntimeError(str(exc)) from None
            runner = SegmentRunner(command, env=processEnvironment(), cwd=str(MODULE_DIR))
            runner.start()
            logging.info("SASSRSegment: segmenting %s", inputPath)
            runner.wait(onEvent=_logEvent, idle=slicer.app.processEvents)
            if runner.returnCode == 0:
                results.append(FileResult(inputPath, str(outputPath), warnings=runner.warnings))
            else:
                message = failureMessage(runner.returnCode, runner.stderrLines).replace(
                    "pass --overwrite to replace it", "pass overwrite=True to replace it"
                )
                logging.error("SASSRSegment: %s: %s", inputPath, message)
                results.append(FileResult(inputPath, error=message, warnings=runner.warnings))
        return results


def _logEvent(event):
    if event["kind"] == "progress":
        logging.info("SASSRSegment: %s %3.0f%% %s", event["stage"], 100 * event["fraction"], event["message"])
    elif event["kind"] == "warning":
        logging.warning("SASSRSegment: %s", event["message"])
    else:
        logging.info("SASSRSegment: %s", event["message"])
