"""Overlap, HD95 (against a brute-force reference), empty-mask rules, per-lesion detection and strata."""

import math

import numpy as np
import pytest
import SimpleITK as sitk

from SASSRSegmentLib.evaluation import metrics


def _image(array, spacing=None):
    image = sitk.GetImageFromArray(np.asarray(array, np.uint8))
    if spacing:
        image.SetSpacing(spacing)
    return image


def _border(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with any of the 3^d - 1 neighbours outside (what LabelContour, fully connected, gives)."""
    padded = np.pad(mask, 1)
    interior = np.ones_like(mask)
    for offset in np.ndindex(*(3,) * mask.ndim):
        window = tuple(slice(o, o + n) for o, n in zip(offset, mask.shape))
        interior &= padded[window]
    return mask & ~interior


def _brute_hd95(a: np.ndarray, b: np.ndarray, spacing_xyz) -> float:
    scale = np.asarray(spacing_xyz)[::-1]
    pa, pb = np.argwhere(_border(a)) * scale, np.argwhere(_border(b)) * scale
    d = np.linalg.norm(pa[:, None] - pb[None], axis=-1)
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_overlap_scores_from_counts():
    pred = np.zeros((10, 10), bool)
    ref = np.zeros((10, 10), bool)
    pred[0, :8] = True  # 8 voxels
    ref[0, 4:] = True  # 6 voxels, 4 shared
    ref[1, :6] = True  # +6 -> 12 voxels
    scores = metrics.overlap(pred, ref)
    assert scores["dice"] == pytest.approx(2 * 4 / (8 + 12))
    assert scores["iou"] == pytest.approx(4 / (8 + 12 - 4))
    assert scores["precision"] == pytest.approx(4 / 8)
    assert scores["recall"] == pytest.approx(4 / 12)


def test_empty_mask_rules():
    empty, full = np.zeros((6, 6), bool), np.zeros((6, 6), bool)
    full[2:4, 2:4] = True
    assert metrics.overlap(empty, empty) == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}
    assert metrics.hd95(_image(empty), _image(empty)) == 0.0
    missed = metrics.overlap(empty, full)
    assert missed["dice"] == 0.0 and missed["recall"] == 0.0 and math.isnan(missed["precision"])
    spurious = metrics.overlap(full, empty)
    assert spurious["dice"] == 0.0 and spurious["precision"] == 0.0 and math.isnan(spurious["recall"])
    assert math.isnan(metrics.hd95(_image(full), _image(empty)))
    cases = {
        "a": metrics.score_case(_image(empty), _image(full)),
        "b": metrics.score_case(_image(full), _image(full)),
    }
    summary = metrics.summarise(cases, 2)
    assert summary["undefined"]["hd95_mm"] == 1 and summary["mean"]["hd95_mm"] == 0.0
    assert summary["mean"]["dice"] == pytest.approx(0.5)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 1.3, 2.5)])
def test_hd95_matches_brute_force(spacing):
    rng = np.random.default_rng(3)
    zyx = np.stack(np.meshgrid(*[np.arange(n) for n in (12, 16, 14)], indexing="ij"), -1)
    a = np.linalg.norm((zyx - [6, 8, 7]) * [1.0, 1.0, 1.0], axis=-1) < 5
    b = np.linalg.norm((zyx - [6, 9, 6]) * [1.2, 0.9, 1.0], axis=-1) < 4.5
    b[rng.random(b.shape) < 0.01] = True  # a few outliers: the 95th percentile must not be the maximum
    expected = _brute_hd95(a, b, spacing)
    assert metrics.hd95(_image(a, spacing), _image(b, spacing)) == pytest.approx(expected, rel=1e-5)
    assert metrics.hd95(_image(a, spacing), _image(a, spacing)) == pytest.approx(0.0, abs=1e-5)


def test_lesion_detection_and_strata_3d():
    # 1 mm^3 voxels: volumes in mL are voxels / 1000.
    ref = np.zeros((40, 40, 40), np.uint8)
    pred = np.zeros_like(ref)
    ref[0:5, 0:5, 0:5] = 1  # 125 voxels = 0.125 mL: small, detected
    ref[10:22, 10:22, 10:22] = 1  # 1728 voxels = 1.73 mL: medium, missed
    ref[20:40, 25:40, 25:40] = (
        1  # 4500 voxels = 4.5 mL: medium, detected (shares rows with lesion 2 but not touching)
    )
    pred[2:5, 2:5, 2:5] = 1
    pred[30:35, 30:35, 30:35] = 1
    pred[0:3, 30:33, 0:3] = 1  # touches nothing: a false positive
    result = metrics.lesion_detection(_image(pred), _image(ref))
    by_size = {les["voxels"]: les for les in result["lesions"]}
    assert set(by_size) == {125, 1728, 4500}
    assert by_size[125]["stratum"] == "small" and by_size[125]["detected"]
    assert by_size[125]["dice"] == pytest.approx(2 * 27 / (125 + 27))
    assert (
        by_size[1728]["stratum"] == "medium" and not by_size[1728]["detected"] and by_size[1728]["dice"] == 0
    )
    assert by_size[4500]["volume_ml"] == pytest.approx(4.5)
    assert result["lesion_sensitivity"] == pytest.approx(2 / 3)
    assert result["false_positive_lesions"] == 1
    summary = metrics.summarise({"c": metrics.score_case(_image(pred), _image(ref))}, 3)
    assert summary["strata"]["small"] == {
        "lesions": 1,
        "detected": 1,
        "sensitivity": 1.0,
        "mean_lesion_dice": pytest.approx(54 / 152),
    }
    assert summary["strata"]["medium"]["lesions"] == 2 and summary["strata"]["medium"]["detected"] == 1
    assert summary["strata"]["large"]["lesions"] == 0 and math.isnan(
        summary["strata"]["large"]["sensitivity"]
    )
    assert "1 mL" in summary["strata_definition"] and "10 mL" in summary["strata_definition"]


def test_strata_2d_use_area_fraction():
    ref = np.zeros((100, 100), np.uint8)
    ref[0:5, 0:5] = 1  # 0.25%
    ref[50:60, 50:60] = 1  # 1%: medium (lower bound inclusive)
    ref[10:40, 60:100] = 1  # 12%
    result = metrics.lesion_detection(_image(np.zeros_like(ref)), _image(ref))
    strata = sorted((les["area_fraction"], les["stratum"]) for les in result["lesions"])
    assert strata == [(0.0025, "small"), (0.01, "medium"), (0.12, "large")]
    assert result["lesion_sensitivity"] == 0.0 and result["false_positive_lesions"] == 0
