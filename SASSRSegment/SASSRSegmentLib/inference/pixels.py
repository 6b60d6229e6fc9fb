"""What an input's pixels are read as, for a model: the channels it takes (grey + alpha, grey stored as
RGB, a tint, burned-in annotations), values in the range an 8-bit model was trained on, and no-data
(NaN) voxels as the background."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import SimpleITK as sitk

from ..runtime.errors import UserError

# Digital black, give or take compression: a frame around a scan, or a pixel no annotation is on.
CONTENT_LEVEL = 2
# Coloured pixels on a greyscale scan up to this share of its non-black ones are annotations (calipers,
# text, markers) that exports burn in; more is a colour image (a Doppler overlay, a photograph). A pixel
# is coloured where its channels differ by more than CHROMA of 255: less is what JPEG's chroma
# subsampling leaves around a coloured mark (two callipers on 1.0 % of a BUSI image smear to 7.8 %
# of it at any difference, 3.3 % at 32, 2.0 % at 64; a Doppler overlay keeps 11.6 % at 64).
ANNOTATION_SHARE = 0.05
CHROMA = 48
# How far above 255 (or past 0..1) an 8-bit image's values may lie and still be read as that range: the
# ringing of a resampling (BUSI images made 2x coarser: Lanczos up to 281, k-space truncation 294),
# with room to spare. Below 0, ringing reaches -97 (k-space): down to -255 is taken as 8-bit units.
EIGHT_BIT_SLACK = 64.0
UNIT_SLACK = 0.25
# A float image whose values span less than this is not in 8-bit units (BUSI images span 207-255 of
# them; standardised to zero mean and unit deviation, under 10) and is mapped onto 0..255.
EIGHT_BIT_SPAN = 64.0
# Ringing leaves at most 3.9 % of a BUSI image below 0 (k-space truncation, 0.4 % on average); 8-bit
# values centred on zero (value - 127.5, value - mean: 0.57 and 0.73 read as they are, against 0.77)
# leave a third or more there. A 5th percentile this far below 0 is the second.
CENTRED_BELOW = -16.0


def match_channels(image: sitk.Image, card: dict, warn: Callable[[str], None]) -> sitk.Image:
    in_channels = int(card["network"].get("in_channels", 1))
    components = image.GetNumberOfComponentsPerPixel()
    if components == in_channels:
        return image
    eight_bit = card["preprocessing"]["normalization"].get("kind") == "uint8"
    if in_channels == 1 and components == 2 and eight_bit:
        # Grey + transparency (a PNG's LA mode, which Slicer reads as two components); of an MRI, two
        # components would be two contrasts, and which one the model wants is not ours to guess.
        warn("the image has 2 components per pixel, read as grey and transparency: the grey one is segmented")
        return sitk.VectorIndexSelectionCast(image, 0)
    volume = image.GetDimension() == 3 and 1 not in image.GetSize()
    if in_channels == 1 and components in (3, 4) and not eight_bit and volume:
        # A scan's model takes the scan's own values: a volume of colour pixels is a stack of screenshots
        # or frames, which its brightness would have been segmented as. (A 2D picture of grey stored as RGB
        # goes on, as a user's 2D model of another kind was trained on its grey.)
        raise UserError(
            f"the input is a volume of {components} channels per voxel (colour: screenshots or frames "
            f"stacked?) but the model takes one channel, the scan's own values "
            f"({card['preprocessing']['normalization'].get('kind', '?').upper()}); give the scan itself"
        )
    if in_channels == 1 and components in (3, 4):
        # Greyscale saved as RGB(A) is common for ultrasound screenshots: R = G = B gives its first
        # channel; nearly so (JPEG) or with a few coloured marks, its luminance.
        rgb = sitk.GetArrayViewFromImage(image)[..., :3]
        brightest = rgb.max(axis=-1)
        spread = brightest.astype(np.float32) - rgb.min(axis=-1)
        if not spread.any():
            return sitk.VectorIndexSelectionCast(image, 0)
        unit = (
            np.iinfo(rgb.dtype).max / 255.0
            if rgb.dtype.kind in "ui"
            else max(float(brightest.max()), 1.0) / 255
        )
        shown = brightest > CONTENT_LEVEL * unit  # a black frame does not count
        lit = max(1, int(np.count_nonzero(shown)))
        share = float(np.count_nonzero(spread > CHROMA * unit)) / lit
        if _tinted(rgb[shown]):
            warn(
                "the image is tinted (its colour channels follow one grey, as an ultrasound chroma map "
                "does): it is read as its brightness (luminance)"
            )
            return luminance(image)
        if share > ANNOTATION_SHARE:
            raise UserError(
                f"the input is a colour image ({components} components, {100 * share:.1f} % of its non-black "
                f"pixels coloured: over the {100 * ANNOTATION_SHARE:.0f} % burned-in annotations take) but the model "
                "takes greyscale; convert it to greyscale first"
            )
        if share > 0:
            warn(
                f"{100 * share:.1f} % of the image's non-black pixels are coloured (annotations?): it is read as "
                "its brightness (luminance)"
            )
        return luminance(image)
    raise UserError(
        f"the input has {components} component(s) per voxel but the model takes {in_channels} channel(s); "
        "choose a matching model with --model"
    )


LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601: R, G, B weights of brightness
# Channels this correlated, pixel by pixel, are one grey shown in a tint (sepia, a scanner's chroma
# map: a BUSI image in sepia was refused as colour). Colour flow over a B-mode image breaks it.
TINT_CORRELATION = 0.98
# ... with gains (each channel's slope against their mean) this far apart: sepia's span 0.28.
TINT_GAIN = 0.05


def _tinted(rgb: np.ndarray) -> bool:
    """Whether RGB pixels (..., 3) are one grey in a tint: every pair of their channels correlated, once
    the ANNOTATION_SHARE of pixels furthest off the tint (marks burned in over it) is left out, and
    their gains differing by more than TINT_GAIN (a grey stored as RGB, JPEG's noise and all, is not
    tinted)."""
    pixels = rgb.reshape(-1, 3).astype(np.float32)
    if len(pixels) < 2:
        return False
    grey = np.stack([pixels.mean(axis=1), np.ones(len(pixels), np.float32)], axis=1)
    fit, *_ = np.linalg.lstsq(grey, pixels, rcond=None)
    off = np.abs(pixels - grey @ fit).max(axis=1)
    kept = off <= np.quantile(off, 1.0 - ANNOTATION_SHARE)
    channels = pixels[kept].T
    if np.any(channels.std(axis=1) == 0) or np.corrcoef(channels).min() < TINT_CORRELATION:
        return False
    gains, *_ = np.linalg.lstsq(grey[kept], pixels[kept], rcond=None)
    return bool(np.ptp(gains[0]) > TINT_GAIN)


def luminance(image: sitk.Image) -> sitk.Image:
    """An RGB(A) image's luma (`LUMA`), in its 8 bits where it has them: what a greyscale export would
    store."""
    rgb = sitk.GetArrayViewFromImage(image)[..., :3]
    luma = rgb.astype(np.float32) @ LUMA
    if rgb.dtype == np.uint8:
        luma = np.clip(np.rint(luma), 0, 255).astype(np.uint8)
    out = sitk.GetImageFromArray(luma)
    out.CopyInformation(image)
    return out


def no_data_as_lowest(image: sitk.Image, warn: Callable[[str], None]) -> sitk.Image:
    """NaN voxels (no data: some tools fill what lies outside a mask or a field of view with it) as each
    channel's lowest value, the background of a scan, with a warning; infinite ones are refused."""
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind != "f" or np.isfinite(array).all():
        return image
    infinite = int(np.count_nonzero(np.isinf(array)))
    if infinite:
        raise UserError(f"the input has {infinite} infinite voxel(s); replace them before segmenting")
    missing = np.isnan(array)
    vector = image.GetNumberOfComponentsPerPixel() > 1
    channels = array.shape[-1] if vector else 1
    count = int(np.count_nonzero(missing.any(axis=-1) if vector else missing))
    voxels = array.size // channels
    if missing.reshape(-1, channels).all(axis=0).any():
        raise UserError("every voxel of the input is NaN (in a channel, or in all): it holds no image")
    lowest = np.nanmin(array.reshape(-1, channels), axis=0)
    filled = np.where(missing, lowest if vector else lowest[0], array)
    warn(
        f"{count} voxel(s) ({100 * count / voxels:.1f} %) are NaN (no data): read as the image's lowest "
        f"value ({', '.join(f'{v:g}' for v in lowest)})"
    )
    out = sitk.GetImageFromArray(filled.astype(array.dtype, copy=False), isVector=vector)
    out.CopyInformation(image)
    return out


