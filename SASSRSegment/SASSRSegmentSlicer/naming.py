"""Names and times as the module writes them: unique names, the names of a run's nodes and files,
and elapsed time for the status line."""

from pathlib import Path

from .slicerapi import _

IMAGE_EXTENSIONS = (".nii.gz", ".seg.nrrd", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd", ".png", ".jpg", ".jpeg")
IMAGE_EXTENSIONS += (".tiff", ".tif", ".bmp", ".dcm")


def formatElapsed(seconds):
    """Elapsed time as m:ss (or h:mm:ss) for the status line."""
    seconds = int(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def uniqueName(base, existingNames):
    """`base`, or `base 2`, `base 3`, ... : the first not in existingNames (never replace silently)."""
    existing = set(existingNames)
    if base not in existing:
        return base
    index = 2
    while f"{base} {index}" in existing:
        index += 1
    return f"{base} {index}"


def outputNodeNames(inputName):
    """Names of the nodes a run adds to the scene, derived from the input volume's name."""
    return {
        "segmentation": _("{name} lesions").format(name=inputName),
        "srImage": _("{name} super-resolved").format(name=inputName),
        "table": _("{name} lesion table").format(name=inputName),
    }


def imageStem(path):
    """A file's name without its image extension (double extensions such as .nii.gz included)."""
    name = Path(path).name
    lower = name.lower()
    for extension in IMAGE_EXTENSIONS:
        if lower.endswith(extension) and len(name) > len(extension):
            return name[: -len(extension)]
    return name


def outputPathsForFiles(inputPaths, outputFolder, suffix="_lesions.nrrd"):
    """One output path per input (`<stem><suffix>` in outputFolder); equal stems get ` 2`, ` 3`, ..."""
    used = []
    paths = []
    for inputPath in inputPaths:
        stem = uniqueName(imageStem(inputPath), used)
        used.append(stem)
        paths.append(Path(outputFolder) / f"{stem}{suffix}")
    return paths
