"""SASSRSegmentLib: the Slicer-free engine of SASSRSegment.

Scale-aware super-resolution lesion segmentation (after Luo et al., IEEE TNNLS 2024): a low-resolution
image goes in, a lesion mask at `scale` times finer resolution comes out. This package never imports
slicer, qt, vtk or ctk, so it runs in plain Python and in PythonSlicer alike.
"""

import os

__version__ = "0.1.0"

# Before torch is imported (it reads this once): on Apple MPS, operations torch has no MPS kernel for (3D
# trilinear upsampling before torch 2.8) run on the CPU instead of stopping the segmentation.
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
