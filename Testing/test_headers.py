"""What headers say that ITK's reading does not check: a series' slice positions, the DICOM modality
against the model's, a NIfTI's second position; and a sheared NIfTI's error in words."""

import gzip
import struct

import numpy as np
import pytest
import SimpleITK as sitk
from enhanced_dicom import write_enhanced_mr
from test_imageio import _volume, _write_dicom_series

from SASSRSegmentLib import cli
from SASSRSegmentLib.data import datasets
from SASSRSegmentLib.inference.inputs import check_image
from SASSRSegmentLib.io import imageio
from SASSRSegmentLib.runtime.errors import UserError

MRI_CARD = {
    "name": "brain",
    "modality": "MRI FLAIR",
    "network": {"in_channels": 1},
    "preprocessing": {"spatial_dims": 3, "channels": ["FLAIR"], "normalization": {"kind": "mri"}},
}
US_CARD = {
    "name": "breast",
    "modality": "ultrasound (B-mode, breast)",
    "network": {"in_channels": 1},
    "preprocessing": {"spatial_dims": 2, "channels": ["ultrasound"], "normalization": {"kind": "uint8"}},
}


def test_a_complete_series_reads_at_its_slice_positions(tmp_path):
    volume = _volume(size=(6, 5, 5), spacing=(0.8, 0.9, 2.0))
    _write_dicom_series(volume, tmp_path / "s")
    image = imageio.read_image(tmp_path / "s")
    np.testing.assert_allclose(image.GetSpacing(), (0.8, 0.9, 2.0), atol=1e-4)
    assert image.GetMetaData("0008|0060") == "MR"


def test_a_series_with_a_repeated_slice_is_refused(tmp_path):
    # ITK stacked it evenly: the helper's 2 mm brain series with one slice twice read at 1.04 mm.
    volume = _volume(size=(6, 5, 5), spacing=(0.8, 0.9, 2.0))
    _write_dicom_series(volume, tmp_path / "s", slices=[0, 1, 2, 2, 3, 4])
    with pytest.raises(UserError, match="1 of its 6 slices lies where another slice lies"):
        imageio.read_image(tmp_path / "s")


def test_a_series_with_a_missing_slice_is_refused(tmp_path, capfd):
    volume = _volume(size=(6, 5, 6), spacing=(0.8, 0.9, 2.0))
    _write_dicom_series(volume, tmp_path / "s", slices=[0, 1, 2, 4, 5])
    with pytest.raises(
        UserError, match=r"2 mm apart, but 4 mm apart between slices 3 and 4 \(a slice missing\?\)"
    ):
        imageio.read_image(tmp_path / "s")
    assert "itkImageSeriesReader" not in capfd.readouterr().err  # ITK's own warning is not shown


def test_modality_against_the_model(tmp_path):
    volume = _volume(size=(6, 5, 3))
    _write_dicom_series(volume, tmp_path / "mr")
    one_slice = imageio.read_image(tmp_path / "mr" / "slice001.dcm")
    with pytest.raises(UserError, match=r"DICOM MR image \(one slice of a series\? give the series' folder"):
        check_image(one_slice, US_CARD)
    cine = sitk.JoinSeries([sitk.Cast(volume[:, :, 0], sitk.sitkUInt8)] * 4)
    cine.SetMetaData("0008|0060", "US")
    with pytest.raises(UserError, match=r"DICOM ultrasound image \(a multi-frame cine\?"):
        check_image(cine, MRI_CARD)
    # To the ultrasound model: "choose a 3D model" had pointed to the brain MRI model.
    with pytest.raises(
        UserError,
        match=r"^the input is a stack of 4 frames \(a cine, or images read as one volume\?\) but model '.*' takes one image",
    ):
        check_image(cine, US_CARD)
    colour = sitk.Compose([sitk.Cast(volume, sitk.sitkUInt8)] * 3)  # PNG frames read as one volume
    with pytest.raises(UserError, match=r"^the input is a stack of 3 frames"):
        check_image(colour, US_CARD)
    # A matching modality, an unstated one (a user's own card) or a file without one goes on.
    series = imageio.read_image(tmp_path / "mr")
    assert check_image(series, MRI_CARD).GetSize() == series.GetSize()
    assert check_image(series, {**MRI_CARD, "modality": ""}).GetSize() == series.GetSize()
    plain = _volume(size=(6, 5, 3))
    assert check_image(plain, MRI_CARD).GetSize() == plain.GetSize()


