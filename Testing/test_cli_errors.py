"""Every bad input to `segment` is one line on stderr, exit status 2, no traceback and no output file;
Ctrl-C and SIGTERM stop promptly and leave nothing behind.

Exit codes and tracebacks are checked in real subprocesses (`python -m SASSRSegmentLib`); the many
input variants run in-process through the same `cli.main` to keep the suite fast.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SASSRSegmentLib import cli
from SASSRSegmentLib.commands import segment as segment_command
from SASSRSegmentLib.model.bundle import bundled_models, read_card

REPO = Path(__file__).resolve().parent.parent


def _run(*args, timeout=120):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "SASSRSegmentLib", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _assert_one_line_error(rc: int, stderr: str, match: str) -> None:
    """Exit 2; the error is one line, the last on stderr (progress lines may precede it); no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2, stderr
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1 and errors[0] == lines[-1] and errors[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    assert match in errors[0], errors[0]


def _volume(path: Path, array=None, spacing=(2.0, 2.0, 2.0)) -> Path:
    array = np.random.default_rng(0).random((6, 8, 10)).astype(np.float32) if array is None else array
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def broken_bundle(tiny_bundle_3d, tmp_path) -> Path:
    folder = tmp_path / "broken-model"
    shutil.copytree(tiny_bundle_3d, folder)
    data = bytearray((folder / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.pt").write_bytes(bytes(data))
    return folder


# ----------------------------------------------------------------------------------------- subprocess


def test_missing_input_exits_2_without_traceback(tmp_path):
    result = _run("segment", tmp_path / "nope.nrrd", "-o", tmp_path / "m.nrrd")
    _assert_one_line_error(result.returncode, result.stderr, "does not exist")
    assert not (tmp_path / "m.nrrd").exists()


def test_the_fast_exit_keeps_buffered_output_and_the_status(tmp_path):
    """The entry point ends with os._exit (no interpreter teardown): what sits in a block-buffered pipe
    must still arrive, and the status must be the command's."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    command = [sys.executable, "-m", "SASSRSegmentLib"]
    listed = subprocess.run(
        [*command, "models", "--json"], capture_output=True, text=True, env=env, timeout=120
    )
    assert listed.returncode == 0, listed.stderr
    assert {card["name"] for card in json.loads(listed.stdout)} >= set(bundled_models())
    failed = subprocess.run(
        [*command, "segment", str(tmp_path / "nope.nrrd"), "-o", str(tmp_path / "m.nrrd")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    _assert_one_line_error(failed.returncode, failed.stderr, "does not exist")
    if os.name != "posix":
        return
    # Started with standard output closed (sys.stdout is None): the status is still the command's.
    closed = subprocess.run(
        [*command, "segment", str(tmp_path / "nope.nrrd"), "-o", str(tmp_path / "m.nrrd")],
        stdout=None,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        timeout=120,
        preexec_fn=lambda: os.close(1),
    )
    _assert_one_line_error(closed.returncode, closed.stderr, "does not exist")


def test_corrupted_weights(tmp_path, broken_bundle):
    result = _run(
        "segment", _volume(tmp_path / "in.nrrd"), "-o", tmp_path / "m.nrrd", "--model", broken_bundle
    )
    _assert_one_line_error(result.returncode, result.stderr, "corrupted")
    assert not (tmp_path / "m.nrrd").exists()


def test_existing_output_is_checked_before_any_work(tmp_path, broken_bundle):
    target = tmp_path / "m.nrrd"
    target.write_bytes(b"the user's file")
    # The model is broken too: the output check must come first, so it is the one reported.
    result = _run("segment", _volume(tmp_path / "in.nrrd"), "-o", target, "--model", broken_bundle)
    _assert_one_line_error(result.returncode, result.stderr, "already exists; pass --overwrite")
    assert target.read_bytes() == b"the user's file"


def test_4d_input(tmp_path, tiny_bundle_3d):
    series = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32))] * 3)
    sitk.WriteImage(series, str(tmp_path / "fmri.nii.gz"))
    result = _run("segment", tmp_path / "fmri.nii.gz", "-o", tmp_path / "m.nrrd", "--model", tiny_bundle_3d)
    _assert_one_line_error(result.returncode, result.stderr, "the input is 4D, a time series of 3 volumes")
    assert not (tmp_path / "m.nrrd").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_but_absent(tmp_path, tiny_bundle_3d):
    result = _run(
        "segment",
        _volume(tmp_path / "in.nrrd"),
        "-o",
        tmp_path / "m.nrrd",
        "--model",
        tiny_bundle_3d,
        "--device",
        "cuda",
    )
    _assert_one_line_error(result.returncode, result.stderr, "no CUDA GPU")
    assert not (tmp_path / "m.nrrd").exists()


def test_demo(tmp_path):
    """With the bundled sample and 3D model: mask, lesion table and figure; without: says what is missing."""
    has_model = any(read_card(f)["preprocessing"].get("spatial_dims") == 3 for f in bundled_models().values())
    has_sample = (segment_command.samples_dir() / segment_command.SAMPLE_NAME).is_file()
    # A region around the sample's centre keeps this fast on a CPU (the full demo is `make demo`).
    roi = ["--roi", "-130", "-100", "110", "140", "60", "90"]
    result = _run("segment", "--demo", "-o", tmp_path / "demo", "--progress", "quiet", *roi, timeout=600)
    if not (has_model and has_sample):
        _assert_one_line_error(result.returncode, result.stderr, "--demo needs")
        assert ("bundled 3D model" in result.stderr) != has_model
        assert ("sample image" in result.stderr) != has_sample
        return
    assert result.returncode == 0, result.stderr
    stem = segment_command.SAMPLE_NAME.removesuffix(".nrrd")
    names = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert names == [
        f"{stem}_figure.png",
        f"{stem}_lesions.csv",
        f"{stem}_lesions.provenance.json",
        f"{stem}_mask.seg.nrrd",
    ]
    mask = sitk.ReadImage(str(tmp_path / "demo" / f"{stem}_mask.seg.nrrd"))
    sample = sitk.ReadImage(str(segment_command.samples_dir() / segment_command.SAMPLE_NAME))
    np.testing.assert_allclose(mask.GetSpacing(), np.asarray(sample.GetSpacing()) / 2)
    assert all(30 <= n <= 34 for n in mask.GetSize())  # 30 mm at 1 mm, plus the voxels the edges touch


def _segment_command(source: Path, out: Path, bundle: Path) -> list[str]:
    command = [sys.executable, "-m", "SASSRSegmentLib", "segment", str(source), "-o", str(out / "m.nrrd")]
    return command + ["--model", str(bundle), "--progress", "json", "--probabilities", str(out / "p.nrrd")]


def _cancel_at(command: list[str], stage: str, signum: int) -> tuple[int, float, str]:
    """Run `command` (with --progress json), send `signum` as soon as it reports `stage`; returns (exit
    status, seconds from the signal to the exit, standard error)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        seen = []
        for line in process.stdout:
            seen.append(json.loads(line).get("stage"))
            if seen[-1] == stage:
                break
        assert seen and seen[-1] == stage, f"the run ended before reporting {stage}: {seen}"
        sent = time.monotonic()
        process.send_signal(signum)
        process.wait(timeout=30)
        elapsed = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, elapsed, process.stderr.read()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cancel_stops_promptly_and_leaves_nothing(tmp_path, tiny_bundle_3d, signum):
    # 64^3 LR voxels in 8^3 windows: minutes of work, so the signal surely lands mid-prediction.
    source = _volume(tmp_path / "big.nrrd", np.random.default_rng(1).random((64, 64, 64)).astype(np.float32))
    out = tmp_path / "out"
    code, elapsed, err = _cancel_at(_segment_command(source, out, tiny_bundle_3d), "predict", signum)
    assert code == 130, err
    assert elapsed < 2.0
    assert "Traceback" not in err
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("stage", ["read", "preprocess", "predict", "write"])
def test_a_cancel_at_every_stage_ends_within_two_seconds_and_leaves_nothing(tmp_path, tiny_bundle_3d, stage):
    """SIGTERM (the Slicer panel's Cancel) as soon as the run reports `stage`: exit 130 within 2 s, and no
    output at all, whatever the stage (the lesion table, the figure and the probabilities included)."""
    source = _volume(tmp_path / "big.nrrd", np.random.default_rng(2).random((48, 48, 48)).astype(np.float32))
    out = tmp_path / "out"
    command = _segment_command(source, out, tiny_bundle_3d)
    command += ["--lesion-table", str(out / "t.csv"), "--figure", str(out / "f.png")]
    code, elapsed, err = _cancel_at(command, stage, signal.SIGTERM)
    assert code == 130, err
    assert elapsed < 2.0
    assert not out.exists() or list(out.iterdir()) == []


def test_cancel_during_one_long_library_call_exits_within_a_second_and_leaves_nothing(tmp_path):
    # A command blocked in one call that no signal interrupts (as sitk.WriteImage of a large volume, or
    # a long ITK filter, is) with an output staged: the cancel must not wait for it.
    script = tmp_path / "blocked.py"
    script.write_text(
        "import sys\n"
        "from pathlib import Path\n"
        "import SimpleITK as sitk\n"
        "from SASSRSegmentLib.commands.runner import run_command\n"
        "from SASSRSegmentLib.io import imageio\n"
        "def run(args):\n"
        "    image = sitk.Image(300, 300, 200, sitk.sitkFloat32)\n"
        "    with imageio.Staging(False) as staging:\n"
        "        staging.path(Path(sys.argv[1]) / 'new' / 'm.nrrd').write_text('half a volume')\n"
        "        print('staged', flush=True)\n"
        "        for _ in range(20):\n"
        "            sitk.DiscreteGaussian(image, 20.0)  # seconds inside ITK, deaf to signals\n"
        "sys.exit(run_command(run, None, in_worker=True))\n"
    )
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "staged"
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
        elapsed = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130 and elapsed < 2.0
    assert process.stderr.read().strip() == "cancelled"
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").rglob("*")) == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_worker_that_dies_of_a_bug_exits_with_status_1_and_its_traceback():
    # Not the user's error: the traceback is the report to file, followed by no second one.
    from SASSRSegmentLib.commands.runner import run_command

    def run(args):
        raise ZeroDivisionError("a bug")

    assert run_command(run, None, in_worker=True) == 1


# ----------------------------------------------------------------------------------------- in-process


def _unreadable(tmp_path):
    path = tmp_path / "bad.nrrd"
    path.write_bytes(b"NRRD0004\nnot really\n")
    return [path], "cannot read"


def _empty_file(tmp_path):
    (tmp_path / "empty.nrrd").write_bytes(b"")
    return [tmp_path / "empty.nrrd"], "is empty (0 bytes)"


def _text_renamed(tmp_path):
    (tmp_path / "notes.nrrd").write_text("patient notes, not an image\n")
    return [tmp_path / "notes.nrrd"], "not an image in a format this tool reads"


def _truncated(tmp_path):
    whole = _volume(tmp_path / "whole.nrrd").read_bytes()
    (tmp_path / "cut.nrrd").write_bytes(whole[: len(whole) // 2])
    return [tmp_path / "cut.nrrd"], "truncated or corrupt"


def _threshold_not_a_number(tmp_path):
    return [_volume(tmp_path / "i.nrrd"), "--threshold", "abc"], "invalid float value: 'abc'"


def _four_d(tmp_path):
    series = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32))] * 3)
    sitk.WriteImage(series, str(tmp_path / "fmri.nii.gz"))
    return [tmp_path / "fmri.nii.gz"], "time series of 3 volumes"


def _empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    return [tmp_path / "empty"], "holds no image"


def _two_d_for_3d(tmp_path):
    return [
        _volume(tmp_path / "i.nrrd", np.zeros((8, 8), np.float32) + np.eye(8, dtype=np.float32))
    ], "2D image but"


def _infinite(tmp_path):
    array = np.random.default_rng(0).random((6, 8, 10)).astype(np.float32)
    array[0, 0, 0] = np.inf
    return [_volume(tmp_path / "i.nrrd", array)], "1 infinite voxel(s)"


def _too_large(tmp_path):
    return [_volume(tmp_path / "i.nrrd"), "--memory-limit", "0.000001"], "--roi"


def _unwritable(tmp_path):
    (tmp_path / "a-file").write_text("x")
    return [_volume(tmp_path / "i.nrrd"), "-o", tmp_path / "a-file" / "m.nrrd"], "cannot write to folder"


def _bad_threshold(tmp_path):
    return [_volume(tmp_path / "i.nrrd"), "--threshold", "1.5"], "--threshold"


def _bad_roi(tmp_path):
    return [_volume(tmp_path / "i.nrrd"), "--roi", "1", "2", "3", "4", "5"], "--roi needs"


def _roi_outside(tmp_path):
    return [
        _volume(tmp_path / "i.nrrd"),
        "--roi",
        "900",
        "901",
        "900",
        "901",
        "900",
        "901",
    ], "does not overlap"


def _unknown_extension(tmp_path):
    return [_volume(tmp_path / "i.nrrd"), "-o", tmp_path / "m.jpg"], "unknown extension"


def _png_for_a_volume(tmp_path):
    return [_volume(tmp_path / "i.nrrd"), "-o", tmp_path / "m.png"], "PNG holds 2D images only"


@pytest.mark.parametrize(
    "make",
    [
        _unreadable,
        _empty_file,
        _text_renamed,
        _truncated,
        _threshold_not_a_number,
        _four_d,
        _empty_folder,
        _two_d_for_3d,
        _infinite,
        _too_large,
        _unwritable,
        _bad_threshold,
        _bad_roi,
        _roi_outside,
    ]
    + [_unknown_extension, _png_for_a_volume],
)
def test_bad_input_in_process(make, tmp_path, tiny_bundle_3d, capsys):
    extra, match = make(tmp_path)
    args = ["segment", *map(str, extra), "--model", str(tiny_bundle_3d), "--quiet"]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out" / "m.nrrd")]
    before = set(tmp_path.rglob("*"))
    rc = cli.main(args)
    _assert_one_line_error(rc, capsys.readouterr().err, match)
    assert set(tmp_path.rglob("*")) - before == set()  # no file, and no output folder made for nothing


def test_missing_weights(tmp_path, tiny_bundle_3d, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_bundle_3d, folder)
    (folder / "model.pt").unlink()
    rc = cli.main(
        ["segment", str(_volume(tmp_path / "i.nrrd")), "-o", str(tmp_path / "m.nrrd"), "--model", str(folder)]
    )
    _assert_one_line_error(rc, capsys.readouterr().err, "weights")
    assert not (tmp_path / "m.nrrd").exists()


def test_constant_image_is_a_warning_not_an_error(tmp_path, tiny_bundle_3d, capsys):
    source = _volume(tmp_path / "flat.nrrd", np.full((6, 8, 10), 3.0, np.float32))
    rc = cli.main(
        ["segment", str(source), "-o", str(tmp_path / "m.nrrd"), "--model", str(tiny_bundle_3d), "--quiet"]
    )
    assert rc == 0
    assert capsys.readouterr().err.startswith("warning: the input image is constant")
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "m.nrrd"))).any()
