"""Reading inputs (files, folders, DICOM series) and atomic, non-clobbering output writing."""

import os
import time

import numpy as np
import pytest
import SimpleITK as sitk

from SASSRSegmentLib.io import imageio
from SASSRSegmentLib.io.files import plain_permissions
from SASSRSegmentLib.runtime.errors import UserError


def _volume(size=(6, 5, 4), spacing=(0.8, 0.9, 2.5), origin=(10.0, -20.0, 30.0)) -> sitk.Image:
    array = np.arange(int(np.prod(size)), dtype=np.int16).reshape(size[::-1])
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _write_dicom_series(volume: sitk.Image, folder, slices=None, modality="MR") -> None:
    """One file per slice with the tags GDCM groups a series by (SimpleITK's documented recipe);
    `slices` (z indices, repeats allowed) writes some slices only, or some twice."""
    folder.mkdir()
    uid = "1.2.826.0.1.3680043.2.1125.1.12345"
    direction = volume.GetDirection()
    for k, z in enumerate(range(volume.GetDepth()) if slices is None else slices):
        slab = volume[:, :, z]
        position = volume.TransformIndexToPhysicalPoint((0, 0, z))
        tags = {
            "0008|0060": modality,
            "0020|000d": uid + ".1",
            "0020|000e": uid + ".2",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.4f}" for v in position),
            "0020|0037": "\\".join(
                f"{v:.6f}"
                for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])
            ),
            "0018|0050": f"{volume.GetSpacing()[2]:.4f}",
            "0028|0030": f"{volume.GetSpacing()[1]:.4f}\\{volume.GetSpacing()[0]:.4f}",
            "0008|0021": time.strftime("%Y%m%d"),
        }
        for key, value in tags.items():
            slab.SetMetaData(key, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slab)


def test_split_extension_knows_two_part_extensions():
    assert imageio.split_extension("a/b/case.nii.gz") == ("case", ".nii.gz")
    assert imageio.split_extension("x.seg.nrrd") == ("x", ".seg.nrrd")
    assert imageio.split_extension("Scan.NRRD") == ("Scan", ".nrrd")
    assert imageio.split_extension("table.csv") == ("table", ".csv")
    assert imageio.split_extension("noext") == ("noext", "")


def test_find_inputs_files_folders_and_errors(tmp_path):
    sitk.WriteImage(_volume(), str(tmp_path / "a.nrrd"))
    sitk.WriteImage(_volume(), str(tmp_path / "b.nii.gz"))
    (tmp_path / "notes.txt").write_text("not an image")
    items, batch = imageio.find_inputs([tmp_path / "a.nrrd"])
    assert [i.name for i in items] == ["a"] and not batch
    items, batch = imageio.find_inputs([tmp_path])
    assert sorted(i.name for i in items) == ["a", "b"] and batch
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    with pytest.raises(UserError, match="holds no image"):
        imageio.find_inputs([empty])
    with pytest.raises(UserError, match="does not exist"):
        imageio.find_inputs([tmp_path / "missing.nrrd"])
    with pytest.raises(UserError, match="share the name"):
        imageio.find_inputs([tmp_path / "a.nrrd", tmp_path / "a.nrrd"])


def test_dicom_series_folder_reads_as_one_volume(tmp_path):
    volume = _volume(size=(8, 7, 5), spacing=(0.7, 0.7, 3.0))
    _write_dicom_series(volume, tmp_path / "series")
    items, batch = imageio.find_inputs([tmp_path / "series"])
    assert len(items) == 1 and not batch and items[0].series_id
    image = imageio.read_image(items[0])
    assert image.GetSize() == volume.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), volume.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(image.GetOrigin(), volume.GetOrigin(), atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(volume))
    # A folder of patients: each sub-folder holding a series is one input of the batch.
    items, batch = imageio.find_inputs([tmp_path])
    assert [i.name for i in items] == ["series"] and batch


def test_unreadable_file_is_a_one_line_user_error(tmp_path):
    bad = tmp_path / "broken.nrrd"
    bad.write_bytes(b"NRRD0004\ntype: what\n\x00\x01garbage")
    with pytest.raises(UserError) as info:
        imageio.read_image(bad)
    assert "cannot read" in str(info.value) and "\n" not in str(info.value)


