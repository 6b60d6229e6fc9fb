"""The slice views after a run: those that show the input step through the segmentation's HR slices.

In Automatic slice spacing, a slice view steps (arrow keys, offset slider) by the spacing of the lowest
volume layer it shows, projected on its normal (vtkMRMLSliceLogic::GetLowestVolumeSliceSpacing):
segmentations do not count. Over a 2 mm input the 1 mm lesion segmentation would be seen, and edited
in Segment Editor, on every other of its slices only. The views that show the input therefore get a
prescribed spacing: what Automatic would use, divided by the model's scale, which is the HR grid's
spacing (its axes are the input's, each `scale` times finer).

A prescribed spacing stays with the view whatever it shows, so the views are watched: one that stops
showing the input (another background volume, the input removed, the scene closed) goes back to
Automatic, one that is turned (orientation menu, oblique reformat) gets the spacing of its new
orientation, and one whose spacing the user set (the view controller's spacing menu) is theirs and
left alone from then on. The panel uses this; the Python console's segmentVolume changes no view.
"""

from .slicerapi import VTKObservationMixin, slicer, vtk

# Orientation changes below this (in the slice-to-RAS direction cosines) are rounding, not a turn.
ORIENTATION_TOLERANCE = 1e-6


class _View:
    """A slice view whose spacing this module set: its logic, the volume it shows, and what was set."""

    def __init__(self, sliceLogic, volumeId, scale):
        self.logic = sliceLogic
        self.sliceNode = sliceLogic.GetSliceNode()
        self.compositeNode = sliceLogic.GetSliceCompositeNode()
        self.volumeId = volumeId
        self.scale = scale
        self.spacing = None
        self.orientation = None


class HrSliceSpacing(VTKObservationMixin):
    """Makes the slice views that show a volume step at its HR grid's spacing, as long as they show it."""

    def __init__(self):
        VTKObservationMixin.__init__(self)
        self._views = {}  # slice node ID -> _View

    def show(self, volumeNode, scales):
        """Make every slice view whose background is `volumeNode` step at the spacing of its HR grid,
        `scales` (per IJK axis) times finer than its own; the current slice moves onto an HR slice.

        Only a refinement by the same scale on every axis is applied: it maps onto any slice orientation,
        oblique ones included, by one division. A 2D image's (scales [s, s, 1]) is not: it has no finer
        slices through-plane, the view in its plane has nothing to step through, and the views across
        it show one line of pixels; its views keep Automatic spacing.
        """
        scale = scales[0]
        if scale <= 1 or any(other != scale for other in scales):
            return
        for sliceLogic in _sliceLogics():
            compositeNode = sliceLogic.GetSliceCompositeNode()
            if compositeNode is None or compositeNode.GetBackgroundVolumeID() != volumeNode.GetID():
                continue
            self._forget(sliceLogic.GetSliceNode())
            view = _View(sliceLogic, volumeNode.GetID(), scale)
            self._prescribe(view)
            # Automatic spacing left the slice on an input slice's centre, a boundary between two HR slices
            # (scale 2); steps from there would show whichever HR slice rounding picks.
            sliceLogic.SnapSliceOffsetToIJK()
            self._views[view.sliceNode.GetID()] = view
            for node in (view.sliceNode, view.compositeNode):
                self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self._onViewModified)

    def release(self):
        """Put every view this module set back to Automatic spacing and stop watching them (scene close)."""
        for view in list(self._views.values()):
            self._forget(view.sliceNode)
            if _hasSpacing(view.sliceNode, view.spacing):
                view.sliceNode.SetSliceSpacingModeToAutomatic()

    def _onViewModified(self, caller, event):
        for view in list(self._views.values()):
            if caller in (view.sliceNode, view.compositeNode):
                self._update(view)

    def _update(self, view):
        sliceNode = view.sliceNode
        if not _hasSpacing(sliceNode, view.spacing):
            # The user chose a spacing for this view (Automatic, or a value of their own): it stays theirs.
            self._forget(sliceNode)
        elif view.compositeNode.GetBackgroundVolumeID() != view.volumeId:
            # Another volume, or none: Automatic steps through whatever the view shows now.
            self._forget(sliceNode)
            sliceNode.SetSliceSpacingModeToAutomatic()
        elif not _sameOrientation(_orientation(sliceNode), view.orientation):
            self._prescribe(view)

    def _prescribe(self, view):
        """Prescribe the spacing Automatic would use for the view's volume in its current orientation,
        divided by the scale; asked of Slicer's own slice logic, so that it is the running Slicer's rule
        (closest volume axis, the volume's linear transform) for any orientation."""
        sliceNode = view.sliceNode
        wasModifying = sliceNode.StartModify()  # one Modified event, once the spacing is set
        try:
            sliceNode.SetSliceSpacingModeToAutomatic()
            automatic = view.logic.GetLowestVolumeSliceSpacing()
            view.spacing = [float(value) / view.scale for value in automatic]
            view.orientation = _orientation(sliceNode)
            sliceNode.SetPrescribedSliceSpacing(view.spacing)
            sliceNode.SetSliceSpacingModeToPrescribed()
        finally:
            sliceNode.EndModify(wasModifying)

    def _forget(self, sliceNode):
        view = self._views.pop(sliceNode.GetID(), None) if sliceNode else None
        if view is not None:
            for node in (view.sliceNode, view.compositeNode):
                self.removeObserver(node, vtk.vtkCommand.ModifiedEvent, self._onViewModified)


def _sliceLogics():
    """The application's slice logics, one per slice view widget; none without the layout (e.g. Slicer
    started without its main window), and a view without one is left as it is."""
    applicationLogic = slicer.app.applicationLogic()
    logics = applicationLogic.GetSliceLogics() if applicationLogic else None
    if logics is None:
        return []
    found = [logics.GetItemAsObject(i) for i in range(logics.GetNumberOfItems())]
    return [logic for logic in found if logic is not None and logic.GetSliceNode() is not None]


def _hasSpacing(sliceNode, spacing):
    """Whether the view is still in the prescribed spacing this module set."""
    if (
        spacing is None
        or sliceNode.GetSliceSpacingMode() != slicer.vtkMRMLSliceNode.PrescribedSliceSpacingMode
    ):
        return False
    current = sliceNode.GetPrescribedSliceSpacing()
    return all(abs(a - b) <= 1e-9 * max(1.0, abs(b)) for a, b in zip(current, spacing))


def _orientation(sliceNode):
    matrix = sliceNode.GetSliceToRAS()
    return [matrix.GetElement(r, c) for r in range(3) for c in range(3)]


def _sameOrientation(first, second):
    return second is not None and all(abs(a - b) <= ORIENTATION_TOLERANCE for a, b in zip(first, second))
