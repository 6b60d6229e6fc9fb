"""How bright each case's lesion is against its healthy tissue, in the units of three normalisers
(docs/models.md, "The hard validation cases are the faint lesions").

    python tools/lesion_contrast.py CACHE      (a training cache of an MRI dataset, e.g. runs/cache-brain-robust)

Per case: the lesion's fraction of the tissue interior, and the median of the lesion's interior voxels
minus that of the healthy ones, in the cache's z-score units, in interquartile ranges of the tissue and
in standard deviations of the healthy tissue; then, per unit, the coefficient of variation over the
cases and the correlation with the lesion's fraction.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "SASSRSegment"))

from SASSRSegmentLib.data.cache import open_cache  # noqa: E402
from SASSRSegmentLib.data.normalization import erode  # noqa: E402

UNITS = ("z-score", "tissue IQR", "healthy SD")


def contrasts(image: np.ndarray, lesion: np.ndarray) -> tuple[float, ...]:
    interior = erode(image != 0)
    healthy, sick = image[interior & ~lesion], image[interior & lesion]
    step = float(np.median(sick) - np.median(healthy))
    q25, q75 = np.percentile(image[interior], [25, 75])
    return float(lesion[interior].mean()), step, step / float(q75 - q25), step / float(healthy.std())


def main() -> None:
    cache = open_cache(sys.argv[1])
    rows = []
    for name in cache.names:
        image = cache.normalized(np.asarray(cache.image(name)))[0]
        rows.append(contrasts(image, np.asarray(cache.seg(name)) > 0))
        print(name, " ".join(f"{v:.3f}" for v in rows[-1]))
    table = np.array(rows)
    for k, unit in enumerate(UNITS, start=1):
        x = table[:, k]
        print(
            f"{unit}: CV {x.std() / x.mean():.2f}, correlation with lesion fraction {np.corrcoef(table[:, 0], x)[0, 1]:.2f}"
        )


if __name__ == "__main__":
    main()
