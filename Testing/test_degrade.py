"""Random LR synthesis (degrade.py): each operator's geometry, the noise models, and the sampler's use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_data import make_dataset
from test_preprocess import prep3d

from SASSRSegmentLib.data import cache as preprocess
from SASSRSegmentLib.data import degrade, normalization, sampling
from SASSRSegmentLib.data.datasets import open_dataset
from SASSRSegmentLib.data.degrade import Degradation
from SASSRSegmentLib.data.sampling import Augmentation, PatchSampler, batches, lr_from_hr

N_LR = 20


def operators(scale: int) -> dict[str, np.ndarray]:
    sigma = np.sqrt(scale**2 - 1) / degrade.FWHM
    return {
        "block": degrade.block_matrix(N_LR, scale),
        "gaussian-linear": degrade.gaussian_interpolation_matrix(N_LR, scale, 1.6 * sigma, cubic=False),
        "gaussian-cubic": degrade.gaussian_interpolation_matrix(N_LR, scale, 0.3 * sigma, cubic=True),
        "cubic, no anti-aliasing": degrade.gaussian_interpolation_matrix(N_LR, scale, 0.0, cubic=True),
        "thick box": degrade.thick_slice_matrix(N_LR, scale, 2.5 * scale, 1.3, "box"),
        "thick gaussian": degrade.thick_slice_matrix(N_LR, scale, 1.7 * scale, 0.4, "gaussian"),
        "thick box with gaps": degrade.thick_slice_matrix(N_LR, scale, 2.5 * scale, 1.3, "box", 3.2 * scale),
    }


@pytest.mark.parametrize("scale", [2, 4])
def test_every_resampling_operator_reproduces_a_ramp_at_the_lr_centres(scale):
    """No operator shifts the image against the block-centred LR grid (the HR mask's frame)."""
    ramp = np.arange(N_LR * scale, dtype=float)
    centres = degrade.lr_centres(N_LR, scale)
    for name, matrix in operators(scale).items():
        assert matrix.shape == (N_LR, N_LR * scale)
        np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12, err_msg=name)
        if name.startswith("thick"):
            # Beyond the outermost slice centroids resampling repeats the last slice, as on a real scan.
            inner = (matrix[:, 0] == 0) & (matrix[:, -1] == 0)
            assert inner.sum() >= N_LR // 2, name
        else:
            inner = np.ones(N_LR, bool)
        np.testing.assert_allclose((matrix @ ramp)[inner], centres[inner], atol=1e-9, err_msg=name)


