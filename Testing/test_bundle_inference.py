"""Model bundles (save, load, checksum) and sliding-window inference."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from SASSRSegmentLib.inference.windows import gaussian_importance, sliding_window_predict, window_starts
from SASSRSegmentLib.model.bundle import bundled_models, load_bundle, resolve_model, save_bundle
from SASSRSegmentLib.model.network import SASRConfig, SASRNet
from SASSRSegmentLib.runtime import devices
from SASSRSegmentLib.runtime.errors import UserError

PREP_2D = {"spatial_dims": 2, "scale": 2, "lr_longer_side": 32, "normalization": {"kind": "uint8"}}


def _tiny(dims=2) -> SASRNet:
    torch.manual_seed(0)
    return SASRNet(SASRConfig(spatial_dims=dims, features=(4, 8, 16)))


def test_bundle_round_trip_and_fp16_weights(tmp_path):
    net = _tiny()
    save_bundle(tmp_path / "m", net, {"name": "tiny", "preprocessing": PREP_2D})
    state = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    card, loaded = load_bundle(tmp_path / "m")
    assert card["network"] == net.config.to_dict() and not loaded.training
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), loaded(x), atol=5e-2)


def test_corrupted_or_missing_weights_are_user_errors(tmp_path):
    save_bundle(tmp_path / "m", _tiny(), {"preprocessing": PREP_2D})
    weights = tmp_path / "m" / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupted"):
        load_bundle(tmp_path / "m")
    weights.unlink()
    with pytest.raises(UserError, match="missing"):
        load_bundle(tmp_path / "m")
    with pytest.raises(UserError, match="unknown model"):
        resolve_model("no-such-model", models_dir=tmp_path / "none")


def test_bundled_models_lists_only_bundle_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "model.json").write_text(
        json.dumps({"network": {}, "preprocessing": {"spatial_dims": 3}})
    )
    (tmp_path / "junk").mkdir()
    assert list(bundled_models(tmp_path)) == ["a"]
    assert resolve_model(None, spatial_dims=3, models_dir=tmp_path) == tmp_path / "a"
    with pytest.raises(UserError, match="no bundled 2D"):
        resolve_model(None, spatial_dims=2, models_dir=tmp_path)


def test_window_starts_cover_the_axis():
    for size, window in [(10, 4), (64, 32), (33, 32), (5, 8)]:
        starts = window_starts(size, window, 0.5)
        covered = set()
        for s in starts:
            covered |= set(range(s, min(size, s + window)))
        assert covered == set(range(size)) and starts[0] == 0


def test_gaussian_importance_peaks_in_the_centre():
    w = gaussian_importance((9, 9))
    assert w[4, 4] == w.max() and w[0, 0] > 0


class _PointwiseUpsampler(torch.nn.Module):
    """A voxel-wise 'network': any tiling must reproduce its whole-image output exactly."""

    def forward(self, x):
        return torch.nn.functional.interpolate(x * 4 - 2, scale_factor=2, mode="nearest")


@pytest.mark.parametrize("dims", [2, 3])
def test_sliding_window_stitches_tiles_exactly(dims):
    net = _PointwiseUpsampler()
    size = (20, 24, 16)[:dims]
    lr = torch.rand(1, *size)
    whole = torch.sigmoid(net(lr[None]))[0, 0]
    tiled = sliding_window_predict(net, lr, (16,) * dims, scale=2, batch_size=3, device=torch.device("cpu"))
    assert tiled.shape == tuple(s * 2 for s in size)
    assert torch.allclose(tiled, whole, atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_sliding_window_with_a_real_network_and_small_image(dims):
    net = _tiny(dims).eval()
    lr = torch.rand(1, *(12, 10, 6)[:dims])
    with torch.no_grad():
        whole = torch.sigmoid(net(lr[None]))[0, 0]
    # A window larger than the image shrinks to it: one pass, same result as the plain forward.
    single = sliding_window_predict(net, lr, window_lr=(64,) * dims, scale=2, amp=False)
    assert torch.allclose(single, whole, atol=1e-5)
    # Mixed precision (bf16 on CPUs that have it) changes probabilities only slightly.
    mixed = sliding_window_predict(net, lr, window_lr=(64,) * dims, scale=2, amp=True)
    assert (mixed - whole).abs().max() < 0.05


def test_mps_autocast_only_where_torch_has_it():
    # torch 2.1-2.4 raise on torch.autocast("mps"); Slicer keeps whatever torch another extension installed.
    assert not devices.mps_autocast_supported("2.4.1")
    assert not devices.mps_autocast_supported("2.1.0+cpu")
    assert devices.mps_autocast_supported("2.5.0")
    assert devices.mps_autocast_supported("2.13.0+cpu")
    assert devices.mps_autocast_supported("3.0.0a0")


def test_a_cuda_device_that_is_not_there_is_one_line(monkeypatch):
    # On a machine with one GPU, "cuda:3" or "cudafoo" had reached torch and failed in its words.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices.select_device("CUDA:0") == torch.device("cuda:0")
    with pytest.raises(
        UserError, match=r"--device cuda:3: this machine has 1 CUDA GPU\(s\), cuda:0 to cuda:0"
    ):
        devices.select_device("cuda:3")
    with pytest.raises(UserError, match=r"unknown device 'cudafoo'; use auto, cpu, cuda, cuda:N or mps"):
        devices.select_device("cudafoo")


def test_engine_asks_torch_for_the_mps_cpu_fallback_in_its_own_process_only():
    """The engine's command line sets it before torch is imported; importing the package (as Slicer does
    for the model cards) leaves the host process's environment alone."""
    script = (
        "import os; import SASSRSegmentLib.model.bundle; "
        "assert 'PYTORCH_ENABLE_MPS_FALLBACK' not in os.environ; "
        "from SASSRSegmentLib import cli; code = cli.main(['models']); "
        "print(os.environ['PYTORCH_ENABLE_MPS_FALLBACK'], code)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_ENABLE_MPS_FALLBACK"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent / "SASSRSegment")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["1", "0"]


