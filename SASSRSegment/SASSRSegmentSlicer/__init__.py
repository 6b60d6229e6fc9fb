"""The Slicer side of SASSRSegment, beside the module file SASSRSegment.py (which Slicer loads).

One concern a file; imports point one way, from the top of this list to its bottom, and none imports
the module file:

- logic.py: SASSRSegmentLogic, the Logic the panel and the Python console use.
- selftest.py: the self-test, registered in the module file as SASSRSegmentTest.
- sliceviews.py: the slice views after a run: those that show the input step through the HR slices.
- job.py: one run on a scene volume (SegmentationJob) and what runs end with (SegmentationResult,
  FileResult).
- runner.py: the engine process in the background (SegmentRunner) and its cancel.
- command.py: the engine's command line, its environment, progress lines, failures and panel wording.
- roi.py: the Region (ROI) in the input's coordinates, and its refusals.
- segmentation.py: the lesion segments (one per lesion), their terminology and the HR reference geometry.
- tables.py: the lesion table (CSV columns, units, descriptions, table node).
- scene.py: scene nodes (unique names, placing like the input, writing the input, loading results).
- cards.py: model cards, the default model for an input, the model texts.
- devices.py: what PyTorch sees, and the engine's --device value.
- naming.py: unique names, the names of a run's nodes and files, elapsed time.
- geometry.py: grid geometry in plain Python (boxes, voxel-corner bounds, the HR grid).
- paths.py: where the module's resources are.
- slicerapi.py: Slicer's Python API, or inert stand-ins where Slicer is absent.

The engine (SASSRSegmentLib) never imports slicer, qt, vtk or ctk; this package may.
"""
