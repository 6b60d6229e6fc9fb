"""Normalisation: MRI z-score independent of background value, outliers and what real scans carry
(smoothing tails, ringing, noise, rounding); CT window; 8-bit."""

import numpy as np
import pytest

from SASSRSegmentLib.data.normalization import choose_normalization, erode, fit, normalize, tissue_mask
from SASSRSegmentLib.io import geometry


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
    fg = tissue_mask(raw)
    assert np.array_equal(fg, tissue_mask(pre))
    inner = np.zeros_like(fg)
    inner[6:34, 7:41, 7:41] = True
    assert abs(a[inner].mean()) < 0.05 and abs(a[inner].std() - 1) < 0.05
    assert np.allclose(a, b, atol=1e-3)
    assert np.all(a[~fg] == 0)


def test_mri_normalising_before_or_after_block_averaging_agrees():
    """Training normalises HR then block-averages; inference normalises the LR scan it is given."""
    from SASSRSegmentLib.io.geometry import downsample_block

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
    fg = tissue_mask(vol)
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
    # Whole words only: "us" in "mouse" had made a mouse FLAIR 8-bit.
    assert choose_normalization({"channel_names": {"0": "FLAIR (mouse)"}}) == {"kind": "mri"}
    assert choose_normalization({"channel_names": {"0": "US B-mode"}}) == {"kind": "uint8"}
    assert choose_normalization({"channel_names": {"0": "Dermoscopy"}}) == {"kind": "uint8"}
    for name in ("BUSI", "TRUS", "USG", "EUS", "CEUS", "IVUS", "POCUS", "sonography", "Ultrasonic"):
        assert choose_normalization({"channel_names": {"0": name}}) == {"kind": "uint8"}, name


def test_an_roi_normalised_with_the_whole_volume_levels_matches_the_whole_volume():
    vol = _head(0.0, 50.0, 300.0)
    whole = normalize(vol, {"kind": "mri"})
    crop = (slice(10, 30), slice(12, 40), slice(0, 30))  # cuts the head on three faces
    own = normalize(vol[crop], {"kind": "mri"})
    shared = normalize(vol[crop], {"kind": "mri"}, fit(vol))
    # Away from the head's surface, where a crop's rim estimate sees fewer interior neighbours.
    inner = erode(erode(tissue_mask(vol)))[crop]
    assert np.abs(shared - whole[crop])[inner].max() < 1e-5
    assert np.abs(own - whole[crop])[inner].mean() > 0.01  # the crop's own statistics differ


def test_a_crop_inside_the_tissue_is_all_tissue():
    vol = _head(0.0, 50.0, 300.0)
    inside = vol[8:32, 10:38, 10:38]
    assert tissue_mask(inside).all()
    out = normalize(inside, {"kind": "mri"})
    assert abs(out.mean()) < 0.05 and abs(out.std() - 1) < 0.05


# ------------------------------------------------------------------ real scans and what they carry

CASES = ("Brats18_CBICA_ABM_1", "brats_2013_pat0005_1")  # raw scanner units; pre-normalised (BraTS 2015)


def _real_lr(shared_data, case):
    import SimpleITK as sitk

    path = shared_data / "Dataset001_BraTSFLAIR" / "imagesTr" / f"{case}_0000.nii.gz"
    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    return image, sitk.GetArrayFromImage(geometry.make_lr_image(image, 2))


def _dice(a, b):
    return 2 * np.sum(a & b) / (a.sum() + b.sum())


def _variants(image, clean, rng):
    """2 mm versions of one 1 mm scan, each with one thing real scans carry; with the noise added
    (in the image's units) and, for the tails, the same image with the tails set to zero by hand."""
    import SimpleITK as sitk

    background = float(np.median(clean[0]))
    span = float(clean.max()) - background
    sigma = np.sqrt(2.0**2 - 1.0**2) / 2.355
    smooth = sitk.SmoothingRecursiveGaussian(image, [sigma] * 3)
    grid = geometry.lr_grid(geometry.Grid.from_image(geometry.crop_to_multiple(image, 2)), 2)
    tails = sitk.GetArrayFromImage(
        sitk.Resample(
            smooth, grid.reference_image(), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32
        )
    )
    by_hand = np.where(tails - background > 1e-2 * span, tails, background).astype(np.float32)
    hr = sitk.GetArrayFromImage(image)
    lifted = np.where(hr == hr[0, 0, 0], background - 0.5 * span, hr).astype(np.float32)
    lowered = geometry.make_lr_image(geometry.Grid.from_image(image).image_from_array(lifted), 2)
    sd1, sd2 = 0.01 * span, 0.02 * span
    rician = background + np.hypot(
        clean - background + rng.normal(0, sd2, clean.shape), rng.normal(0, sd2, clean.shape)
    )
    scaled = np.round((clean - clean.min() + 1) * 30000 / (span + 1)).astype(np.int16)
    return {
        "smoothing tails and ringing": (tails, 0.0, by_hand),
        "1% Gaussian noise": (clean + rng.normal(0, sd1, clean.shape), sd1, clean),
        "2% Rician noise": (rician, sd2, clean),
        "negative constant background": (sitk.GetArrayFromImage(lowered), 0.0, clean),
        "offset and x1000 in int16": (scaled.astype(np.float32), 0.0, clean),
    }


@pytest.mark.parametrize("case", CASES)
def test_real_scan_variants_keep_the_tissue_and_its_normalised_values(shared_data, case):
    image, clean = _real_lr(shared_data, case)
    rng = np.random.default_rng(0)
    for name, (variant, noise_sd, reference) in _variants(image, clean, rng).items():
        variant = variant.astype(np.float32)
        ref_mask = tissue_mask(reference)
        assert tissue_mask(reference).any() and ref_mask.mean() < 0.6, name
        mask = tissue_mask(variant)
        assert _dice(mask, ref_mask) >= 0.95, (name, _dice(mask, ref_mask))
        levels = fit(reference)
        ref = normalize(reference, {"kind": "mri"})
        out = normalize(variant, {"kind": "mri"})
        inner = erode(erode(ref_mask))
        # The noise itself, in the normalised units, is all that may differ (within 0.05).
        allowed = noise_sd / levels.std * np.sqrt(2 / np.pi) + 0.05
        assert np.median(np.abs(out - ref)[inner]) < allowed, (name, np.median(np.abs(out - ref)[inner]))
        assert np.mean(out[~mask] == 0) == 1.0, name  # noise outside the tissue is gone