def test_autocast_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    with devices.autocast(cpu):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    with devices.autocast(cpu):
        assert not torch.is_autocast_enabled("cpu")
    with devices.autocast(cpu, enabled=False):
        assert not torch.is_autocast_enabled("cpu")


def test_tta_and_progress_and_cancel():
    net = _tiny(2).eval()
    lr = torch.rand(1, 24, 24)
    seen = []
    out = sliding_window_predict(net, lr, (16, 16), 2, tta=True, progress=seen.append)
    assert out.shape == (48, 48) and seen[-1] == 1.0 and seen == sorted(seen)

    def cancel(_fraction):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sliding_window_predict(net, lr, (8, 8), 2, batch_size=1, progress=cancel)


@pytest.mark.parametrize("dims", [2, 3])
def test_streamed_slabs_reassemble_the_whole_prediction(dims):
    net = _tiny(dims).eval()
    lr = torch.rand(1, *(40, 12, 10)[:dims])
    whole = sliding_window_predict(net, lr, (16,) * dims, scale=2, amp=False)
    slabs = []
    returned = sliding_window_predict(
        net, lr, (16,) * dims, scale=2, amp=False, sink=lambda row, block: slabs.append((row, block.clone()))
    )
    assert returned is None
    rows = [row for row, _ in slabs]
    assert rows[0] == 0 and all(b.shape[1] <= 32 for _, b in slabs)  # at most one HR window deep
    ends = [row + block.shape[1] for row, block in slabs]
    assert rows[1:] == ends[:-1] and ends[-1] == 80  # in order, with no gap or overlap
    assert torch.allclose(torch.cat([b for _, b in slabs], dim=1)[0], whole, atol=1e-6)
    assert len(slabs) > 2


@pytest.mark.parametrize("dims", [2, 3])
def test_a_support_box_is_predicted_alone_and_the_rest_is_probability_zero(dims):
    net = _PointwiseUpsampler()  # voxel-wise: inside the box the crop's prediction is the whole image's
    lr = torch.rand(1, *(40, 14, 12)[:dims])
    box = (slice(21, 33), slice(3, 11), slice(0, 12))[:dims]
    cpu = torch.device("cpu")
    whole = sliding_window_predict(net, lr, (16,) * dims, scale=2, device=cpu)
    slabs = []
    sliding_window_predict(
        net,
        lr,
        (16,) * dims,
        2,
        device=cpu,
        support=box,
        sink=lambda row, block: slabs.append((row, block.clone())),
    )
    rows = [row for row, _ in slabs]
    ends = [row + block.shape[1] for row, block in slabs]
    assert rows[0] == 0 and rows[1:] == ends[:-1] and ends[-1] == 80  # every HR row once, in order
    assert all(b.shape[1] <= 32 and b.shape[2:] == whole.shape[1:] for _, b in slabs)
    out = torch.cat([b for _, b in slabs], dim=1)[0]
    inside = tuple(slice(2 * b.start, 2 * b.stop) for b in box)
    assert torch.allclose(out[inside], whole[inside], atol=1e-6)
    outside = torch.ones_like(out, dtype=torch.bool)
    outside[inside] = False
    assert out[outside].eq(0).all() and whole[outside].gt(0).all()
    returned = sliding_window_predict(
        net, lr, (16,) * dims, 2, device=cpu, support=box
    )  # no sink: the whole volume
    assert torch.equal(returned, out)
    with pytest.raises(ValueError):
        sliding_window_predict(net, lr, (16,) * dims, 2, device=cpu, support=box, output="image")
