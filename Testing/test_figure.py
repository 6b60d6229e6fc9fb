"""The figure: views named from the image's real orientation, patient sides at the edges, a true scale
bar, a legend with the lesion count and volume, the model and threshold, and the research-use stamp."""

import numpy as np
import pytest
import SimpleITK as sitk

from SASSRSegmentLib.inference import figure, lesions
from SASSRSegmentLib.io import geometry
from SASSRSegmentLib.io.geometry import Grid


def test_sides_and_view_names_follow_the_direction_cosines():
    assert [figure.side(v) for v in np.eye(3)] == ["L", "P", "S"]
    assert [figure.side(-v) for v in np.eye(3)] == ["R", "A", "I"]
    assert figure.view_name([0, 0, 1]) == "Axial" and figure.view_name([1, 0, 0]) == "Sagittal"
    assert figure.view_name([0, -1, 0]) == "Coronal"
    tilted = [0, np.sin(np.radians(30)), np.cos(np.radians(30))]
    assert figure.view_name(tilted) == "Axial (oblique)"
    assert figure.view_name([0, np.sin(np.radians(10)), np.cos(np.radians(10))]) == "Axial"


def test_scale_bar_is_a_round_length():
    assert figure.scale_bar_mm(240.0) == 20  # at most a fifth of the panel
    assert figure.scale_bar_mm(30.0) == 5 and figure.scale_bar_mm(2.0) == 1


def _case(direction=None):
    direction = np.eye(3) if direction is None else direction
    grid = Grid((60, 60, 40), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), tuple(np.ravel(direction)))
    z, y, x = np.mgrid[:40, :60, :60]
    head = ((x - 30) ** 2 + (y - 30) ** 2 + (z - 20) ** 2 < 25**2) * 100.0
    image = grid.image_from_array(head.astype(np.float32))
    hr = Grid((120, 120, 80), (1.0, 1.0, 1.0), (-0.5, -0.5, -0.5), grid.direction)
    Z, Y, X = np.mgrid[:80, :120, :120]
    ball = ((X - 70) ** 2 + (Y - 50) ** 2 + (Z - 40) ** 2 < 10**2).astype(np.uint8)
    return image, hr.image_from_array(ball)


def _near(rgb, colour, tolerance=60):
    return np.all(np.abs(rgb.astype(int) - np.asarray(colour)) < tolerance, axis=-1)


def test_the_figure_is_labelled(tmp_path):
    image, mask = _case()
    info = figure.FigureInfo("brain-tumour-flair-3d", 0.5)
    rgb = figure.render(image, mask, info)
    plain = figure.render(image, mask)
    assert rgb.shape[0] > plain.shape[0]  # the model line
    display = figure._display_grid(Grid.from_image(mask))
    w, spacing = display.size[0], display.spacing[0]  # small images are enlarged to a readable size
    assert w == figure.MIN_SIDE_PIXELS and display.size[1] == w
    # Three panels side by side, the mask filled translucently and outlined.
    assert rgb.shape[1] == 3 * w + 4 * figure.GAP_PIXELS
    outline = np.all(rgb == figure.MASK_RGB, axis=-1)
    reddish = rgb[..., 0].astype(int) - rgb[..., 1] > 30
    fill = reddish & ~outline & ~_near(rgb, figure.MARKER_RGB)
    assert outline.sum() > 100 and fill.sum() > outline.sum()
    # The scale bar: a white run as long as the round length it is labelled with, in the first panel.
    bar_px = round(figure.scale_bar_mm(w * spacing) / spacing)
    white = np.all(rgb == figure.TEXT_RGB, axis=-1)[:, : w + figure.GAP_PIXELS]
    runs = [np.diff(np.flatnonzero(np.diff(np.r_[0, row, 0]))) for row in white]
    assert sum(bar_px in r[::2] for r in runs) == 3  # three rows thick
    # Side markers in the marker colour at each panel's left and right edges, half-way down.
    markers = _near(rgb, figure.MARKER_RGB)
    title_h = figure.FONT_PIXELS + 6 + 4
    for k in range(3):
        x = figure.GAP_PIXELS + k * (w + figure.GAP_PIXELS)
        h = display.size[1] if k == 0 else display.size[2]
        band = markers[title_h + h // 2 - 20 : title_h + h // 2 + 20]
        assert band[:, x : x + 14].any() and band[:, x + w - 16 : x + w].any(), k
    # The legend and the stamp under the panels.
    below = rgb[title_h + w :]
    assert (
        _near(below, figure.MARKER_RGB).sum() > 200 and np.all(below == figure.TEXT_RGB, axis=-1).sum() > 200
    )
    path = figure.overlay_figure(image, mask, tmp_path / "f.png", info=info)
    assert sitk.ReadImage(str(path)).GetSize() == (rgb.shape[1], rgb.shape[0])


def test_legend_reports_lesions_and_resolutions():
    image, mask = _case()
    lines = figure._legend([{"volume_mm3": 4188.8}], mask, image, figure.FigureInfo("m", 0.4))
    assert lines == [
        "1 lesion, 4.2 mL in total",
        "mask at 1 x 1 x 1 mm over the 2 x 2 x 2 mm input",
        "model: m, threshold 0.4",
    ]
    empty = figure._legend([], mask, image, figure.FigureInfo())
    assert empty[0] == "no lesion found" and len(empty) == 2


def test_a_single_slice_volume_is_drawn_with_its_lesion_area():
    image = sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 255, (1, 24, 32)).astype(np.uint8))
    array = np.zeros((1, 48, 64), np.uint8)
    array[0, 10:20, 20:30] = 1
    mask = sitk.GetImageFromArray(array)
    mask.SetSpacing((0.5, 0.5, 1.0))
    rows = lesions.lesion_table(mask, diameters=False)
    assert figure._legend(rows, mask, image, figure.FigureInfo())[0] == "1 lesion, 25 mm2 in total"
    assert figure.render(image, mask).ndim == 3


