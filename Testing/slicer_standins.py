"""Stand-ins for the parts of 3D Slicer that the slicer-core wheel does not have.

The wheel holds Slicer's real core libraries (MRML, the Volumes, Segmentations, Markups, Colors and
Subject Hierarchy logic, vtkSegmentationCore, slicer.util). It lacks the Qt application and the
Qt-side Python: `qt`, `slicer.app` (whose IO manager `slicer.util.loadVolume` calls), `slicer.modules`,
`slicer.i18n`, `slicer.parameterNodeWrapper` and `slicer.ScriptedLoadableModule`. This file supplies
those, as small as the module's Logic needs, wired to the real libraries the way Slicer's application
wires them: one application logic, each module logic registered with it and with the scene.
"""

import contextlib
import logging
import sys
import time
import types
import unittest
from pathlib import Path

import slicer
import vtk


class QTimer:
    """qt.QTimer without an event loop: `processEvents()` fires the timers that are due."""

    active = []

    def __init__(self):
        self.interval = 0
        self._callbacks = []
        self._due = None

    def setInterval(self, milliseconds):
        self.interval = milliseconds

    def connect(self, signal, callback):
        assert signal == "timeout()", signal
        self._callbacks.append(callback)

    def start(self):
        self._due = time.monotonic() + self.interval / 1000.0
        if self not in QTimer.active:
            QTimer.active.append(self)

    def stop(self):
        if self in QTimer.active:
            QTimer.active.remove(self)

    @staticmethod
    def singleShot(milliseconds, callback):
        timer = QTimer()
        timer.setInterval(milliseconds)
        timer.connect("timeout()", lambda: (timer.stop(), callback()))
        timer.start()

    def _fireIfDue(self):
        if self._due is not None and time.monotonic() >= self._due:
            self._due = time.monotonic() + self.interval / 1000.0
            for callback in list(self._callbacks):
                callback()


def processEvents():
    for timer in list(QTimer.active):
        timer._fireIfDue()


class IOManager:
    """slicer.app.coreIOManager(): reads volumes with the real Volumes logic, as Slicer's volume reader does."""

    # qSlicerVolumesReader's options -> vtkSlicerVolumesLogic::AddArchetypeVolume's loading flags.
    FLAGS = {"labelmap": 1, "center": 2, "singleFile": 4, "autoWindowLevel": 8, "discardOrientation": 16}

    def __init__(self, scene, volumesLogic):
        self.scene = scene
        self.volumesLogic = volumesLogic
        self.filesRead = []  # what Slicer would list under File > Recent

    def fileType(self, fileName):
        return "VolumeFile"

    def loadNodes(self, fileType, properties, loadedNodes, userMessages):
        if fileType != "VolumeFile":
            raise NotImplementedError(f"the stand-in IO manager reads volumes only, not {fileType}")
        fileName = properties["fileName"]
        self.filesRead.append(fileName)
        flags = sum(bit for key, bit in self.FLAGS.items() if properties.get(key))
        name = properties.get("name") or self.scene.GenerateUniqueName(Path(fileName).name.split(".")[0])
        node = self.volumesLogic.AddArchetypeVolume(fileName, name, flags)
        if node is None:
            userMessages.AddMessage(vtk.vtkCommand.ErrorEvent, f"cannot read {fileName}")
            return False
        loadedNodes.AddItem(node)
        return True


class Application:
    """slicer.app: the temporary folder, the IO manager, the application logic and event processing."""

    def __init__(self, scene, volumesLogic, temporaryPath, applicationLogic):
        self.temporaryPath = str(temporaryPath)
        self._ioManager = IOManager(scene, volumesLogic)
        self._applicationLogic = applicationLogic

    def coreIOManager(self):
        return self._ioManager

    def applicationLogic(self):
        # The real vtkSlicerApplicationLogic; its slice logics are those a test registers (Slicer's layout
        # manager registers one per slice view widget), none by default.
        return self._applicationLogic

    def processEvents(self):
        processEvents()

    def connect(self, signal, callback):
        pass


class ScriptedLoadableModule:
    def __init__(self, parent=None):
        self.parent = parent


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.parent = parent


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, requestedDelay=None):
        # Slicer shows the message and keeps processing events for the delay the test asks for.
        logging.info("delayDisplay: %s", message)
        deadline = time.monotonic() + (requestedDelay or 0) / 1000.0
        while time.monotonic() < deadline:
            processEvents()
            time.sleep(0.02)


def _observeDataNodes(scene):
    """Give each data node added to the scene a subject-hierarchy item, as Slicer's plugin logic (Qt) does."""

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(caller, event, node):
        dataNode = node.IsA("vtkMRMLStorableNode") or node.IsA("vtkMRMLTransformableNode")
        if not dataNode or node.GetHideFromEditors() or node.IsA("vtkMRMLSubjectHierarchyNode"):
            return
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        if not shNode.GetItemByDataNode(node):
            shNode.CreateItem(shNode.GetSceneItemID(), node)

    return scene.AddObserver(slicer.vtkMRMLScene.NodeAddedEvent, onNodeAdded)


def _moduleLogic(logic, applicationLogic, scene):
    logic.SetMRMLApplicationLogic(applicationLogic)
    logic.SetMRMLScene(scene)
    return logic


def _standInModules():
    qt = types.ModuleType("qt")
    qt.QTimer = QTimer
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.WithinRange = lambda minimum, maximum: (minimum, maximum)
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (
        ScriptedLoadableModule,
        ScriptedLoadableModuleWidget,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
    ):
        setattr(scripted, cls.__name__, cls)
    return {
        "qt": qt,
        "slicer.i18n": i18n,
        "slicer.parameterNodeWrapper": wrapper,
        "slicer.ScriptedLoadableModule": scripted,
    }


@contextlib.contextmanager
def installed(temporaryPath):
    """A real scene as slicer.mrmlScene, with the stand-ins in place; everything is undone on exit."""
    scene = slicer.vtkMRMLScene()
    applicationLogic = slicer.vtkSlicerApplicationLogic()
    applicationLogic.SetMRMLScene(scene)
    logics = {
        "Colors": slicer.vtkSlicerColorLogic(),
        "Volumes": slicer.vtkSlicerVolumesLogic(),
        "Segmentations": slicer.vtkSlicerSegmentationsModuleLogic(),
        "Markups": slicer.vtkSlicerMarkupsLogic(),
        "SubjectHierarchy": slicer.vtkSlicerSubjectHierarchyModuleLogic(),
    }
    for name, logic in logics.items():
        _moduleLogic(logic, applicationLogic, scene)
        applicationLogic.SetModuleLogic(name, logic)
    _observeDataNodes(scene)
    app = Application(scene, logics["Volumes"], temporaryPath, applicationLogic)
    modules = types.SimpleNamespace(
        segmentations=types.SimpleNamespace(logic=lambda: logics["Segmentations"]),
        volumes=types.SimpleNamespace(logic=lambda: logics["Volumes"]),
    )
    standIns = _standInModules()
    saved = {name: sys.modules.get(name) for name in standIns}
    sys.modules.update(standIns)
    attributes = {"mrmlScene": scene, "app": app, "modules": modules}
    attributes.update({name.split(".")[1]: module for name, module in standIns.items() if "." in name})
    for name, value in attributes.items():
        setattr(slicer, name, value)
    try:
        yield app
    finally:
        QTimer.active.clear()
        for name in attributes:
            delattr(slicer, name)
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
