"""The robustness generators: each makes a real LR image on the corner-aligned LR grid, and each
operator does what its name says on signals whose answer is known."""

import numpy as np
import pytest
import SimpleITK as sitk

from SASSRSegmentLib.data import lowres
from SASSRSegmentLib.io import geometry
from SASSRSegmentLib.io.geometry import Grid


def _image(shape, spacing, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray((rng.uniform(0, 200, shape)).astype(dtype))
    image.SetSpacing(spacing)
    image.SetOrigin([3.0, -2.0, 5.0][: len(spacing)])
    return image


@pytest.mark.parametrize("dims", [2, 3])
def test_every_generator_gives_an_image_on_the_lr_grid(dims):
    shape, spacing = ((20, 24, 22), (1.0, 1.0, 1.0)) if dims == 3 else ((24, 22), (0.5, 0.5))
    hr = _image(shape, spacing)
    lr_grid = geometry.lr_grid(Grid.from_image(hr), 2)
    assert lowres.names_for(2) == [n for n in lowres.GENERATORS if n != "thick-slice-5mm"]
    for name in lowres.names_for(dims):
        lr = lowres.make_lr(name, hr, 2)
        expected = Grid.from_image(hr) if name == "hr" else lr_grid
        assert Grid.from_image(lr) == expected, name
        assert np.isfinite(sitk.GetArrayViewFromImage(lr)).all(), name


def test_block_is_the_training_synthesis():
    hr = _image((20, 24, 22), (1.0, 1.0, 1.0))
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(lowres.make_lr("block", hr, 2)),
        sitk.GetArrayFromImage(geometry.make_lr_image(hr, 2)),
        rtol=1e-6,
    )


def test_kernels_reproduce_a_ramp_at_the_lr_voxel_centres():
    n, n_lr = 40, 20
    ramp = np.arange(n, dtype=float)
    centres = 2 * np.arange(n_lr) + 0.5
    inner = slice(3, n_lr - 3)  # the kernels are truncated (renormalised) near the ends
    for matrix in (
        lowres.block_matrix(n_lr, 2),
        lowres.lanczos_matrix(n_lr, n, 2),
        lowres.thick_slice_matrix(n_lr, n, 2, 5),
    ):
        np.testing.assert_allclose((matrix @ ramp)[inner], centres[inner], atol=1e-9)
        np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-9)


def test_kspace_keeps_what_the_lr_band_holds_and_removes_the_rest():
    n, n_lr = 48, 24
    t = np.arange(n)
    centres = 2 * np.arange(n_lr) + 0.5
    slow = np.cos(2 * np.pi * 3 * t / n)  # well inside the LR band: kept exactly (periodic)
    np.testing.assert_allclose(
        lowres.kspace_matrix(n_lr, n) @ slow, np.cos(2 * np.pi * 3 * centres / n), atol=1e-9
    )
    fast = np.cos(2 * np.pi * 18 * t / n)  # beyond the LR Nyquist limit: gone, not aliased
    assert np.abs(lowres.kspace_matrix(n_lr, n) @ fast).max() < 1e-9


def test_thick_slices_blur_along_the_slice_axis_only():
    hr = np.zeros((40, 8, 8), np.float32)
    hr[20] = 1.0  # one thin bright HR slice
    image = sitk.GetImageFromArray(hr)
    lr = sitk.GetArrayFromImage(lowres.make_lr("thick-slice-5mm", image, 2))
    profile = lr[:, 2, 2]
    assert profile.sum() == pytest.approx(hr[:, 0, 0].sum() / 2, rel=0.05)  # mass kept per LR slice
    assert (profile > 0).sum() >= 4  # spread over about 5 mm + interpolation, not 1 LR slice
    assert np.allclose(lr[:, 0, 0], lr[:, 3, 3])  # in plane: unchanged (a uniform slice)


def test_decimation_picks_voxels_and_uint8_stays_uint8():
    hr = _image((24, 22), (0.5, 0.5), dtype=np.uint8)
    lr = lowres.make_lr("decimate", hr, 2)
    assert lr.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lr), sitk.GetArrayFromImage(hr)[::2, ::2])
    for name in lowres.names_for(2):
        assert lowres.make_lr(name, hr, 2).GetPixelID() == sitk.sitkUInt8, name


def test_rician_noise_is_two_percent_of_the_range():
    hr = np.zeros((40, 40, 40), np.float32)
    hr[:, :, 20:] = 1000.0
    lr = sitk.GetArrayFromImage(lowres.make_lr("rician-2pct", sitk.GetImageFromArray(hr), 2))
    tissue = lr[:, :, 12:]
    assert tissue.std() == pytest.approx(20.0, rel=0.1)
    background = lr[:, :, :8]  # Rayleigh: mean sigma * sqrt(pi / 2)
    assert background.mean() == pytest.approx(20.0 * np.sqrt(np.pi / 2), rel=0.1)
