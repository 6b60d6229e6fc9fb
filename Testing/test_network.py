"""SASRNet: shapes, eval behaviour, inference cost, gradients, config round trip, ablations, the HR
heads, the space-to-batch dilated convolution, batch norm folded for prediction, and the bundled models."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from SASSRSegmentLib.model.bundle import load_bundle
from SASSRSegmentLib.model.convolutions import atrous_conv
from SASSRSegmentLib.model.folding import fold_batch_norm
from SASSRSegmentLib.model.losses import SASRLoss, affinity_matrix
from SASSRSegmentLib.model.network import (
    ChildFeatures,
    SASRConfig,
    SASRNet,
    SASROutput,
    SDCBlock,
    pixel_shuffle,
)
from SASSRSegmentLib.runtime.devices import cpu_has_native_bf16

MODELS = Path(__file__).resolve().parent.parent / "SASSRSegment" / "Resources" / "Models"

SMALL = (4, 8, 16)
# The options that make a training step cheaper (the fast brain configuration's).
CHEAP = {
    "hr_head": "subpixel",
    "hr_channels": 4,
    "reduce_before_upsampling": True,
    "sdc_squeeze": True,
    "sr_width": 0.5,
    "norm": "batch",
}


def _net(**kw) -> SASRNet:
    kw.setdefault("features", SMALL)
    torch.manual_seed(0)
    return SASRNet(**kw)


@pytest.mark.parametrize("head", ["interpolate", "subpixel"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("scale", [2, 4])
def test_output_shapes_for_odd_sizes(dims, scale, head):
    net = _net(spatial_dims=dims, scale=scale, hr_head=head)
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
        {"hr_head": "subpixel"},
        {"hr_head": "subpixel", "image_sr": False},
        CHEAP,
        {**CHEAP, "sdc": False},
    ],
)
@pytest.mark.parametrize("dims", [2, 3])
def test_every_trainable_parameter_gets_a_gradient(switches, dims):
    net = _net(spatial_dims=dims, **switches).train()
    size = (12, 12, 8)[:dims]
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


@pytest.mark.parametrize("dims", [2, 3])
def test_the_cheap_options_keep_the_outputs_and_shrink_the_training_only_branch(dims):
    """Cheaper training changes where and how wide the decoders compute, never what comes out: the
    same HR shapes for odd sizes, scale maps the SA loss can compare, a narrower image-SR decoder, and a
    decoder stage that reduces its channels on the coarse grid."""
    full, cheap = (
        _net(spatial_dims=dims, features=(8, 16, 32)),
        _net(spatial_dims=dims, features=(8, 16, 32), **CHEAP),
    )
    size = (9, 13, 7)[:dims]
    x = torch.randn(2, 1, *size)
    out = cheap.train()(x)
    hr = tuple(2 * n for n in size)
    assert out.mask.shape == out.image.shape == (2, 1, *hr)
    assert out.seg_features.shape == out.sr_features.shape == (2, 4, *hr)
    assert out.seg_scales.shape == out.sr_scales.shape == full.train()(x).seg_scales.shape
    assert cheap.sr_decoder.widths == [4, 8, 16] and cheap.seg_decoder.widths == [8, 16, 32]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(cheap.sr_decoder) < count(full.sr_decoder) / 3
    assert count(cheap.seg_decoder) < count(full.seg_decoder)
    seen = []
    stage = cheap.seg_decoder.stages[0]
    hook = stage.reduce.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[2:])))
    skips = cheap.encoder(cheap._pad(x)[0])
    stage(skips[-1], skips[-2])
    hook.remove()
    assert seen == [tuple(skips[-1].shape[2:])]  # the coarse grid, not the skip's
    cheap.eval()
    with torch.no_grad():
        assert cheap(x).shape == (2, 1, *hr)


def test_sr_width_must_leave_a_decoder():
    with pytest.raises(ValueError, match="sr_width"):
        SASRConfig(sr_width=0.0)
    with pytest.raises(ValueError, match="sr_width"):
        SASRConfig(sr_width=1.5)


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
        {"hr_head": "transposed"},
        {"hr_channels": 0},
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


def test_pixel_shuffle_is_torchs_in_2d_and_places_every_child_in_3d():
    x = torch.randn(2, 3 * 4, 5, 7)
    assert torch.equal(pixel_shuffle(x, 2), F.pixel_shuffle(x, 2))
    # 3D: channel k of an LR voxel goes to the child at offsets (k // 4, k // 2 % 2, k % 2).
    lr = torch.arange(2 * 8 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 8, 3, 4, 5)
    hr = pixel_shuffle(lr, 2)
    assert hr.shape == (2, 1, 6, 8, 10)
    for k in range(8):
        a, b, c = k // 4, k // 2 % 2, k % 2
        assert torch.equal(hr[:, 0, a::2, b::2, c::2], lr[:, k])
    with pytest.raises(ValueError, match="children"):
        pixel_shuffle(torch.randn(1, 6, 4, 4, 4), 2)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("dilation", [2, 5])
def test_atrous_conv_is_the_dilated_convolution_forward_and_backward(dims, dilation):
    torch.manual_seed(0)
    size = (11, 9, 14)[:dims]  # not multiples of the dilation: padded and cropped back
    conv = F.conv3d if dims == 3 else F.conv2d
    x = torch.randn(2, 3, *size, requires_grad=True)
    w = torch.randn(4, 3, *[3] * dims, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    ref = conv(x, w, b, padding=dilation, dilation=dilation)
    out = atrous_conv(x, w, b, dilation)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)
    grads_ref = torch.autograd.grad(ref.square().sum(), (x, w, b))
    grads = torch.autograd.grad(out.square().sum(), (x, w, b))
    for g, g_ref in zip(grads, grads_ref):
        assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dims", [2, 3])
def test_training_and_eval_paths_of_the_convolutions_agree(dims):
    """Dilated and HR-output convolutions train through their own code and run natively in eval():
    the same network either way."""
    net = _net(spatial_dims=dims, norm="batch")
    x = torch.randn(2, 1, *(10, 12, 8)[:dims])
    net.eval()
    with torch.no_grad():
        ref = net(x)
        for m in net.modules():  # the training path of the convolutions, the eval statistics of the norm
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
                m.train()
        assert torch.allclose(net(x), ref, atol=1e-5)


def _hr_convolutions(net: SASRNet, x: torch.Tensor) -> list[str]:
    """Names of the convolutions other than 1x1 that ran on an HR-sized input."""
    lr_voxels = x[0, 0].numel()
    found = []
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out, n=name: found.append(n) if inp[0][0, 0].numel() > lr_voxels else None
        )
        for name, m in net.named_modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)) and max(m.kernel_size) > 1
    ]
    net(x)
    for h in hooks:
        h.remove()
    return found


def test_subpixel_head_runs_no_convolution_at_hr():
    x = torch.randn(1, 1, 8, 8, 8)
    assert _hr_convolutions(_net(spatial_dims=3, hr_head="subpixel").train(), x) == []
    assert len(_hr_convolutions(_net(spatial_dims=3).train(), x)) == 4  # two HR heads, two convs each


def test_subpixel_head_starts_as_nearest_neighbour_upsampling():
    """ICNR initialisation: the HR children of an LR voxel start equal, so no checkerboard."""
    net = _net(spatial_dims=3, hr_head="subpixel")
    lr = torch.randn(1, net.config.features[0], 6, 6, 6)
    x = torch.randn(1, 1, 6, 6, 6)
    hr = net.seg_hr_head(lr, x).hr()
    assert hr.shape == (1, net.config.hr_channels, 12, 12, 12)
    nearest = hr[:, :, ::2, ::2, ::2].repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    assert torch.allclose(hr, nearest, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_subpixel_features_kept_as_children_are_the_hr_computation(dims, norm):
    """The sub-pixel head keeps HR features as each LR voxel's children; its norm, the 1x1 output
    projection and the affinity pooling must give what the same layers give on the HR grid."""
    torch.manual_seed(0)
    net = _net(spatial_dims=dims, hr_head="subpixel", norm=norm).train()
    x = torch.randn(2, 1, *(12, 16, 8)[:dims])
    out = net(x)
    head = net.seg_hr_head
    feats, _ = net.seg_decoder(net.encoder(x))
    hr = head.act(head.norm(pixel_shuffle(head.conv(feats), 2)))
    assert isinstance(out.seg_features, ChildFeatures)
    assert out.seg_features.shape == hr.shape
    assert torch.allclose(out.seg_features.hr(), hr, atol=1e-5)
    interpolated = F.interpolate(
        net.seg_lr_head(feats), scale_factor=2, mode="bilinear" if dims == 2 else "trilinear"
    )
    assert torch.allclose(out.mask, interpolated + net.seg_hr_logits(hr), atol=1e-5)
    for grid in (4, 3, 5, 64):  # whole LR voxels per bin, and bins that split LR voxels
        assert torch.allclose(affinity_matrix(out.seg_features, grid), affinity_matrix(hr, grid), atol=1e-5)
    cropped = out.seg_features.crop((5, 7, 3)[:dims])
    assert torch.equal(
        cropped.hr(), out.seg_features.hr()[(..., *(slice(0, 2 * n) for n in (5, 7, 3)[:dims]))]
    )


@pytest.mark.parametrize("name", sorted(p.name for p in MODELS.iterdir() if (p / "model.json").is_file()))
def test_bundled_models_load_unchanged(name):
    """Each shipped card loads strictly with the HR head it names; a card that predates the HR-head
    options (the ultrasound model's) gets the interpolating head it was trained with."""
    card = json.loads((MODELS / name / "model.json").read_text())
    _, net = load_bundle(MODELS / name)
    assert net.config.hr_head == card["network"].get("hr_head", "interpolate") and not net.training
    assert net.config.norm == card["network"].get("norm", "instance")
    d = net.config.spatial_dims
    n = 2 * net.stride  # the deepest level sees 2 voxels (instance norm needs more than one)
    x = torch.randn(1, net.config.in_channels, *[n] * d)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (1, 1, *[n * net.config.scale] * d) and torch.isfinite(y).all()


def _randomise_batch_norms(net: SASRNet) -> None:
    """Running statistics and affine parameters far from the identity, as a trained network has."""
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.1)
            m.weight.data.copy_(torch.randn(c, generator=g))
            m.bias.data.copy_(torch.randn(c, generator=g))


