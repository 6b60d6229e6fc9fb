"""Normalisation: MRI z-score independent of background value and outliers; CT window; 8-bit."""

import numpy as np
import pytest

from SASSRSegmentLib.normalization import choose_normalization, foreground_mask, normalize


def _head(background: float, gain: float, offset: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    vol = np.full((20, 24, 24), background, np.float32)
    vol[4:16, 5:19, 5:19] = offset + gain * rng.normal(0, 1, (12, 14, 14))
    return vol


def test_mri_zscore_is_the_same_for_raw_and_prenormalised_conventions():
    raw = _head(background=0.0, gain=80.0, offset=400.0)
    pre = _head(background=-1.3, gain=1.0, offset=0.0)
    a, b = normalize(raw, {"kind": "mri"}), normalize(pre, {"kind": "mri"})
    fg = foreground_mask(raw)
    assert np.array_equal(fg, foreground_mask(pre))
    assert abs(a[fg].mean()) < 0.05 and abs(a[fg].std() - 1) < 0.05
    assert np.allclose(a, b, atol=1e-3)
    assert np.all(a[~fg] == 0)


def test_mri_outliers_do_not_set_the_scale():
    vol = _head(0.0, 50.0, 300.0)
    spiked = vol.copy()
    spiked[10, 10, 10] = 1e6
    a, b = normalize(vol, {"kind": "mri"}), normalize(spiked, {"kind": "mri"})
    fg = foreground_mask(vol)
    assert np.median(np.abs(a[fg] - b[fg])) < 0.05
    assert b.max() < 10


def test_constant_image_gives_zeros_not_nan():
    out = normalize(np.full((8, 8, 8), 5.0), {"kind": "mri"})
    assert np.all(out == 0)


def test_ct_and_uint8():
    ct = normalize(np.array([-2000.0, -1000.0, 400.0, 3000.0]), {"kind": "ct", "window": [-1000, 400]})
    assert ct.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert normalize(np.array([0, 255], np.uint8), {"kind": "uint8"}).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError):
        normalize(np.zeros(3), {"kind": "pet"})


def test_choose_normalization_from_channel_names():
    assert choose_normalization({"channel_names": {"0": "FLAIR"}}) == {"kind": "mri"}
    assert choose_normalization({"channel_names": {"0": "ultrasound"}}) == {"kind": "uint8"}
    assert choose_normalization({"channel_names": {"0": "CT"}})["kind"] == "ct"
