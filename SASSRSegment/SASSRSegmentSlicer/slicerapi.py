"""Slicer's Python API for the module's files, or inert stand-ins where Slicer is absent.

Every file of the module imports slicer, qt, vtk and Slicer's classes from here. In plain Python
(pytest, CI) only the Slicer-free helpers are used and the Slicer classes get inert bases;
Testing/test_slicer_core.py puts stand-ins for Slicer's application in place before importing the
module, so that its Logic runs on Slicer's real core libraries.
"""

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


__all__ = [
    "ScriptedLoadableModule",
    "ScriptedLoadableModuleLogic",
    "ScriptedLoadableModuleTest",
    "ScriptedLoadableModuleWidget",
    "VTKObservationMixin",
    "WithinRange",
    "_",
    "parameterNodeWrapper",
    "qt",
    "slicer",
    "translate",
    "vtk",
    "vtkMRMLMarkupsROINode",
    "vtkMRMLScalarVolumeNode",
    "vtkMRMLSegmentationNode",
]