@pytest.mark.parametrize("options", [{"hr_head": "interpolate"}, {"hr_head": "subpixel"}, CHEAP])
@pytest.mark.parametrize("dims", [2, 3])
def test_folded_batch_norm_predicts_what_the_network_does(dims, options):
    net = _net(spatial_dims=dims, **{"norm": "batch", **options})
    _randomise_batch_norms(net)
    x = torch.randn(2, 1, *(12, 10, 9)[:dims])
    net.eval()
    with torch.no_grad():
        before, sr_before = net(x), net.super_resolve_image(x)
        fold_batch_norm(net)
        after, sr_after = net(x), net.super_resolve_image(x)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    scale = before.abs().max()
    assert (after - before).abs().max() <= 1e-4 * scale
    assert (sr_after - sr_before).abs().max() <= 1e-4 * sr_before.abs().max()


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("squeeze", [False, True])
def test_sdc_prediction_sums_the_fuse_of_what_training_concatenates(dims, squeeze):
    block = SDCBlock(dims, 6, 4, norm="batch", squeeze=squeeze)
    _randomise_batch_norms(block)
    x = torch.randn(2, 6, *(9, 8, 7)[:dims])
    block.eval()
    with torch.no_grad():
        fused, weights = block(x)
        features = block.squeeze(x) if squeeze else x
        weighted = [branch(features) * weights[:, i : i + 1] for i, branch in enumerate(block.branches)]
        concatenated = block.fuse(torch.cat(weighted, dim=1))
    torch.testing.assert_close(fused, concatenated, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    not cpu_has_native_bf16(),
    reason="this CPU has no native bf16 (AVX512-BF16 or AMX): prediction runs in float32, where oneDNN "
    "leaves a network this small to other kernels",
)
def test_a_3d_network_loaded_for_prediction_on_the_cpu_stays_channels_last(tiny_bundle_3d):
    """A one-channel input has no layout of its own: the weights must carry it through every layer
    (as the CPU runs it, in bf16; in float32 oneDNN leaves a network this small to other kernels)."""
    _, net = load_bundle(tiny_bundle_3d, torch.device("cpu"), for_prediction=True)
    layouts = []
    for module in net.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.register_forward_hook(
                lambda m, i, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last_3d))
            )
    x = torch.randn(1, 1, 16, 16, 16).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        net(x)
    assert layouts and all(layouts)


def test_folding_leaves_instance_norm_and_refuses_a_training_network():
    net = _net(spatial_dims=3, hr_head="subpixel")
    count = sum(isinstance(m, torch.nn.InstanceNorm3d) for m in net.modules())
    fold_batch_norm(net.eval())
    assert count > 0 and sum(isinstance(m, torch.nn.InstanceNorm3d) for m in net.modules()) == count
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norm(_net(spatial_dims=3, norm="batch").train())


def test_scale_maps_are_made_in_training_only():
    net = _net(spatial_dims=3)
    skips = net.encoder(torch.randn(2, 1, 8, 8, 8))
    assert net.seg_decoder.train()(skips)[1].shape == (2, 2 * 4, 8, 8, 8)  # 2 stages x 4 branches
    assert net.seg_decoder.eval()(skips)[1] is None
