"""Where the module's files are: the module folder, the bundled models, the sample and the icon."""

from pathlib import Path

# The module folder (SASSRSegment/, this package's parent): it holds Resources/ and the engine package.
MODULE_DIR = Path(__file__).resolve().parent.parent
MODELS_DIR = MODULE_DIR / "Resources" / "Models"
SAMPLE_PATH = MODULE_DIR / "Resources" / "Samples" / "brats_2013_pat0005_1_flair_2mm.nrrd"
ICON_PATH = MODULE_DIR / "Resources" / "Icons" / "SASSRSegment.png"