@pytest.mark.parametrize(
    "direction, said",
    [
        ((1.0, 0.0, 0.0, -1.0), "flips or swaps its axes"),
        ((0.0, 1.0, 1.0, 0.0), "flips or swaps"),
        ((0.8, -0.6, 0.6, 0.8), "turns it"),
    ],
)
def test_a_picture_whose_header_turns_it_is_segmented_as_stored_and_said(direction, said):
    # A bottom-up NRRD had been segmented upside down without a word (0.696 against 0.769 upright).
    picture = sitk.Image([40, 30], sitk.sitkUInt8)
    picture.SetDirection(direction)
    warnings = []
    out = check_image(picture, US_CARD, warnings.append)
    assert out.GetDirection() == picture.GetDirection()
    assert len(warnings) == 1 and said in warnings[0] and "pixels as stored" in warnings[0]
    upright, warnings = sitk.Image([40, 30], sitk.sitkUInt8), []
    check_image(upright, US_CARD, warnings.append)
    # As Slicer holds a PNG: one slice, the identity in LPS.
    check_image(sitk.Image([40, 30, 1], sitk.sitkUInt8), US_CARD, warnings.append)
    assert warnings == []


def test_a_mask_given_as_the_image_is_warned_of():
    # A brain label map had come out as "0 lesions", a BUSI mask as 40,914 lesion pixels, unsaid.
    mask = np.zeros((30, 40), np.uint8)
    mask[10:20, 5:25] = 255
    warnings = []
    check_image(sitk.GetImageFromArray(mask), US_CARD, warnings.append)
    assert warnings == [
        "the image holds two values only (0 and 255): a mask or label map given as the image? Its mask means nothing"
    ]
    warnings.clear()
    mask[0, 0] = 7  # a third value: an image
    check_image(sitk.GetImageFromArray(mask), US_CARD, warnings.append)
    assert warnings == []


def _nifti_with_sform(tmp_path, name, edit):
    """The volume as NIfTI, its header's sform rows (floats at bytes 280-327) and codes then edited."""
    path = tmp_path / name
    sitk.WriteImage(_volume(size=(6, 5, 4), spacing=(2.0, 2.0, 2.0)), str(path))
    raw = bytearray(path.read_bytes())
    rows = [list(struct.unpack_from("<4f", raw, 280 + 16 * r)) for r in range(3)]
    codes = edit(rows)
    for r, row in enumerate(rows):
        struct.pack_into("<4f", raw, 280 + 16 * r, *row)
    struct.pack_into("<hh", raw, 252, *codes)  # qform_code, sform_code
    path.write_bytes(bytes(raw))
    return path


def test_nifti_whose_qform_and_sform_disagree_is_read_with_a_warning(tmp_path):
    def shifted(rows):
        rows[0][3] += 30.0
        return 1, 2

    heard = []
    image = imageio.read_image(_nifti_with_sform(tmp_path, "shifted.nii", shifted), heard.append)
    assert len(heard) == 1 and "30 mm apart (qform and sform)" in heard[0]
    np.testing.assert_allclose(image.GetOrigin(), (10.0, -20.0, 30.0))  # ITK's reading, by the qform
    heard.clear()
    imageio.read_image(_nifti_with_sform(tmp_path, "same.nii", lambda rows: (1, 1)), heard.append)
    assert heard == []


def test_nifti_read_by_its_sform_is_said_so_and_a_voxel_size_disagreement_is_refused(tmp_path):
    def flipped(rows):  # both codes 1: ITK reads the sform, which the check had compared with itself
        rows[0][0] *= -1
        return 1, 1

    heard = []
    image = imageio.read_image(_nifti_with_sform(tmp_path, "flipped.nii", flipped), heard.append)
    assert image.GetDirection()[0] == -1.0
    assert len(heard) == 1 and "it is read by the sform" in heard[0] and "by its qform" in heard[0]

    def stale_pixdim(rows):  # an sform of 2 mm voxels only: ITK takes pixdim's size
        return 0, 1

    path = _nifti_with_sform(tmp_path, "pixdim.nii", stale_pixdim)
    raw = bytearray(path.read_bytes())
    struct.pack_into("<3f", raw, 80, 1.0, 1.0, 1.0)  # pixdim[1..3]
    path.write_bytes(bytes(raw))
    with pytest.raises(
        UserError,
        match=r"disagrees with itself on its voxels: pixdim says 1 x 1 x 1 mm, its sform's 2 x 2 x 2 mm",
    ):
        imageio.read_image(path)


