"""SASSRSegmentLib: the Slicer-free engine of SASSRSegment.

Scale-aware super-resolution lesion segmentation (after Luo et al., IEEE TNNLS 2024): a low-resolution
image goes in, a lesion mask at `scale` times finer resolution comes out. This package never imports
slicer, qt, vtk or ctk, so it runs in plain Python and in PythonSlicer alike.
"""

__version__ = "0.1.0"
