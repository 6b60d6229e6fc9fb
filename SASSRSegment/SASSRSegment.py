"""SASSRSegment: lesion segmentation at super-resolution in 3D Slicer.

This file holds what Slicer looks for in a scripted module: the module (SASSRSegment), its panel
(SASSRSegmentWidget) with the panel's parameter node, and the self-test under the name Slicer runs
(SASSRSegmentTest). The rest is in the SASSRSegmentSlicer package beside it, one concern a file (its
__init__ says which); it runs the Slicer-free engine (`SASSRSegmentLib`) in a background process with
Slicer's Python, reads its JSON progress lines, and imports the high-resolution (HR) label map into a
segmentation whose reference geometry is the HR grid, so that editing in Segment Editor happens at HR.

From the Python console: `import SASSRSegment; SASSRSegment.SASSRSegmentLogic().segmentVolume(...)`
(docs/slicer.md). This file and the package import without Slicer: pytest tests the Slicer-free helpers
in plain Python, and Testing/test_slicer_core.py runs the Logic on Slicer's core libraries (the
slicer-core wheel) with small stand-ins for the application.
"""

import hashlib
import logging
import sys
import time
from typing import Annotated

from SASSRSegmentSlicer import selftest
from SASSRSegmentSlicer.cards import hasImageSrDecoder, modelsHelpHtml, modelSummary, readModelCards
from SASSRSegmentSlicer.command import devicesCommand, processEnvironment, pythonExecutable
from SASSRSegmentSlicer.devices import DeviceProbe, deviceArgument, deviceSummary
from SASSRSegmentSlicer.geometry import hrScales
from SASSRSegmentSlicer.logic import NOT_IMAGES, SASSRSegmentLogic
from SASSRSegmentSlicer.naming import formatElapsed
from SASSRSegmentSlicer.paths import ICON_PATH, SAMPLE_PATH
from SASSRSegmentSlicer.segmentation import lesionSegmentIds, segmentationInputVolume
from SASSRSegmentSlicer.slicerapi import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleWidget,
    VTKObservationMixin,
    WithinRange,
    _,
    parameterNodeWrapper,
    qt,
    slicer,
    translate,
    vtk,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from SASSRSegmentSlicer.sliceviews import HrSliceSpacing

