"""Normalisation: MRI z-score independent of background value and outliers; CT window; 8-bit."""

import numpy as np
import pytest

from SASSRSegmentLib.normalization import choose_normalization, foreground_mask, normalize


def _head(background: float, gain: float, offset: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    vol = np.full((40, 48, 48), background, np.float32)
    vol[4:36, 5:43, 5:43] = offset + gain * rng.normal(0, 1, (32, 38, 38))
    return vol


def test_mri_zscore_is_the_same_for_raw_and_prenormalised_conventions():
    # The same head in both conventions: raw scanner units, and pre-normalised (an affine map of the raw
    # one, whose background lands at -5 instead of 0).
    raw = _head(background=0.0, gain=80.0, offset=400.0)
    pre = _head(background=-5.0, gain=1.0, offset=0.0)
    a, b = normalize(raw, {"kind": "mri"}), normalize(pre, {"kind": "mri"})
    fg = foreground_mask(raw)
    assert np.array_equal(fg, foreground_mask(pre))
    inner = np.zeros_like(fg)
    inner[6:34, 7:41, 7:41] = True
    assert abs(a[inner].mean()) < 0.05 and abs(a[inner].std() - 1) < 0.05
    assert np.allclose(a, b, atol=1e-3)
    assert np.all(a[~fg] == 0)


def test_mri_normalising_before_or_after_block_averaging_agrees():
    """Training normalises HR then block-averages; inference normalises the LR scan it is given."""
    from SASSRSegmentLib.geometry import downsample_block

    z, y, x = np.mgrid[:64, :64, :64]
    ball = (z - 31.5) ** 2 + (y - 30.0) ** 2 + (x - 33.0) ** 2 < 25.3**2
    tissue = 300 + 2.0 * x + 40 * ((z // 8) % 2)  # smooth gradient and slabs, no noise
    hr = np.where(ball, tissue, 0.0).astype(np.float32)
    lr = downsample_block(hr, 2)
    trained = downsample_block(normalize(hr, {"kind": "mri"}), 2)
    given = normalize(lr, {"kind": "mri"})
    cover = downsample_block(ball.astype(np.float32), 2)
    rim = (cover > 0) & (cover < 1)
    assert rim.sum() > 100
    assert np.abs(trained - given)[rim].mean() < 0.25
    assert np.abs(trained - given)[lr > 0].mean() < 0.1


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