def test_write_is_atomic_and_never_clobbers(tmp_path):
    target = tmp_path / "out.nrrd"
    imageio.write_image(_volume(), target)
    assert sitk.ReadImage(str(target)).GetSize() == (6, 5, 4)
    before = target.read_bytes()
    with pytest.raises(UserError, match="already exists"):
        imageio.write_image(_volume(size=(3, 3, 3)), target)
    assert target.read_bytes() == before
    imageio.write_image(_volume(size=(3, 3, 3)), target, overwrite=True)
    assert sitk.ReadImage(str(target)).GetSize() == (3, 3, 3)
    # A write that fails (PNG cannot hold float pixels) leaves neither the target nor a temporary file.
    with pytest.raises(UserError, match="cannot write"):
        imageio.write_image(sitk.Image(4, 4, sitk.sitkFloat64), tmp_path / "float.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nrrd"]
    mode = target.stat().st_mode & 0o777
    assert mode == plain_permissions()


def test_atomic_writes_give_files_the_permissions_of_a_plain_open(tmp_path):
    # Bundles, caches and checkpoints came out 0600 (mkstemp's), unreadable by colleagues or by Slicer
    # running as another user.
    from SASSRSegmentLib.io.files import atomic_write_bytes

    previous = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "model.json", b"{}")
        assert (tmp_path / "model.json").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(previous)


def test_png_refuses_volumes_and_seg_nrrd_names_the_segment(tmp_path):
    with pytest.raises(UserError, match="PNG holds 2D"):
        imageio.write_image(_volume(), tmp_path / "v.png")
    mask = sitk.Cast(_volume() > 50, sitk.sitkUInt8)
    mask.SetMetaData("SASSRSegment_provenance", '{"model": "m"}')
    imageio.write_image(mask, tmp_path / "m.seg.nrrd")
    back = sitk.ReadImage(str(tmp_path / "m.seg.nrrd"))
    # Dropped by SimpleITK's copy once the segment keys were set (every .seg.nrrd had lost it).
    assert back.GetMetaData("SASSRSegment_provenance") == '{"model": "m"}'
    assert back.GetMetaData("Segment0_LabelValue") == "1"
    assert back.GetMetaData("Segment0_Extent") == "0 5 0 4 0 3"
    assert back.GetMetaData("Segmentation_MasterRepresentation") == "Binary labelmap"


def test_check_output_path(tmp_path):
    with pytest.raises(UserError, match="unknown extension"):
        imageio.check_output_path(tmp_path / "m.jpg", overwrite=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write to folder"):
        imageio.check_output_path(blocker / "m.nrrd", overwrite=False)
    existing = tmp_path / "m.nrrd"
    existing.write_text("keep me")
    with pytest.raises(UserError, match="--overwrite"):
        imageio.check_output_path(existing, overwrite=False)
    assert imageio.check_output_path(existing, overwrite=True) == existing
    assert existing.read_text() == "keep me"
    nested = imageio.check_output_path(tmp_path / "new" / "deeper" / "m.nii.gz", overwrite=False)
    assert not nested.parent.exists()  # made when an output is written there, not for nothing
    image = sitk.Image(3, 3, sitk.sitkUInt8)
    assert (
        imageio.write_image(image, tmp_path / "new" / "deeper" / "m.nrrd")
        == tmp_path / "new" / "deeper" / "m.nrrd"
    )
    assert os.listdir(nested.parent) == ["m.nrrd"]


def test_staged_outputs_land_together_or_not_at_all(tmp_path):
    image = sitk.Image(4, 4, sitk.sitkUInt8)
    kept = tmp_path / "old.nrrd"
    kept.write_text("the user's file")
    targets = [tmp_path / "a.nrrd", tmp_path / "sub" / "b.csv", kept]

    def write(target, staging):
        if target.suffix == ".csv":
            imageio.write_text("id\n", target, staging=staging)
        else:
            imageio.write_image(image, target, staging=staging)

    for fail_at in range(len(targets) + 1):  # a cancel before each write, and before the commit
        with pytest.raises(KeyboardInterrupt):
            with imageio.Staging(overwrite=True) as staging:
                for k, target in enumerate(targets):
                    if k == fail_at:
                        raise KeyboardInterrupt
                    write(target, staging)
                raise KeyboardInterrupt
        assert sorted(p.name for p in tmp_path.rglob("*")) == ["old.nrrd"], fail_at
        assert kept.read_text() == "the user's file"
    with imageio.Staging(overwrite=True) as staging:
        for target in targets:
            write(target, staging)
        assert staging.commit() == targets
    assert all(t.is_file() for t in targets) and not list(tmp_path.rglob(".*partial*"))
    assert sitk.ReadImage(str(kept)).GetSize() == (4, 4)


def test_interrupted_write_leaves_no_file(tmp_path):
    target = tmp_path / "m.nrrd"
    with pytest.raises(KeyboardInterrupt):
        with imageio.atomic_path(target, overwrite=False) as tmp:
            tmp.write_bytes(b"half of a volume")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