def test_ordinary_niftis_are_read_without_a_word(tmp_path):
    # A left-handed voxel grid (qfac -1, which ITK's metadata does not print) had been warned of as
    # "placed in two ways 234 mm apart", or with its sform code 0 refused.
    left_handed = _volume(size=(6, 5, 4), spacing=(2.0, 2.0, 2.0))
    left_handed.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
    sitk.WriteImage(left_handed, str(tmp_path / "lpi.nii.gz"))
    heard = []
    assert imageio.read_image(tmp_path / "lpi.nii.gz", heard.append).GetDirection()[8] == -1.0
    raw = bytearray(gzip.decompress((tmp_path / "lpi.nii.gz").read_bytes()))
    struct.pack_into("<h", raw, 254, 0)  # sform_code 0: placed by the qform alone
    (tmp_path / "qform.nii").write_bytes(bytes(raw))
    imageio.read_image(tmp_path / "qform.nii", heard.append)
    # ITK reads an uncompressed file named .nii.gz; it had been called truncated.
    (tmp_path / "plain.nii.gz").write_bytes(bytes(raw))
    imageio.read_image(tmp_path / "plain.nii.gz", heard.append)
    assert heard == []
    # A 2D NIfTI written with an identity affine (nibabel's way) reads as flipped in x and y in LPS, its
    # pixels upright: no word of a turned picture.
    picture = sitk.Image([40, 30], sitk.sitkUInt8)
    picture[5, 5] = 200
    picture[6, 5] = 100
    picture.SetDirection((-1, 0, 0, -1))
    sitk.WriteImage(picture, str(tmp_path / "picture.nii"))
    check_image(imageio.read_image(tmp_path / "picture.nii"), US_CARD, heard.append)
    assert heard == []


@pytest.mark.parametrize("name", ["cut.nii", "cut.nii.gz"])
def test_a_truncated_nifti_is_refused(tmp_path, name):
    # ITK reads a NIfTI cut short with zeros for what is missing: the lesion in the lost half was gone.
    whole = tmp_path / ("whole" + name[3:])
    sitk.WriteImage(_volume(size=(30, 20, 16)), str(whole))
    assert imageio.read_image(whole).GetSize() == (30, 20, 16)
    data = whole.read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(
        UserError, match="is truncated or corrupt: it holds less image data than its header names"
    ):
        imageio.read_image(tmp_path / name)
    # A dataset's case too: caches and scores had been made of the zeros.
    with pytest.raises(UserError, match="is truncated or corrupt"):
        datasets.read_case(None, datasets.Case("cut", (tmp_path / name,), whole))


def test_a_sheared_nifti_is_refused_in_words(tmp_path, capfd):
    def sheared(rows):
        rows[0][1] = 0.6
        return 0, 1

    path = _nifti_with_sform(tmp_path, "sheared.nii", sheared)
    assert cli.main(["segment", str(path), "-o", str(tmp_path / "m.nrrd"), "--quiet"]) == 2
    err = capfd.readouterr().err.strip()  # ITK's own warning would reach the process's stderr
    assert err.endswith(
        "its orientation is sheared or scaled, not a rotation (a gantry-tilted CT converted to "
        "NIfTI?), which ITK cannot place; resample it onto a regular grid first"
    )
    assert len(err.splitlines()) == 1 and not (tmp_path / "m.nrrd").exists()


