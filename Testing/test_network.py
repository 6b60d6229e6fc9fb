"""SASRNet: shapes, eval behaviour, inference cost, gradients, config round trip, ablations."""

import json

import pytest
import torch

from SASSRSegmentLib.losses import SASRLoss
from SASSRSegmentLib.network import SASRConfig, SASRNet, SASROutput

SMALL = (4, 8, 16)


def _net(**kw) -> SASRNet:
    kw.setdefault("features", SMALL)
    torch.manual_seed(0)
    return SASRNet(**kw)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("scale", [2, 4])
def test_output_shapes_for_odd_sizes(dims, scale):
    net = _net(spatial_dims=dims, scale=scale)
    size = (9, 13, 7)[:dims]
    x = torch.randn(2, 1, *size)
    net.train()
    out = net(x)
    hr = tuple(s * scale for s in size)
    assert isinstance(out, SASROutput)
    assert out.mask.shape == (2, 1, *hr)
    assert out.image.shape == (2, 1, *hr)
    assert out.seg_features.shape[2:] == hr and out.sr_features.shape[2:] == hr
    assert out.seg_scales.shape == out.sr_scales.shape
    net.eval()
    with torch.no_grad():
        y = net(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 1, *hr)


def test_eval_is_deterministic_with_dropout():
    net = _net(spatial_dims=2, dropout=0.3).eval()
    x = torch.randn(3, 1, 20, 24)
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
        # A sample's output does not depend on its batch neighbours.
        assert torch.allclose(net(x)[1:2], net(x[1:2]), atol=1e-5)


def _calls(net: SASRNet, x: torch.Tensor) -> dict[str, int]:
    counts = {"sr_decoder": 0, "sr_hr_head": 0, "sr_out": 0}
    hooks = [
        getattr(net, name).register_forward_hook(lambda *_, n=name: counts.__setitem__(n, counts[n] + 1))
        for name in counts
    ]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return counts


def test_image_sr_decoder_costs_nothing_at_inference():
    net = _net(spatial_dims=3)
    x = torch.randn(1, 1, 8, 8, 8)
    assert all(v == 0 for v in _calls(net.eval(), x).values())
    assert all(v == 1 for v in _calls(net.train(), x).values())
    sr = net.eval().super_resolve_image(x)
    assert sr.shape == (1, 1, 16, 16, 16)
    # Same eval cost (parameters touched) as a network built without the branch.
    plain = _net(spatial_dims=3, image_sr=False).eval()
    with torch.no_grad():
        assert net(x).shape == plain(x).shape
    with pytest.raises(RuntimeError, match="image_sr=False"):
        plain.super_resolve_image(x)


@pytest.mark.parametrize(
    "switches",
    [
        {},
        {"image_sr": False},
        {"sdc": False},
        {"learned_upsampling": False},
        {"image_sr": False, "sdc": False, "learned_upsampling": False},
        {"sdc_weighting": "sigmoid"},
        {"norm": "batch"},
    ],
)
@pytest.mark.parametrize("dims", [2, 3])
def test_every_trainable_parameter_gets_a_gradient(switches, dims):
    net = _net(spatial_dims=dims, **switches).train()
    size = (12, 12, 12)[:dims]
    x = torch.randn(2, 1, *size)
    hr = tuple(s * 2 for s in size)
    mask = (torch.rand(2, 1, *hr) > 0.7).float()
    image = torch.randn(2, 1, *hr)
    loss, terms = SASRLoss()(net(x), mask, image)
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"parameters without gradient: {missing}"
    assert ("rec" in terms) == net.config.image_sr
    assert ("sa" in terms) == (net.config.image_sr and net.config.sdc)


def test_config_json_round_trip_rebuilds_the_same_network():
    cfg = SASRConfig(spatial_dims=2, scale=4, features=(8, 16, 32), dropout=0.1, sdc=False, dilations=(1, 3))
    again = SASRConfig.from_json(json.dumps(json.loads(cfg.to_json())))
    assert again == cfg
    a, b = SASRNet.from_config(cfg), SASRNet.from_config(again.to_dict())
    assert [k for k in a.state_dict()] == [k for k in b.state_dict()]
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize(
    "bad",
    [
        {"spatial_dims": 4},
        {"scale": 3},
        {"features": (8,)},
        {"norm": "layer"},
        {"dropout": 1.0},
        {"depth": 3},
    ],
)
def test_bad_configs_are_rejected(bad):
    with pytest.raises((ValueError, TypeError)):
        SASRConfig.from_dict(bad)


def test_channels_last_and_bf16_autocast_match_fp32():
    net = _net(spatial_dims=3).eval()
    x = torch.randn(1, 1, 12, 12, 12)
    with torch.no_grad():
        ref = net(x)
        cl = net.to(memory_format=torch.channels_last_3d)(x.to(memory_format=torch.channels_last_3d))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x)
    assert torch.allclose(ref, cl, atol=1e-4)
    assert low.shape == ref.shape and torch.isfinite(low).all()
    assert (torch.sigmoid(low.float()) - torch.sigmoid(ref)).abs().max() < 0.1


def test_wrong_input_rank_is_a_clear_error():
    net = _net(spatial_dims=3)
    with pytest.raises(ValueError, match="expected a"):
        net(torch.randn(1, 1, 8, 8))