# Seconds after a start in which a click on the Cancel button (it was Segment lesions) is ignored.
DOUBLE_CLICK_S = 1.0
# Scalar volumes in Slicer's class tree that are no image to segment; the .ui's input selector hides the same.
CITATION = (
    'Luo et al., "Scale-aware super-resolution network with dual affinity learning for lesion segmentation '
    'from medical images", IEEE Transactions on Neural Networks and Learning Systems, 2024 '
    '(<a href="https://arxiv.org/abs/2305.19063">arXiv 2305.19063</a>).'
)


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
            # Sample Data reuses a cached file of the same name unless a checksum says it changed.
            checksums=["SHA256:" + hashlib.sha256(SAMPLE_PATH.read_bytes()).hexdigest()],
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
        self._runStartedAt = 0.0
        self._cards = []
        self._devices = None
        self._deviceProbe = None
        self._deviceTimer = None
        self._statusTimer = None
        self._hrSliceSpacing = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SASSRSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SASSRSegmentLogic()
        self._hrSliceSpacing = HrSliceSpacing()
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
        self._deviceTimer = qt.QTimer()
        self._deviceTimer.setInterval(250)
        self._deviceTimer.connect("timeout()", self._pollDeviceProbe)
        self._detectDevices()

    def cleanup(self):
        # Reload and quit: no process may outlive the module, no copy of the patient image may stay on disk.
        if self.logic:
            self.logic.cleanup()
        self._job = None
        if self._statusTimer:
            self._statusTimer.stop()
        self._stopDeviceProbe()
        self.removeObservers()
        # The views keep the spacing a run gave them (changing views while Slicer quits is no help); a
        # reloaded module no longer watches them: the view controller's spacing menu has Automatic.
        if self._hrSliceSpacing:
            self._hrSliceSpacing.removeObservers()

    def onReload(self):
        # Slicer's Reload reads this file again, not the files it imports: forget the SASSRSegmentSlicer
        # package so that its code is read again too (the engine runs in a new process at each run anyway).
        for name in [name for name in sys.modules if name.split(".")[0] == "SASSRSegmentSlicer"]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

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
        if self._hrSliceSpacing:
            self._hrSliceSpacing.release()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(SASSRSegmentParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            volumes = [
                node
                for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                if not any(node.IsA(kind) for kind in NOT_IMAGES)
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
        self._stopDeviceProbe()
        self.ui.deviceInfoLabel.text = _("Looking for a GPU...")
        self._deviceProbe = DeviceProbe(devicesCommand(pythonExecutable()), processEnvironment())
        self._deviceProbe.start()
        self._deviceTimer.start()

    def _stopDeviceProbe(self):
        if self._deviceTimer:
            self._deviceTimer.stop()
        if self._deviceProbe:
            self._deviceProbe.stop()
        self._deviceProbe = None

    def _pollDeviceProbe(self):
        devices = self._deviceProbe.poll() if self._deviceProbe else None
        if devices is None:
            return
        self._stopDeviceProbe()
        self._devices = devices
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
        if card:
            self.ui.modelComboBox.toolTip = modelSummary(card)
        else:
            self.ui.modelComboBox.toolTip = (
                _("Choose a model.") if self._cards else _("No bundled model was found.")
            )
        self._updateSrImageOption(card)
        self._checkCanApply()

    def _onInputVolumeChanged(self, volume):
        if volume is None:
            return
        name = self.logic.defaultModelName(volume)
        if not self._job:
            self.ui.statusLabel.text = "" if name else self.logic.noModelMessage(volume)
        # No default (a CT, a 3D ultrasound): the selection is cleared, so Apply waits for the user's
        # own choice instead of running the previous volume's model on this one.
        self._selectModel(name or "")
        if not name:
            wasBlocked = self.ui.modelComboBox.blockSignals(True)
            self.ui.modelComboBox.currentIndex = -1
            self.ui.modelComboBox.blockSignals(wasBlocked)
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
        changed = name != self._parameterNode.modelName
        self._parameterNode.modelName = name
        card = self._currentCard()
        # Each model's card carries the threshold chosen on its validation split; a threshold the user
        # set stays while the model does (another input volume for the same model).
        if changed and card and isinstance(card.get("threshold"), (int, float)):
            self._parameterNode.threshold = min(max(float(card["threshold"]), 0.05), 0.95)

    def onDeviceChanged(self, index):
        if self._parameterNode:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index) or "auto"

    def onApplyButton(self):
        if self._job:
            # The button became Cancel under the mouse: a double click's second click is no cancel.
            if time.monotonic() - self._runStartedAt < DOUBLE_CLICK_S:
                return
            self._job.cancel()
            self._updateRunningStatus()
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
        except (RuntimeError, ValueError, OSError) as exc:
            # OSError: no room or no permission for the job's temporary folder, or the engine process
            # could not start; a dialog, not a traceback in the Python console.
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
        """The segmentVolume arguments saying where the lesion segments go; None when the user cancels."""
        segmentation = parameters.outputSegmentation
        changeGrid = False
        if segmentation:
            status = self.logic.outputSegmentationStatus(
                segmentation, parameters.inputVolume, parameters.modelName
            )
            if status in ("otherVolume", "notLabelmap"):
                # Refused whatever the answer: no question first, segmentVolume's refusal says why.
                return {"outputSegmentation": segmentation, "replaceSegment": False, "changeGrid": False}
            if status == "changeGrid":
                answer = self._askChangeGrid(segmentation, parameters.inputVolume)
                if answer is None:
                    return None
                changeGrid = answer
                segmentation = segmentation if changeGrid else None
        replaceSegment = False
        if segmentation and lesionSegmentIds(segmentation):
            replaceSegment = self._askReplaceSegment(segmentation)
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

    def _askReplaceSegment(self, segmentation):
        """True: replace the existing lesion segments; False: add new ones; None: do not run."""
        text = _("The segmentation already has {count} lesion segment(s).").format(
            count=len(lesionSegmentIds(segmentation))
        )
        return self._askChoice(_("Lesion segments exist"), text, _("Replace them"), _("Add new segments"))

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
        self.ui.progressBar.format = "%p%"  # not the last run's final stage name
        if running:
            self._runStartedAt = time.monotonic()
            self.ui.statusLabel.text = _("Starting...")
            self._statusTimer.start()
        else:
            self._statusTimer.stop()
        self._checkCanApply()

    def _updateRunningStatus(self):
        if not self._job:
            return
        progress = self._job.lastProgress
        # The engine may print a last progress line while it stops; the user must see the click registered.
        if self._job.cancelling:
            stage = _("Cancelling...")
        else:
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
                self._showResult(self._parameterNode.inputVolume)
        elif result.status == "cancelled":
            self.ui.statusLabel.text = _("Cancelled after {elapsed}.").format(elapsed=elapsed)
        else:
            failed = _("Failed after {elapsed}: {message}").format(elapsed=elapsed, message=result.message)
            self.ui.statusLabel.text = " ".join([failed, *warnings])
            slicer.util.errorDisplay(result.message)

    def _showResult(self, volume):
        """Show the input under the segmentation, the slice views stepping through its HR slices (in
        Automatic spacing they would step by the input's slices, every other HR slice)."""
        slicer.util.setSliceViewerLayers(background=volume, fit=False)
        card = self._currentCard()  # the run's model: the panel cannot change it while a run goes on
        if volume is not None and volume.GetImageData() is not None and card:
            self._hrSliceSpacing.show(volume, hrScales(card, volume.GetImageData().GetDimensions()))


#
# Self-test (run with "Reload and Test", or ctest: py_SASSRSegment)
#


class SASSRSegmentTest(selftest.SelfTest):
    """The self-test, under the name Slicer looks for; its body is in SASSRSegmentSlicer/selftest.py."""