def test_a_sheared_metaimage_and_a_complex_image_are_refused_in_words(tmp_path):
    # A NIfTI so sheared is refused by ITK; a MetaImage was read, its voxels seen as square.
    path = tmp_path / "sheared.mha"
    sitk.WriteImage(_volume(size=(6, 5, 4)), str(path))
    header = path.read_bytes()
    path.write_bytes(
        header.replace(b"TransformMatrix = 1 0 0 0 1 0 0 0 1", b"TransformMatrix = 1 0 0 0.5 1 0 0 0 1")
    )
    assert 0.5 in sitk.ReadImage(str(path)).GetDirection()  # ITK reads it as it is
    with pytest.raises(UserError, match=r"its orientation is sheared or scaled, not a rotation"):
        imageio.read_image(path)
    # A degenerate orientation had been called "truncated or corrupt".
    nrrd = tmp_path / "flat.nrrd"
    sitk.WriteImage(_volume(size=(6, 5, 4)), str(nrrd))
    header = nrrd.read_bytes()
    start = header.index(b"space directions:")
    end = header.index(b"\n", start)
    nrrd.write_bytes(header[:start] + b"space directions: (0,0,0) (0,1,0) (0,0,1)" + header[end:])
    with pytest.raises(UserError, match=r"its header gives a voxel size of zero or below"):
        imageio.read_image(nrrd)
    # Its real part had been segmented, with numpy's warnings.
    complex_path = tmp_path / "complex.nrrd"
    array = sitk.GetArrayFromImage(_volume(size=(6, 5, 4))).astype(np.float32)
    sitk.WriteImage(
        sitk.GetImageFromArray(array * np.exp(1j * array).astype(np.complex64)), str(complex_path)
    )
    with pytest.raises(UserError, match=r"holds complex values \(raw MRI data\?\): save its magnitude image"):
        imageio.read_image(complex_path)