def in_8_bit_range(image: sitk.Image, warn: Callable[[str], None]) -> sitk.Image:
    """An image for a model of 8-bit images with its values where the model's training images had them,
    0..255. Before, every type was read as 0..255 and the masks were silently worse (BUSI validation:
    0.748 at 16 bits, 0.655 at 0..1, 0.584 standardised, against 0.769). Now, with a warning:
    - 8-bit values stored in another type, give or take a resampling's ringing, stay as they are;
    - 0..1 floats are multiplied by 255;
    - non-negative integers wider than 8 bits are scaled by their bit depth, 12 or 16 (a 16-bit PNG's
      value / 257);
    - anything else, floats spanning too little to be 8-bit values (standardised ones) and values
      centred on zero, is mapped from 0 (or its minimum, when negative) to its maximum."""
    if image.GetPixelID() == sitk.sitkUInt8 or image.GetNumberOfComponentsPerPixel() != 1:
        return image
    array = sitk.GetArrayViewFromImage(image)
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return image  # constant: `prepare_input` says so and gives an empty mask
    floating = array.dtype.kind == "f"
    unit = floating and low >= -UNIT_SLACK and high <= 1 + UNIT_SLACK
    narrow = floating and high - low < EIGHT_BIT_SPAN  # standardised, not 8-bit values
    centred = low < CENTRED_BELOW and float(np.percentile(array, 5)) < CENTRED_BELOW
    if not unit and not narrow and not centred and low >= -255 and high <= 255 + EIGHT_BIT_SLACK:
        return image
    if unit:
        floor, top, how = 0.0, 1.0, "multiplied by 255"
    elif not floating and low >= 0:
        # The common depths (12-bit DICOM, 16-bit PNG), so that a dark image stays dark; its maximum
        # alone would brighten it.
        bits = 12 if high < 2**12 else 16 if high < 2**16 else math.ceil(math.log2(high + 1))
        floor, top = 0.0, float(2**bits - 1)
        how = f"read as {bits}-bit values (divided by {top / 255:.6g})"
    else:
        floor, top = min(low, 0.0), high
        how = f"mapped from {floor:.6g}..{high:.6g} to 0..255"
    warn(f"the model takes 8-bit images (0..255); this image's values ({low:.6g}..{high:.6g}) are {how}")
    factor = np.float32(255.0 / (top - floor))
    out = sitk.GetImageFromArray((array.astype(np.float32) - np.float32(floor)) * factor)
    out.CopyInformation(image)
    return out
