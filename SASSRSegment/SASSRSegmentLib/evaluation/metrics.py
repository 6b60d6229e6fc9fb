"""Segmentation scores: overlap, surface distance, per-lesion detection and lesion-size strata.

Empty masks: when both prediction and reference are empty the case is perfect (Dice = IoU = precision =
recall = 1, HD95 = 0). When only one is empty, Dice = IoU = 0 and whatever divides by zero (HD95,
precision when nothing was predicted, recall when nothing was there) is NaN; means skip NaNs and the
summary counts them under `undefined`.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from ..inference.lesions import connected_lesions

# Size strata of a reference lesion. 3D: volume in millilitres; 2D: area as a fraction of the image.
STRATA_3D = {"small": (0.0, 1.0), "medium": (1.0, 10.0), "large": (10.0, math.inf)}
STRATA_2D = {"small": (0.0, 0.01), "medium": (0.01, 0.10), "large": (0.10, math.inf)}
STRATA_NOTE_3D = "reference lesion volume: small < 1 mL, medium 1-10 mL, large > 10 mL"
STRATA_NOTE_2D = "reference lesion area / image area: small < 1%, medium 1-10%, large > 10%"
CASE_METRICS = (
    "dice",
    "iou",
    "hd95_mm",
    "precision",
    "recall",
    "lesion_sensitivity",
    "false_positive_lesions",
)


def _as_bool(mask: sitk.Image | np.ndarray) -> np.ndarray:
    array = sitk.GetArrayViewFromImage(mask) if isinstance(mask, sitk.Image) else np.asarray(mask)
    return array > 0


def overlap(pred: sitk.Image | np.ndarray, ref: sitk.Image | np.ndarray) -> dict[str, float]:
    """Dice, IoU, precision and recall of two binary masks of the same shape."""
    p, r = _as_bool(pred), _as_bool(ref)
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {p.shape} differs from reference shape {r.shape}")
    tp = float(np.count_nonzero(p & r))
    n_p, n_r = float(np.count_nonzero(p)), float(np.count_nonzero(r))
    if n_p == 0 and n_r == 0:
        return {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}
    return {
        "dice": 2 * tp / (n_p + n_r),
        "iou": tp / (n_p + n_r - tp),
        "precision": tp / n_p if n_p else math.nan,
        "recall": tp / n_r if n_r else math.nan,
    }


def _surface_distances(source: sitk.Image, target: sitk.Image, fully_connected: bool) -> np.ndarray:
    """Distances (mm) from each border voxel centre of `source` to the nearest border voxel centre of `target`."""
    target_border = sitk.LabelContour(target, fully_connected)
    # The distance map of the border itself: 0 on it, the Euclidean distance (in mm) elsewhere.
    distance = sitk.Abs(
        sitk.SignedMaurerDistanceMap(
            target_border, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
        )
    )
    # A copy, not a view: a view of a temporary image would outlive the image's buffer.
    source_border = sitk.GetArrayFromImage(sitk.LabelContour(source, fully_connected)) > 0
    return sitk.GetArrayViewFromImage(distance)[source_border].astype(np.float64)


def hd95(pred: sitk.Image, ref: sitk.Image, fully_connected: bool = True) -> float:
    """95th-percentile symmetric Hausdorff distance in mm between the masks' borders.

    The larger of the two directed 95th percentiles (as MONAI computes it). 0 when both masks are
    empty, NaN when exactly one is.
    """
    p = sitk.Cast(pred > 0, sitk.sitkUInt8)
    r = sitk.Cast(ref > 0, sitk.sitkUInt8)
    if p.GetSize() != r.GetSize():
        raise ValueError(f"prediction size {p.GetSize()} differs from reference size {r.GetSize()}")
    r.CopyInformation(p)  # the same grid up to rounding; distances use the prediction's spacing
    empty_p = not np.any(sitk.GetArrayViewFromImage(p))
    empty_r = not np.any(sitk.GetArrayViewFromImage(r))
    if empty_p and empty_r:
        return 0.0
    if empty_p or empty_r:
        return math.nan
    forward = _surface_distances(p, r, fully_connected)
    backward = _surface_distances(r, p, fully_connected)
    return float(max(np.percentile(forward, 95), np.percentile(backward, 95)))


def _stratum(value: float, strata: dict[str, tuple[float, float]]) -> str:
    for name, (lo, hi) in strata.items():
        if lo <= value < hi:
            return name
    raise ValueError(f"value {value} fits no stratum")


def lesion_detection(pred: sitk.Image, ref: sitk.Image, fully_connected: bool = True) -> dict:
    """Per-lesion detection: a reference lesion is detected when any predicted voxel overlaps it.

    Returns `lesions` (one dict per reference lesion: size, stratum, detected, lesion Dice against the
    predicted components touching it), `lesion_sensitivity` (NaN without reference lesions) and
    `false_positive_lesions` (predicted components touching no reference voxel).
    """
    d = ref.GetDimension()
    ref_labels = sitk.GetArrayFromImage(connected_lesions(ref, fully_connected))
    pred_labels = sitk.GetArrayFromImage(connected_lesions(pred, fully_connected))
    if ref_labels.shape != pred_labels.shape:
        raise ValueError(
            f"prediction shape {pred_labels.shape} differs from reference shape {ref_labels.shape}"
        )
    voxel = float(np.prod(ref.GetSpacing()))
    n_pred = int(pred_labels.max())
    lesions = []
    for k in range(1, int(ref_labels.max()) + 1):
        region = ref_labels == k
        n = int(np.count_nonzero(region))
        touching = np.unique(pred_labels[region])
        touching = touching[touching > 0]
        matched = np.isin(pred_labels, touching)
        tp = int(np.count_nonzero(matched & region))
        if d == 3:
            size = {"volume_ml": n * voxel / 1000.0}
            stratum = _stratum(size["volume_ml"], STRATA_3D)
        else:
            size = {"area_fraction": n / ref_labels.size}
            stratum = _stratum(size["area_fraction"], STRATA_2D)
        lesions.append(
            {
                "id": k,
                "voxels": n,
                **size,
                "stratum": stratum,
                "detected": bool(touching.size),
                "dice": 2 * tp / (n + int(np.count_nonzero(matched))),
            }
        )
    false_positives = int(np.setdiff1d(np.arange(1, n_pred + 1), np.unique(pred_labels[ref_labels > 0])).size)
    sensitivity = sum(les["detected"] for les in lesions) / len(lesions) if lesions else math.nan
    return {"lesions": lesions, "lesion_sensitivity": sensitivity, "false_positive_lesions": false_positives}


def score_case(pred: sitk.Image, ref: sitk.Image, fully_connected: bool = True) -> dict:
    """All case-level scores of one prediction against its reference (same grid)."""
    scores = overlap(pred, ref)
    scores["hd95_mm"] = hd95(pred, ref, fully_connected)
    scores.update(lesion_detection(pred, ref, fully_connected))
    return scores


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def summarise(cases: dict[str, dict], spatial_dims: int) -> dict:
    """Means over cases (NaNs skipped and counted) and per-stratum lesion detection and Dice."""
    mean, undefined = {}, {}
    for key in CASE_METRICS:
        values = [float(c[key]) for c in cases.values()]
        mean[key] = _nanmean(values)
        undefined[key] = sum(math.isnan(v) for v in values)
    strata_def = STRATA_3D if spatial_dims == 3 else STRATA_2D
    strata = {}
    for name in strata_def:
        lesions = [les for c in cases.values() for les in c["lesions"] if les["stratum"] == name]
        detected = sum(les["detected"] for les in lesions)
        strata[name] = {
            "lesions": len(lesions),
            "detected": detected,
            "sensitivity": detected / len(lesions) if lesions else math.nan,
            "mean_lesion_dice": _nanmean([les["dice"] for les in lesions]),
        }
    return {
        "cases": len(cases),
        "mean": mean,
        "undefined": undefined,
        "strata": strata,
        "strata_definition": STRATA_NOTE_3D if spatial_dims == 3 else STRATA_NOTE_2D,
    }