def test_a_folder_of_two_series_given_one_output_file_names_them(tmp_path, capsys):
    volume = _volume(size=(6, 5, 3))
    _write_dicom_series(volume, tmp_path / "exam")
    second = tmp_path / "second"
    _write_dicom_series(volume, second)
    for path in second.iterdir():  # the same images as another series of the exam
        image = sitk.ReadImage(str(path))
        image.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.999")
        image.SetMetaData("0020|0011", "7")
        image.SetMetaData("0008|103e", "T2 FLAIR tra")
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(tmp_path / "exam" / f"b{path.name}"))
        writer.Execute(image)
    # Named by number and description where the header has them, so an exam's outputs say which is which.
    items, batch = imageio.find_inputs([tmp_path / "exam"])
    assert batch and [i.name for i in items] == ["exam_series1", "exam_7_T2_FLAIR_tra"]
    assert cli.main(["segment", str(tmp_path / "exam"), "-o", str(tmp_path / "m.nrrd"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: several inputs (2: ") and "(series " in err and "-o must be a folder" in err


def test_a_folder_of_one_image_per_file_names_each_output_by_its_file(tmp_path):
    """Eight ultrasound images of one description had come out as Breast_US, Breast_US_2, ... in the order
    of their series UIDs, which no user can map back to the files."""
    folder = tmp_path / "clinic"
    folder.mkdir()
    for k, name in enumerate(["right breast 10h", "left-breast", "lesion.2"]):
        image = sitk.GetImageFromArray(np.full((12, 16), 40 * k, np.uint8))
        image.SetMetaData("0008|0060", "US")
        image.SetMetaData("0008|103e", "Breast US")
        image.SetMetaData("0020|000e", f"1.2.826.0.1.3680043.2.1125.7.{9 - k}")
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"{name}.dcm"))
        writer.Execute(image)
    items, batch = imageio.find_inputs([folder])
    assert batch and sorted(i.name for i in items) == [
        "clinic_left-breast",
        "clinic_lesion.2",
        "clinic_right_breast_10h",
    ]


def _enhanced(folder, name, digits=5, order=None, skip=(), count=12, step=6.5, sideways=0.0, **written):
    """An oblique stack (20 degrees) of `count` frames `step` mm apart as one Enhanced MR file, its frames
    stored in `order`, `skip`ped frames left out, each frame shifted `sideways` mm more than the last
    (a gantry tilt); (the file, the volume it holds, on its true grid)."""
    tilt = np.deg2rad(20)
    rows, columns = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(tilt), -np.sin(tilt)])
    normal = np.cross(rows, columns)
    frames = np.random.default_rng(3).integers(0, 900, (count, 16, 20)).astype(np.uint16)
    origin = np.array([-10.0, 20.0, 30.0])
    truth = sitk.GetImageFromArray(frames)
    truth.SetSpacing((0.45, 0.5, step))
    truth.SetOrigin(origin.tolist())
    truth.SetDirection(np.column_stack([rows, columns, normal]).ravel().tolist())
    kept = [k for k in (order or range(count)) if k not in skip]
    positions = [origin + k * (step * normal + sideways * rows) for k in kept]
    folder.mkdir(parents=True, exist_ok=True)
    orientation = np.r_[rows, columns]
    path = write_enhanced_mr(
        folder / f"{name}.dcm", frames[kept], (0.45, 0.5), orientation, positions, digits=digits, **written
    )
    return path, truth


INTERLEAVED = [*range(0, 12, 2), *range(1, 12, 2)]


@pytest.mark.parametrize(
    "kind, options, itk_reads_it",
    [
        ("as written by most", {}, True),
        ("positions with 2 decimals", {"digits": 2}, False),
        ("interleaved", {"order": INTERLEAVED}, False),
        ("top down", {"order": list(range(11, -1, -1))}, True),
        ("implicit VR, 2 decimals", {"digits": 2, "implicit": True}, False),
        # Other positions in the file: Philips' private per-frame copy, an icon's pixel data before the
        # groups; a search of the file's bytes had counted the first and stopped at the second.
        ("a private copy of each position, interleaved", {"order": INTERLEAVED, "private_copy": True}, False),
        ("an icon image, 2 decimals", {"digits": 2, "icon": True}, False),
        # Rounded positions: the median step had put the last of 300 frames 0.9 mm off.
        ("300 frames 0.8 mm apart, 2 decimals", {"digits": 2, "count": 300, "step": 0.8}, False),
    ],
)
def test_an_enhanced_mr_file_reads_on_its_frames_grid(tmp_path, kind, options, itk_reads_it):
    """ITK (GDCM) reads 1 x 1 x 1 mm where the frames' positions fail its evenness test, and stacks the
    frames as stored: the helper's tilted 2D FLAIR came back 322 mm off, as 0 lesions, exit 0."""
    path, truth = _enhanced(tmp_path / "f", "scan", **options)
    assert (sitk.ReadImage(str(path)).GetSpacing() == (1.0, 1.0, 1.0)) != itk_reads_it
    for given in (path, path.parent):  # the file, or its folder as a DICOM series
        warnings = []
        image = imageio.read_image(given, warn=warnings.append)
        assert bool(warnings) != itk_reads_it and image.GetMetaData("0008|0060") == "MR"
        np.testing.assert_allclose(image.GetSpacing(), truth.GetSpacing(), rtol=1e-4)
        on_truth = sitk.Resample(image, truth, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(on_truth), sitk.GetArrayFromImage(truth))


def test_an_enhanced_mr_file_no_even_stack_can_hold_is_refused(tmp_path):
    """A frame missing; frames shifted sideways (a gantry tilt: ITK placed the last 5.5 mm off); a cine
    whose one position is shared by its frames (ITK read its 12 time points as 12 slices); a frame
    without a position (it had kept ITK's 1 x 1 x 1 mm without a word)."""
    path, _ = _enhanced(tmp_path, "gap", skip=(5,))
    with pytest.raises(UserError, match=r"frames are 6.5 mm apart, but 13 mm apart between frames 5 and 6"):
        imageio.read_image(path)
    path, _ = _enhanced(tmp_path, "tilted", digits=2, sideways=0.5)
    with pytest.raises(
        UserError, match=r"shift sideways from one to the next \(a gantry tilt\?\), by up to 12.2 voxels"
    ):
        imageio.read_image(path)
    cine = write_enhanced_mr(
        tmp_path / "cine.dcm",
        np.zeros((12, 16, 20), np.uint16),
        (0.45, 0.5),
        np.r_[1.0, 0, 0, 0, 1, 0],
        [np.zeros(3)],
    )
    with pytest.raises(UserError, match=r"its 12 frames lie at one position \(a cine or time series\?\)"):
        imageio.read_image(cine)
    # A frame without its position: ITK falls back to 1 x 1 x 1 mm, and no grid can be confirmed.
    path, _ = _enhanced(tmp_path, "unplaced", digits=2, unplaced=(4,))
    assert sitk.ReadImage(str(path)).GetSpacing() == (1.0, 1.0, 1.0)
    with pytest.raises(UserError, match=r"the geometry of this multi-frame DICOM file cannot be read"):
        imageio.read_image(path)
    # Each frame's own orientation two parallel vectors (ITK used the shared one): a NaN grid, a traceback.
    path, _ = _enhanced(tmp_path, "parallel", digits=2, frame_orientation=np.r_[1.0, 0, 0, 1, 0, 0])
    with pytest.raises(UserError, match=r"its image orientation \(0020,0037\) is damaged"):
        imageio.read_image(path)
    # A file GDCM cannot place at all (no orientation anywhere) made listing its folder's series fail.
    lost = tmp_path / "lost"
    lost.mkdir()
    write_enhanced_mr(lost / "s.dcm", np.zeros((3, 4, 4), np.uint16), (1, 1), None, [np.zeros(3)] * 3)
    with pytest.raises(UserError, match=r"^cannot read the DICOM files in .*lost: "):
        imageio.read_image(lost)


def _split(folder, parts, **options):
    """The oblique stack of `_enhanced` with its frames split over several Enhanced MR files of one
    series, `parts` the frames each file holds; (the folder, the truth)."""
    for k, frames in enumerate(parts):
        _, truth = _enhanced(folder, f"part{k}", order=list(frames), instance_uid=f"1.2.3.{k + 1}", **options)
    return folder, truth


def test_a_series_split_over_several_enhanced_mr_files_reads_as_one_volume(tmp_path):
    """The series reader had stacked the two files along a fourth axis and the input was refused as "a
    time series of 2 volumes"."""
    interleaved = [INTERLEAVED[:4], INTERLEAVED[4:8], INTERLEAVED[8:]]  # each file with gaps of its own
    for name, parts in [
        ("halves", [range(6), range(6, 12)]),
        ("upper first", [range(7, 12), range(7)]),
        ("interleaved over three", interleaved),
        ("one frame first", [[0], range(1, 12)]),  # it had gone to the series reader: "corrupt"
        ("one frame last", [range(11), [11]]),
    ]:
        folder, truth = _split(tmp_path / name, parts, digits=2)
        image = imageio.read_image(folder, warn=lambda m: None)
        np.testing.assert_allclose(image.GetSpacing(), truth.GetSpacing(), rtol=1e-4)
        np.testing.assert_allclose(image.GetOrigin(), truth.GetOrigin(), atol=0.01)
        np.testing.assert_allclose(image.GetDirection(), truth.GetDirection(), atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(truth))
        assert image.GetMetaData("0008|0060") == "MR"
    folder, _ = _split(tmp_path / "gap", [range(5), range(6, 12)])
    with pytest.raises(UserError, match=r"13 mm apart between frames 5 and 6 \(a slice missing\?\)"):
        imageio.read_image(folder)
    folder, _ = _split(tmp_path / "twice", [range(6), range(6)])
    with pytest.raises(UserError, match=r"6 of its 12 frames lie where another slice lies"):
        imageio.read_image(folder)


def test_segment_puts_an_enhanced_mr_files_mask_on_its_frames_grid(tmp_path, tiny_bundle_3d):
    path, truth = _enhanced(tmp_path / "f", "scan", digits=2)
    out = tmp_path / "mask.nrrd"
    assert cli.main(["segment", str(path), "-o", str(out), "--model", str(tiny_bundle_3d), "--quiet"]) == 0
    mask = sitk.ReadImage(str(out))
    np.testing.assert_allclose(mask.GetSpacing(), (0.225, 0.25, 3.25), rtol=1e-3)
    np.testing.assert_allclose(mask.GetDirection(), truth.GetDirection(), atol=1e-6)
    # The HR grid covers the LR grid's extent: its first voxel lies a quarter LR voxel inside the first.
    first = np.array(truth.TransformContinuousIndexToPhysicalPoint((-0.25, -0.25, -0.25)))
    np.testing.assert_allclose(mask.GetOrigin(), first, atol=0.01)
