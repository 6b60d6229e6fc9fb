"""A constant frame around a scan (padding) is read as the scan's background, and only such a frame."""

import numpy as np
import SimpleITK as sitk

from SASSRSegmentLib.inference.padding import padding_as_background


def _scan(background: float, noise: float = 0.0) -> sitk.Image:
    """A 'head' (a bright ball) in a 24^3 box whose surroundings hold `background`."""
    z, y, x = np.indices((24, 24, 24))
    ball = (z - 12) ** 2 + (y - 12) ** 2 + (x - 12) ** 2 < 8**2
    array = np.where(ball, 2.0 + np.sin(x / 3.0), background).astype(np.float32)
    array += np.random.default_rng(0).normal(0, noise, array.shape).astype(np.float32) if noise else 0
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 2.0, 2.0))
    image.SetOrigin((-5.0, 3.0, 7.0))
    return image


def test_a_frame_unlike_the_background_becomes_it():
    scan = _scan(-3.5)
    padded = sitk.ConstantPad(scan, [3, 0, 5], [2, 4, 0], 0.0)
    heard = []
    out = padding_as_background(padded, heard.append)
    array = sitk.GetArrayFromImage(out)
    inner = array[5:29, 0:24, 3:27]
    np.testing.assert_array_equal(inner, sitk.GetArrayFromImage(scan))  # the scan itself is untouched
    frame = np.ones(array.shape, bool)
    frame[5:29, 0:24, 3:27] = False
    assert np.all(array[frame] == np.float32(-3.5))
    assert out.GetOrigin() == padded.GetOrigin() and out.GetSpacing() == padded.GetSpacing()
    assert len(heard) == 1 and f"a frame of {frame.sum()} voxel(s) of constant value 0" in heard[0]


def test_padding_along_one_axis_is_a_frame_too():
    # Slabs of 0 above and below only fill under half the border: they had been read as tissue.
    scan = _scan(-3.5)
    padded = sitk.ConstantPad(scan, [0, 0, 6], [0, 0, 6], 0.0)
    array = sitk.GetArrayFromImage(padding_as_background(padded, lambda m: None))
    assert np.all(array[:6] == np.float32(-3.5)) and np.all(array[-6:] == np.float32(-3.5))
    np.testing.assert_array_equal(array[6:-6], sitk.GetArrayFromImage(scan))


def test_a_frame_darker_than_a_noisy_background_becomes_it():
    # Zero padding below a scan's noise floor: the normaliser's background would be the frame's 0 and
    # the noise, 0.5 up a 0..3 range, would count as tissue.
    padded = sitk.ConstantPad(_scan(0.5, noise=0.05), [4] * 3, [4] * 3, 0.0)
    out = sitk.GetArrayFromImage(padding_as_background(padded, lambda m: None))
    assert abs(float(out[0, 0, 0]) - 0.5) < 0.02 and np.all(out[:4] == out[0, 0, 0])


def test_no_frame_or_a_frame_that_is_the_background_changes_nothing():
    heard = []
    for image in (
        _scan(-3.5),  # a constant background touching the ball's box: the scan's own
        sitk.ConstantPad(_scan(0.0), [4] * 3, [4] * 3, 0.0),  # padded with its own background
        sitk.ConstantPad(_scan(0.0, noise=0.05), [4] * 3, [4] * 3, 0.0),  # a noisy one, nearly
        _scan(0.3, noise=0.05),  # noise: no value fills the border
        # A patch inside the body padded to size: the frame is its only background.
        sitk.ConstantPad(sitk.RegionOfInterest(_scan(-3.5), [8, 8, 8], [8, 8, 8]), [4] * 3, [4] * 3, 0.0),
    ):
        assert padding_as_background(image, heard.append) is image
    assert heard == []