def test_block_operator_is_lr_from_hr():
    rng = np.random.default_rng(0)
    for shape in [(2, 8, 12, 6), (1, 10, 14)]:
        hr = rng.normal(size=shape).astype(np.float32)
        matrices = [degrade.block_matrix(n // 2, 2).astype(np.float32) for n in shape[1:]]
        expected = lr_from_hr(torch.from_numpy(hr)[None], 2)[0].numpy()
        np.testing.assert_allclose(degrade.apply_separable(hr, matrices), expected, atol=1e-6)


def test_anti_aliasing_blurs_more_with_sigma_and_cubic_interpolates():
    impulse = np.zeros(40)
    impulse[20] = 1.0
    light = degrade.gaussian_interpolation_matrix(20, 2, 0.3, cubic=False) @ impulse
    heavy = degrade.gaussian_interpolation_matrix(20, 2, 1.2, cubic=False) @ impulse
    assert heavy.max() < light.max() and np.count_nonzero(heavy > 1e-3) > np.count_nonzero(light > 1e-3)
    # Cubic interpolation of unsmoothed data overshoots (negative lobes), linear never does.
    cubic = degrade.gaussian_interpolation_matrix(20, 2, 0.0, cubic=True)
    assert cubic.min() < 0 and degrade.gaussian_interpolation_matrix(20, 2, 0.0, cubic=False).min() >= 0


@pytest.mark.parametrize("phase", [0, 1])
def test_decimation_samples_one_voxel_per_block(phase):
    matrix = degrade.decimation_matrix(N_LR, 2, phase)
    ramp = np.arange(2 * N_LR, dtype=float)
    # The only operator off the block centres: by phase - 0.5 HR voxels, as a decimated scan is.
    np.testing.assert_array_equal(matrix @ ramp, degrade.lr_centres(N_LR, 2) + phase - 0.5)
    assert np.all(np.count_nonzero(matrix, axis=1) == 1)


def test_kspace_truncation_keeps_the_lr_band_only():
    n_lr, scale = 16, 2
    n = n_lr * scale
    matrix = degrade.kspace_matrix(n_lr, scale)
    i = np.arange(n)
    centres = degrade.lr_centres(n_lr, scale)
    for k in (0, 3, n_lr - 1):  # in the band: sampled exactly at the LR centres
        wave = np.cos(np.pi * k * (i + 0.5) / n)
        np.testing.assert_allclose(matrix @ wave, np.cos(np.pi * k * (centres + 0.5) / n), atol=1e-9)
    for k in (n_lr, n_lr + 5, n - 1):  # above it: gone (no aliasing into the band)
        np.testing.assert_allclose(matrix @ np.cos(np.pi * k * (i + 0.5) / n), 0.0, atol=1e-9)
    # An edge rings (Gibbs), above 1 and below 0, where a block average would give 0 | 1/2 | 1 steps;
    # a Tukey taper of the band (apodisation) blurs it over more LR voxels.
    step = (i >= n // 2).astype(float)
    hard = matrix @ step
    tapered = degrade.kspace_matrix(n_lr, scale, taper=0.5) @ step
    assert hard.max() > 1.005 and hard.min() < -1e-3
    below = n_lr // 2 - 1  # the last LR voxel before the edge
    assert 0 < hard[below] < tapered[below] < 0.5


def test_thick_slices_average_over_their_thickness():
    line = np.zeros(60)
    line[31] = 1.0  # a one-voxel bright structure across the slice direction
    for thickness in (3.0, 6.0):  # HR voxels
        lr = degrade.thick_slice_matrix(30, 2, thickness, 0.5, "box") @ line
        # A partial volume of its slice: diluted by the thickness and spread over the LR voxels the
        # slice covers, where a block average keeps 1/2 in one LR voxel.
        assert lr.max() <= 1.0 / thickness + 1e-9
        assert np.count_nonzero(lr > 1e-9) >= thickness / 2


def test_slices_with_gaps_never_see_what_lies_between_them():
    """5 mm slices every 6.5 mm (a clinical 2D FLAIR, 1 mm HR voxels): a structure wholly in a gap is
    missing from the LR image, however the slices are then interpolated."""
    matrix = degrade.thick_slice_matrix(30, 2, 5.0, 2.5, "box", spacing=6.5)
    seen = matrix.sum(axis=0) > 0
    # Slabs [k * 6.5, k * 6.5 + 5]; HR voxel i covers [i - 0.5, i + 0.5]: voxels 6, 12, 19, 25 lie in gaps.
    assert not seen[[6, 12, 19, 25]].any() and seen[[5, 7, 13, 18, 20, 24]].all()
    without = degrade.thick_slice_matrix(30, 2, 5.0, 2.5, "box")
    assert (without.sum(axis=0)[2:50] > 0).all()  # slices spaced by their thickness see everything


def test_gaps_are_drawn_only_where_asked_and_leave_the_other_draws_as_they_were():
    shape, thick = (40, 40, 40), {"p_thick": 1.0, "thickness_mm": (5.0, 5.0)}
    plain = Degradation(**thick).operators(shape, np.random.default_rng(7), 2)
    (slices,) = [op for op in plain if op.kind == "thick"]
    assert slices.spacing == slices.thickness == 5.0
    gapped = Degradation(**thick, slice_gap=(1.3, 1.3)).operators(shape, np.random.default_rng(7), 2)
    (slices,) = [op for op in gapped if op.kind == "thick"]
    assert slices.spacing == pytest.approx(6.5) and 0 <= slices.phase < 6.5


def far_from(tissue_hr: np.ndarray, lr_voxels: int = 4) -> np.ndarray:
    """LR voxels (scale 2) with no HR tissue within `lr_voxels` LR voxels: beyond every operator's
    reach (k-space ringing there is below the tissue level)."""
    reach = 2 * lr_voxels
    near = F.max_pool3d(
        torch.from_numpy(tissue_hr).float()[None, None], 2 * reach + 1, stride=1, padding=reach
    )
    return lr_from_hr(near, 2)[0, 0].numpy() == 0


def tissue_patch(shape=(40, 40, 40)) -> tuple[np.ndarray, np.ndarray]:
    """A z-scored 'head': a smooth pattern inside a ball, exactly 0 outside (as the cache stores it)."""
    grid = np.indices(shape).astype(float)
    centre = (np.asarray(shape, float)[:, None, None, None] - 1) / 2
    tissue = ((grid - centre) ** 2).sum(axis=0) <= (min(shape) * 0.3) ** 2
    image = np.sin(grid[0] / 3) + 0.5 * np.cos(grid[-1] / 4)
    return np.where(tissue, image, 0.0)[None].astype(np.float32), tissue


def test_mri_degradation_keeps_the_background_zero_and_adds_bounded_noise(monkeypatch):
    hr, tissue = tissue_patch()
    deg = Degradation(kind="mri", p_bias=0.0, p_quantise=0.0)
    block = [degrade.block_matrix(20, 2).astype(np.float32)] * 3
    clean = degrade.apply_separable(hr, block)[0]
    fraction = degrade.apply_separable(tissue[None].astype(np.float32), block)[0]
    interior = fraction == 1
    background = far_from(tissue)
    assert background.sum() > 100
    rng = np.random.default_rng(3)
    for _ in range(10):
        lr = deg.apply(hr, 2, rng, tissue)
        assert lr.shape == (1, 20, 20, 20) and lr.dtype == np.float32
        # The normaliser's background: exactly 0 (no noise, no spilled blur or ringing).
        np.testing.assert_array_equal(lr[0][background], 0.0)
        assert np.all(lr[0][interior] != 0)
    values = clean[interior]
    span = np.percentile(values, 99) - np.percentile(values, 1)
    monkeypatch.setattr(
        Degradation, "operators", lambda self, shape, rng, scale: [degrade.Operator("block")] * 3
    )
    errors = []
    for seed in range(6):  # block averaging only, to see the noise alone
        noisy = deg.apply(hr, 2, np.random.default_rng(seed), tissue)[0][interior]
        errors.append(np.std(noisy - values) / span)
    assert 0.003 < min(errors) and max(errors) < 0.1 and np.ptp(errors) > 0.005


def test_bias_field_is_smooth_and_bounded():
    field = degrade._smooth_field((16, 16, 16), np.random.default_rng(0))
    assert np.abs(field).max() == pytest.approx(1.0) and np.abs(np.diff(field, axis=0)).max() < 0.3


def test_ultrasound_degradation_is_8_bit_and_in_range():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (1, 40, 48)).astype(np.float32) / 255
    deg = Degradation(kind="uint8")
    for _ in range(5):
        lr = deg.apply(hr, 2, rng)
        assert lr.shape == (1, 20, 24) and 0 <= lr.min() and lr.max() <= 1
        np.testing.assert_allclose(lr * 255, np.round(lr * 255), atol=1e-4)


def test_same_seed_same_degradation():
    hr, tissue = tissue_patch((16, 16, 16))
    deg = Degradation()
    a = deg.apply(hr, 2, np.random.default_rng(7), tissue)
    b = deg.apply(hr, 2, np.random.default_rng(7), tissue)
    c = deg.apply(hr, 2, np.random.default_rng(8), tissue)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sampler_makes_the_lr_input_when_degrading(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "ds", {"a": {"shape": (16, 20, 20), "lesions": [((8, 10, 10), 3)]}})
    prep = prep3d(patch_size_lr=[12, 14, 14])
    preprocess.build_cache(open_dataset(root), prep, tmp_path / "cache", 2, workers=1)
    cache = preprocess.open_cache(tmp_path / "cache")
    seen = []
    apply = Degradation.apply
    monkeypatch.setattr(
        Degradation, "apply", lambda self, hr, *a: seen.append((hr.copy(), *a)) or apply(self, hr, *a)
    )
    aug = Augmentation(p_intensity=1.0, p_gamma=0.0)
    sampler = PatchSampler(cache, ["a"], (24, 28, 28), augmentation=aug, degradation=Degradation())
    rng = np.random.default_rng(0)
    for _ in range(4):
        image, seg, lr = sampler.sample(rng)
        assert image.shape == (1, 24, 28, 28) and seg.shape == (24, 28, 28) and lr.shape == (1, 12, 14, 14)
        hr, scale, _, tissue, scan = seen[-1]
        np.testing.assert_array_equal(hr, image)  # the augmented HR patch, the image-SR target
        # The tissue is traced before the intensity shift moves the background (0) to some b:
        # outside it there is one value, b, and inside it never b.
        assert scale == 2 and tissue.any() and not tissue.all()
        (b,) = np.unique(hr[0][~tissue])
        assert b != 0 and not np.any(hr[0][tissue] == b)
        # The whole case, unaugmented, for the normaliser's statistics.
        np.testing.assert_array_equal(scan.stacked[:-1], cache.normalized(np.asarray(cache.image("a"))))
        assert scan.stacked[-1].any() and not scan.stacked[-1].all()
        assert set(np.unique(scan.stacked[-1])) == {0.0, 1.0}
    hr_image, hr_mask, lr_batch = next(batches(sampler, 3, workers=0, seed=0))
    assert hr_image.shape == (3, 1, 24, 28, 28) and hr_mask.shape == (3, 1, 24, 28, 28)
    assert lr_batch.shape == (3, 1, 12, 14, 14) and lr_batch.dtype == torch.float32
    # Without a degradation the sampler leaves the LR input to lr_from_hr, as before.
    plain = PatchSampler(cache, ["a"], (12, 12, 12), augmentation=aug)
    assert len(plain.sample(np.random.default_rng(0))) == 2


def test_fixed_validation_inputs_are_one_setting_of_each_operator():
    shape, spacing = (30, 24, 20), [1.0, 1.0, 1.0]
    fixed = {name: degrade.fixed_matrices(name, shape, 2, spacing) for name in degrade.FIXED_INPUTS}
    for name, matrices in fixed.items():
        assert [m.shape for m in matrices] == [(n // 2, n) for n in shape], name
        for m in matrices:
            np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(fixed["decimate"][1], np.eye(24)[::2])
    sigma = np.sqrt(3) / degrade.FWHM
    np.testing.assert_allclose(
        fixed["gaussian-linear"][0],
        degrade.gaussian_interpolation_matrix(15, 2, sigma, cubic=False),
        atol=1e-6,
    )
    # 5 mm slices along the first axis only: a voxel-thin bright plane is diluted to at most a fifth
    # and spread over the LR voxels between its slice's neighbours; the other axes are block averages.
    thick = fixed["thick-slice-5mm"]
    assert all(np.array_equal(thick[a], degrade.block_matrix(n // 2, 2)) for a, n in [(1, 24), (2, 20)])
    plane = np.zeros(30)
    plane[12] = 1.0
    profile = thick[0] @ plane
    assert 0.15 < profile.max() <= 0.2 + 1e-6 and np.count_nonzero(profile > 1e-6) >= 4
    # At 3 mm HR voxels 5 mm slices are no thicker than an LR voxel: a block average.
    coarse = degrade.fixed_matrices("thick-slice-5mm", shape, 2, [3.0, 1.0, 1.0])
    np.testing.assert_array_equal(coarse[0], degrade.block_matrix(15, 2))


@pytest.mark.parametrize("noise", [0.005, 0.08])
def test_mri_lr_tissue_keeps_the_hr_tissues_spread_after_thick_slices_and_noise(monkeypatch, noise):
    """As the normaliser z-scores a real LR scan by its own statistics: the blur of 6 mm slices does not
    shrink the contrast the network sees, nor does noise inflate it."""
    tissue = np.zeros((48, 48, 48), bool)
    tissue[4:-4, 4:-4, 4:-4] = True  # a box: the voxels beyond every operator's reach are many
    hr = np.where(tissue, np.sin(np.indices(tissue.shape).sum(axis=0) / 4.0), 0.0)[None].astype(np.float32)
    deep = np.zeros_like(tissue)
    deep[14:-14, 14:-14, 14:-14] = True  # 10 HR voxels in: beyond 6 mm slices at any phase
    whole = lr_from_hr(torch.from_numpy(deep)[None, None].float(), 2)[0, 0].numpy() == 1
    reference = hr[0][normalization.erode(tissue)].std()
    make = Degradation(p_thick=1.0, thickness_mm=(6.0, 6.0), noise=(noise, noise), p_bias=0.0, p_quantise=0.0)

    def spread() -> float:
        return float(
            np.mean([make.apply(hr, 2, np.random.default_rng(s), tissue)[0][whole].std() for s in range(6)])
        )

    assert abs(spread() - reference) < 0.1 * reference
    # The same pattern, not inverted or moved: the mean is the HR tissue's and the plain LR one correlates.
    restandardised = make.apply(hr, 2, np.random.default_rng(0), tissue)[0]
    assert abs(restandardised[whole].mean() - hr[0][normalization.erode(tissue)].mean()) < 0.05
    with monkeypatch.context() as patched:
        patched.setattr(degrade, "restandardise", lambda t, *stats: t)
        plain = make.apply(hr, 2, np.random.default_rng(0), tissue)[0]
    assert np.corrcoef(restandardised[whole], plain[whole])[0, 1] > 0.99
    monkeypatch.setattr(degrade, "restandardise", lambda t, *stats: t)
    assert abs(spread() - reference) > 0.1 * reference  # what training saw before


def test_restandardise_trusts_no_spread_of_a_few_voxels_and_bounds_its_gain():
    t = np.linspace(-1, 1, 100).astype(np.float32)
    few = np.zeros(100, bool)
    few[:10] = True
    assert degrade._patch_statistics(t, few, np.ones(50)) is None  # 10 whole voxels of 100: untrusted
    whole = np.ones(100, bool)
    wide = np.random.default_rng(0).normal(0, 10, 500)
    stats = degrade._patch_statistics(t, whole, wide)
    assert degrade.restandardise(t, stats[0], np.sqrt(stats[1]), *stats[2:]).std() == pytest.approx(
        t.std() * degrade.GAIN_RANGE[1], rel=1e-5
    )
    flat = np.zeros(100, np.float32)
    assert degrade.restandardise(flat, 0.0, 0.0, 0.0, 1.0) is flat  # no spread: unchanged


def test_a_patch_gets_its_scans_gain_not_its_own():
    """Block averaging takes more spread from fine texture than from coarse. A patch of coarse texture cut
    from a scan of mostly fine texture: the normaliser, which sees the whole LR scan, raises the contrast
    by the scan's gain, and so must training for that patch."""
    shape = (64, 64, 64)
    tissue = np.zeros(shape, bool)
    tissue[2:-2, 2:-2, 2:-2] = True
    z = np.indices(shape)[0].astype(np.float32)
    fine, coarse = np.sin(z * 1.9), np.sin(z / 6.0)
    scan = np.where(tissue, np.where(z < 44, fine, coarse), 0.0)[None].astype(np.float32)
    patch, patch_tissue = scan[:, 44:, :20, :20], tissue[44:, :20, :20]
    make = Degradation(noise=(1e-9, 1e-9), p_bias=0.0, p_quantise=0.0, p_thick=0.0)
    block = [degrade.Operator("block")] * 3
    make.operators = lambda shape, rng, scale: block
    matrices = [op.matrix(n // 2, 2) for op, n in zip(block, patch.shape[1:])]
    plain = degrade.apply_separable(patch, matrices)[0]
    whole = degrade.apply_separable(patch_tissue[None].astype(np.float32), matrices)[0] >= 0.999
    own = make.apply(patch, 2, np.random.default_rng(0), patch_tissue)[0]
    scanned = make.apply(patch, 2, np.random.default_rng(0), patch_tissue, degrade.Scan.of(scan, tissue))[0]
    ((mean, var, ref_mean, ref_sd),) = degrade.scan_statistics(
        degrade.Scan.of(scan, tissue), [op.matrix(32, 2) for op in block]
    )
    scan_gain = ref_sd / np.sqrt(var)
    assert 1.3 < scan_gain < degrade.GAIN_RANGE[1]  # the fine texture mostly averaged away
    np.testing.assert_allclose(scanned[whole], ref_mean + (plain[whole] - mean) * scan_gain, atol=1e-3)
    # Its own statistics would have given the coarse patch about the contrast it had at HR.
    own_gain = own[whole].std() / plain[whole].std()
    assert own_gain < 1.1 < scan_gain - 0.2
    # A scan with too little tissue to measure leaves the patch to its own statistics.
    assert degrade.Scan.of(scan * 0, np.zeros(shape, bool)) is None
    # A slab 3 HR voxels thick: an interior to measure, but no LR voxel of the rows measured wholly of it.
    slab = np.zeros(shape, bool)
    slab[2:5, 4:-4, 4:-4] = True
    thin = degrade.Scan.of(np.where(slab, scan, 0.0).astype(np.float32), slab)
    assert thin is not None and degrade.scan_statistics(thin, [op.matrix(32, 2) for op in block]) is None
    np.testing.assert_array_equal(make.apply(patch, 2, np.random.default_rng(0), patch_tissue, thin)[0], own)


def test_ct_and_8_bit_degradation_are_not_restandardised(monkeypatch):
    def refuse(*args):
        raise AssertionError("restandardise ran")

    monkeypatch.setattr(degrade, "restandardise", refuse)
    hr, _ = tissue_patch((24, 24, 24))
    for kind in ("ct", "uint8"):
        Degradation(kind=kind).apply(np.clip(hr, 0, 1), 2, np.random.default_rng(0))


def test_a_faded_lesion_keeps_the_asked_share_of_its_contrast_and_nothing_else_moves():
    rng = np.random.default_rng(0)
    shape = (32, 32, 32)
    grid = np.indices(shape)
    tissue = ((grid - 15.5) ** 2).sum(axis=0) <= 14**2
    lesion = np.all((grid >= 10) & (grid < 20), axis=0)
    # Partial volume: the voxels just outside the label are half as bright as the lesion.
    rim = np.all((grid >= 9) & (grid < 21), axis=0) & ~lesion
    healthy = 0.3
    image = np.where(tissue, healthy + 0.05 * rng.standard_normal(shape), -2.0)
    image = np.where(lesion, healthy + 2.0, np.where(rim, healthy + 1.0, image))[None].astype(np.float32)
    before = image.copy()
    faded = sampling.fade_lesion(image, lesion.astype(np.uint8), tissue, 0.25)
    # Inside the lesion: a quarter of its step above the healthy median.
    core = np.all((grid >= 13) & (grid < 17), axis=0)
    np.testing.assert_allclose(faded[0][core], healthy + 0.25 * 2.0, atol=0.02)
    # The rim fades with it: no bright ring is left around a faint lesion.
    assert faded[0][rim].max() <= faded[0][core].mean() + 0.05
    # Background and tissue beyond the fade's reach are untouched; the input is not modified.
    reach = F.max_pool3d(torch.from_numpy(lesion).float()[None, None], 9, stride=1, padding=4)[0, 0].numpy()
    untouched = ~tissue | (reach == 0)
    np.testing.assert_array_equal(faded[0][untouched], image[0][untouched])
    np.testing.assert_array_equal(image, before)
    # Keeping all of it, or a patch without lesion, changes nothing.
    np.testing.assert_allclose(sampling.fade_lesion(image, lesion.astype(np.uint8), tissue, 1.0), image)
    np.testing.assert_array_equal(sampling.fade_lesion(image, np.zeros(shape, np.uint8), tissue, 0.2), image)
    # Nor does a patch with no healthy tissue to measure the contrast against.
    np.testing.assert_array_equal(sampling.fade_lesion(image, lesion.astype(np.uint8), lesion, 0.2), image)


def test_a_2d_two_channel_patch_fades_each_channel_against_its_own_healthy_level():
    grid = np.indices((40, 40))
    tissue = np.ones((40, 40), bool)
    lesion = np.all((grid >= 15) & (grid < 25), axis=0)
    image = np.stack([np.where(lesion, 3.0, 1.0), np.where(lesion, -4.0, -1.0)]).astype(np.float32)
    faded = sampling.fade_lesion(image, lesion.astype(np.uint8), tissue, 0.5)
    assert faded.dtype == np.float32 and faded.shape == image.shape
    np.testing.assert_allclose(faded[:, 20, 20], [2.0, -2.5])
    np.testing.assert_array_equal(faded[:, 0, 0], image[:, 0, 0])


def test_the_sampler_fades_lesions_only_when_asked(tmp_path):
    root = make_dataset(tmp_path / "ds", {"a": {"shape": (16, 20, 20), "lesions": [((8, 10, 10), 4)]}})
    preprocess.build_cache(
        open_dataset(root), prep3d(patch_size_lr=[8, 10, 10]), tmp_path / "cache", 2, workers=1
    )
    cache = preprocess.open_cache(tmp_path / "cache")

    def lesion_step(p_fade: float, degradation: Degradation | None = None) -> tuple[float, list]:
        """(the lesion's median step over the healthy tissue in a sampled patch, the LR input if any)."""
        aug = Augmentation(p_intensity=0.0, p_gamma=0.0, p_lesion_fade=p_fade, lesion_fade=(0.2, 0.2))
        sampler = PatchSampler(
            cache, ["a"], (16, 20, 20), p_fg=1.0, augmentation=aug, degradation=degradation
        )
        image, seg, *lr = sampler.sample(np.random.default_rng(1))
        tissue = image[0] != cache.background("a")[0]
        return float(np.median(image[0][seg > 0]) - np.median(image[0][tissue & (seg == 0)])), lr

    (plain, _), (faded, _) = lesion_step(0.0), lesion_step(1.0)
    assert plain > 0.5 and faded == pytest.approx(0.2 * plain, rel=0.15)
    # With the MRI synthesis the fade takes the tissue traced for it and the patch still gets its LR input.
    mri, lr = lesion_step(1.0, Degradation())
    assert mri == pytest.approx(faded, rel=0.05) and lr[0].shape == (1, 8, 10, 10)
