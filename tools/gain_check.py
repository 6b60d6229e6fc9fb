"""The contrast gain the normaliser applies to a whole degraded scan, beside the gains `degrade.restandardise`
computes on training patches (docs/models.md, "A patch's gain is not the scan's").

    python tools/gain_check.py CASE [CASE ...]     (from the repository root, ../shared/data beside it)

For each case and fixed LR input (block, gaussian-linear, 5 mm slices): the whole-scan gain (the 1 mm scan
degraded and normalised, against the normalised scan degraded the same way: the spread of the tissue
interior) and the median gain of 12 HR patches of 96^3 (two in three centred on a lesion voxel), as
`restandardise` measures it.
"""

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "SASSRSegment"))

from SASSRSegmentLib.data import degrade as D  # noqa: E402
from SASSRSegmentLib.data import normalization as N  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "Dataset001_BraTSFLAIR"
MRI = {"kind": "mri"}
PATCH = 96


def patch_gain(z, tissue, sl, name):
    """restandardise's gain for the HR patch `sl` of the normalised scan `z` (None: too little tissue)."""
    matrices = D.fixed_matrices(name, (PATCH,) * 3, 2, [1.0, 1.0, 1.0])
    hr, hr_tissue = z[sl], tissue[sl]
    lr = D.apply_separable(hr[None], matrices)[0]
    fraction = D.apply_separable(hr_tissue[None].astype(np.float32), matrices)[0].clip(0, 1)
    inside = fraction >= N.TISSUE_LEVEL
    whole = fraction[inside] >= 0.999
    values = lr[inside] / fraction[inside]
    interior = N.erode(hr_tissue)
    if whole.sum() < max(16, 0.25 * values.size) or interior.sum() < 16:
        return None
    return float(hr[interior].std() / values[whole].std())


def main(cases):
    rng = np.random.default_rng(0)
    for case in cases:
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(ROOT / "imagesTr" / f"{case}_0000.nii.gz")))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(ROOT / "labelsTr" / f"{case}.nii.gz"))) > 0
        even = tuple(slice(0, n - n % 2) for n in image.shape)
        image, label = image[even].astype(np.float32), label[even]
        z, tissue = N.normalize_and_trace(image, MRI)
        lesion = np.argwhere(label)
        for name in ("block", "gaussian-linear", "thick-slice-5mm"):
            matrices = D.fixed_matrices(name, z.shape, 2, [1.0, 1.0, 1.0])
            inferred, traced = N.normalize_and_trace(D.apply_separable(image[None], matrices)[0], MRI)
            trained = D.through_operators(z[None], matrices, tissue, restandardised=False)[0]
            interior = N.erode(traced)
            scan = inferred[interior].std() / trained[interior].std()
            gains, centred = [], []
            for k in range(12):
                on_lesion = k % 3 != 0
                centre = (
                    lesion[rng.integers(len(lesion))]
                    if on_lesion
                    else rng.integers(PATCH // 2, np.array(z.shape) - PATCH // 2)
                )
                low = [int(np.clip(c - PATCH // 2, 0, n - PATCH)) for c, n in zip(centre, z.shape)]
                gain = patch_gain(z, tissue, tuple(slice(a, a + PATCH) for a in low), name)
                if gain is not None:
                    gains.append(gain)
                    if on_lesion:
                        centred.append(gain)
            print(
                f"{case:24s} {name:16s} scan {scan:.3f}  patches median {np.median(gains):.3f} "
                f"(lesion-centred {np.median(centred):.3f}), range {min(gains):.3f}-{max(gains):.3f}"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