def test_a_volume_is_drawn_as_a_viewer_shows_it_whatever_its_storage_order():
    # A sagittal acquisition's figure showed its views in storage order (superior at the bottom).
    image, mask = _case()
    for axes in ("ASL", "SRA", "RAI"):
        stored_image, stored_mask = geometry.reorient(image, axes), geometry.reorient(mask, axes)
        assert stored_mask.GetDirection() != mask.GetDirection()
        np.testing.assert_array_equal(
            figure.render(stored_image, stored_mask), figure.render(image, mask), axes
        )


@pytest.mark.parametrize("flip", [1, -1])
def test_markers_follow_a_flipped_axis(flip):
    image, mask = _case(np.diag([float(flip), 1.0, 1.0]))
    display = figure._display_grid(Grid.from_image(mask))
    (axial, coronal, _) = figure._panels(figure._scalar(image), mask, display, np.asarray(display.size) // 2)
    assert axial.title == "Axial" and coronal.title == "Coronal"
    assert axial.sides == {
        "right": "L" if flip == 1 else "R",
        "left": "R" if flip == 1 else "L",
        "top": "A",
        "bottom": "P",
    }
    assert coronal.sides["top"] == "S"


def test_a_2d_image_is_one_unmarked_panel():
    grid = Grid((40, 30), (0.5, 0.5), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    image = grid.image_from_array(np.random.default_rng(0).uniform(0, 255, (30, 40)).astype(np.float32))
    hr = Grid((80, 60), (0.25, 0.25), (-0.125, -0.125), grid.direction)
    mask = np.zeros((60, 80), np.uint8)
    mask[20:40, 30:50] = 1
    display = figure._display_grid(hr)
    (panel,) = figure._panels(figure._scalar(image), hr.image_from_array(mask), display, np.zeros(2, int))
    assert panel.title == "Image" and panel.sides == {}
    legend = figure._legend([{"area_mm2": 25.0}], hr.image_from_array(mask), image, figure.FigureInfo())
    assert legend[0] == "1 lesion, 25 mm2 in total"


@pytest.mark.parametrize("fully_connected", [True, False])
def test_lesions_are_numbered_as_in_the_table(fully_connected):
    """Each lesion seen in a panel is numbered where it is drawn, with its lesion-table id: 1 the largest."""
    image, mask = _case()
    array = sitk.GetArrayFromImage(mask)
    Z, Y, X = np.mgrid[:80, :120, :120]
    array[(X - 30) ** 2 + (Y - 50) ** 2 + (Z - 40) ** 2 < 6**2] = 1  # a smaller lesion, left of the first
    # Two voxels touching by a corner only: one lesion when diagonal neighbours join, two when not.
    array[40, 90, 90] = array[41, 91, 91] = 1
    numbered = sitk.GetImageFromArray(array)
    numbered.CopyInformation(mask)
    rows = lesions.lesion_table(numbered, fully_connected=fully_connected, diameters=False)
    assert [r["id"] for r in rows] == list(range(1, len(rows) + 1))
    assert len(rows) == (3 if fully_connected else 4)
    display = figure._display_grid(Grid.from_image(numbered))
    centre = np.round(display.physical_to_index(rows[0]["centroid_lps_mm"])).astype(int)
    labels, _ = lesions.numbered_lesions(numbered, fully_connected)
    axial = figure._panels(figure._scalar(image), numbered, display, centre, labels)[0]
    written = {number: (row, column) for number, row, column in axial.numbers}
    assert {1, 2} <= set(written)
    # Each number stands just above its lesion's outline in the panel (columns: +x to the right).
    for number in (1, 2):
        x_mm = display.physical_to_index(rows[number - 1]["centroid_lps_mm"])[0]
        assert abs(written[number][1] + figure.FONT_PIXELS // 3 - x_mm) < 3
    assert written[1][0] < written[2][0]  # the larger ball's top is higher in the slice


def test_an_rgb_image_is_drawn_as_the_brightness_the_network_saw():
    """A greyscale export with a yellow mark: the figure shows its luminance, not its red channel."""
    grey = np.random.default_rng(1).integers(20, 200, (30, 40)).astype(np.uint8)
    rgb = np.stack([grey] * 3, -1)
    rgb[10, 5:25] = (255, 230, 0)
    luma = np.rint(rgb @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    mask = sitk.GetImageFromArray((grey > 150).astype(np.uint8))
    mask.SetSpacing((0.5, 0.5))
    drawn = []
    for values, vector in ((rgb, True), (luma, False)):
        image = sitk.GetImageFromArray(values, isVector=vector)
        drawn.append(figure.render(image, mask).astype(int))
    assert np.abs(drawn[0] - drawn[1]).max() <= 1


def test_nan_outside_the_scan_is_drawn_as_its_background():
    """NaN voxels (no data) are segmented as the image's lowest value; drawn as NaN they made the display
    range NaN and the whole figure black."""
    grey = np.random.default_rng(2).integers(20, 200, (30, 40)).astype(np.float32)
    with_nan = grey.copy()
    with_nan[:6] = np.nan
    filled = np.where(np.isnan(with_nan), np.nanmin(with_nan), with_nan)
    mask = sitk.GetImageFromArray((grey > 150).astype(np.uint8))
    mask.SetSpacing((0.5, 0.5))
    drawn = [figure.render(sitk.GetImageFromArray(values), mask).astype(int) for values in (with_nan, filled)]
    np.testing.assert_array_equal(drawn[0], drawn[1])
    assert drawn[0].std() > 10  # not one colour
