"""The scale-aware super-resolution network (SASR), one implementation for 2D and 3D.

A shared encoder feeds two decoders: the lesion-mask SR decoder (segmentation) and the lesion-image SR
decoder (reconstructs the HR image). Both decoders are built from the same stages; with `sdc` their
stages are scale-aware dilated convolution (SDC) blocks whose voxel-wise branch weights ("scale maps")
let the receptive field follow lesion size. The image-SR decoder exists only to shape the segmentation
branch through the feature- and scale-affinity losses during training: `eval()` never runs it.

Each branch reaches the HR grid through an HR head (`hr_head`): "interpolate" (the default, the bundled
models' head) interpolates the LR features x scale and refines them with a double convolution at HR;
"subpixel" predicts every HR child voxel's features at LR with one convolution and puts them in place
with a pixel shuffle, so no convolution runs at HR (in 3D x2 the HR grid has 8x the voxels).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from .convolutions import AtrousConv2d, AtrousConv3d, PointwiseConv2d, PointwiseConv3d

__all__ = ["ChildFeatures", "SASRConfig", "SASRNet", "SASROutput", "pixel_shuffle"]
HR_HEADS = ("interpolate", "subpixel")


@dataclass
class SASRConfig:
    """Everything needed to rebuild a network exactly; stored in the model card."""

    spatial_dims: int = 3
    in_channels: int = 1
    scale: int = 2
    features: tuple[int, ...] = (16, 32, 64, 128)
    norm: str = "instance"
    dropout: float = 0.0
    image_sr: bool = True
    sdc: bool = True
    learned_upsampling: bool = True
    dilations: tuple[int, ...] = (1, 2, 5)
    # softmax makes the branches compete for each voxel (the released code's free sigmoids do not),
    # so the map reads as "which receptive field this voxel uses".
    sdc_weighting: str = "softmax"
    hr_head: str = "interpolate"
    hr_channels: int = 8  # features per HR voxel of a "subpixel" head
    # Training cost (docs/DESIGN.md): a decoder stage's channel-halving convolution runs before the
    # upsampling, on 1/2^d of the voxels; the SDC branches read a 1x1-squeezed input of half the width;
    # the image-SR decoder (training only) has this fraction of the encoder's widths.
    reduce_before_upsampling: bool = False
    sdc_squeeze: bool = False
    sr_width: float = 1.0

    def __post_init__(self) -> None:
        self.features = tuple(int(f) for f in self.features)
        self.dilations = tuple(int(d) for d in self.dilations)
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.scale < 2 or self.scale & (self.scale - 1):
            raise ValueError(f"scale must be a power of two >= 2, got {self.scale}")
        if len(self.features) < 2:
            raise ValueError("features needs at least two encoder widths")
        if self.norm not in ("instance", "batch"):
            raise ValueError(f"norm must be 'instance' or 'batch', got {self.norm!r}")
        if self.sdc_weighting not in ("softmax", "sigmoid"):
            raise ValueError(f"sdc_weighting must be 'softmax' or 'sigmoid', got {self.sdc_weighting!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.hr_head not in HR_HEADS:
            raise ValueError(f"hr_head must be one of {HR_HEADS}, got {self.hr_head!r}")
        if self.hr_channels < 1:
            raise ValueError(f"hr_channels must be >= 1, got {self.hr_channels}")
        if not 0.0 < self.sr_width <= 1.0:
            raise ValueError(f"sr_width must be in (0, 1], got {self.sr_width}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["features"] = list(self.features)
        d["dilations"] = list(self.dilations)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SASRConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown network config keys: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> SASRConfig:
        return cls.from_dict(json.loads(text))


@dataclass
class SASROutput:
    """What `SASRNet.forward` returns in training mode."""

    mask: torch.Tensor  # HR mask logits (B, 1, *HR)
    image: torch.Tensor | None = None  # HR reconstructed image (B, C, *HR) when image_sr
    # HR features of the segmentation / image-SR branch (for FA): a tensor on the HR grid, or
    # `ChildFeatures` from a sub-pixel head.
    seg_features: torch.Tensor | ChildFeatures | None = None
    sr_features: torch.Tensor | ChildFeatures | None = None
    seg_scales: torch.Tensor | None = None  # SDC scale maps of the segmentation decoder (for SA)
    sr_scales: torch.Tensor | None = None  # SDC scale maps of the image-SR decoder (for SA)
    extras: dict = field(default_factory=dict)


def _conv(spatial_dims: int):
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


def _norm(spatial_dims: int, name: str, channels: int) -> nn.Module:
    if name == "batch":
        return (nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d)(channels)
    return (nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d)(channels, affine=True)


def _interpolate(x: torch.Tensor, scale: int | None = None, size=None) -> torch.Tensor:
    mode = "trilinear" if x.dim() == 5 else "bilinear"
    return F.interpolate(x, scale_factor=scale, size=size, mode=mode, align_corners=False)


class ConvNormAct(nn.Sequential):
    """Convolution, normalisation, LeakyReLU; 'same' padding for any dilation."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        dilation: int = 1,
        norm: str = "instance",
    ):
        padding = dilation * (kernel_size // 2)
        conv = _conv(spatial_dims) if dilation == 1 else (AtrousConv3d if spatial_dims == 3 else AtrousConv2d)
        super().__init__(
            conv(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation),
            _norm(spatial_dims, norm, out_channels),
            nn.LeakyReLU(0.01, inplace=True),
        )


class DoubleConv(nn.Sequential):
    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str):
        super().__init__(
            ConvNormAct(spatial_dims, in_channels, out_channels, norm=norm),
            ConvNormAct(spatial_dims, out_channels, out_channels, norm=norm),
        )


class SDCBlock(nn.Module):
    """Scale-aware dilated convolution.

    Parallel branches (a 1x1 conv and 3x3 convs with the given dilations) see the same input; a 3x3 conv
    predicts one weight per branch and voxel. Each branch is multiplied by its weight map, the weighted
    branches are concatenated and fused by a 1x1 conv. Returns the fused features and the weight maps.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        dilations: tuple[int, ...] = (1, 2, 5),
        norm: str = "instance",
        weighting: str = "softmax",
        squeeze: bool = False,
    ):
        super().__init__()
        self.squeeze = (
            ConvNormAct(spatial_dims, in_channels, out_channels, kernel_size=1, norm=norm)
            if squeeze
            else None
        )
        width = out_channels if squeeze else in_channels
        self.branches = nn.ModuleList(
            [ConvNormAct(spatial_dims, width, out_channels, kernel_size=1, norm=norm)]
            + [ConvNormAct(spatial_dims, width, out_channels, dilation=d, norm=norm) for d in dilations]
        )
        self.scale_conv = _conv(spatial_dims)(width, len(self.branches), 3, padding=1)
        self.fuse = ConvNormAct(spatial_dims, out_channels * len(self.branches), out_channels, 1, norm=norm)
        self.weighting = weighting

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.squeeze is not None:
            x = self.squeeze(x)
        logits = self.scale_conv(x)
        weights = torch.softmax(logits, dim=1) if self.weighting == "softmax" else torch.sigmoid(logits)
        if not self.training:
            return self._fuse_summed(x, weights), weights
        weighted = [branch(x) * weights[:, i : i + 1] for i, branch in enumerate(self.branches)]
        return self.fuse(torch.cat(weighted, dim=1)), weights

    def _fuse_summed(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The fuse's 1x1 convolution of the concatenation, as the sum of its slices' convolutions of
        each weighted branch: the same numbers without the concatenation, which on channels-last
        tensors (prediction on CPU) cost more than the convolution it feeds."""
        conv, norm, act = self.fuse
        width = conv.in_channels // len(self.branches)
        weights = weights.to(x.dtype)
        fused = None
        for i, branch in enumerate(self.branches):
            part = conv._conv_forward(
                branch(x) * weights[:, i : i + 1],
                conv.weight[:, i * width : (i + 1) * width],
                conv.bias if i == 0 else None,
            )
            fused = part if fused is None else fused.add_(part)
        return act(norm(fused))


class DecoderStage(nn.Module):
    """Upsample x2 and reduce to `out_channels` (in either order), concatenate the skip, then an SDC
    block or a double conv."""

    def __init__(self, cfg: SASRConfig, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        d = cfg.spatial_dims
        self.reduce = ConvNormAct(d, in_channels, out_channels, norm=cfg.norm)
        self.reduce_first = cfg.reduce_before_upsampling
        width = out_channels + skip_channels
        if cfg.sdc:
            self.block = SDCBlock(
                d, width, out_channels, cfg.dilations, cfg.norm, cfg.sdc_weighting, cfg.sdc_squeeze
            )
        else:
            self.block = DoubleConv(d, width, out_channels, cfg.norm)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.reduce_first:
            x = _interpolate(self.reduce(x), size=skip.shape[2:])
        else:
            x = self.reduce(_interpolate(x, size=skip.shape[2:]))
        x = torch.cat([x, skip], dim=1)
        if isinstance(self.block, SDCBlock):
            x, weights = self.block(x)
        else:
            x, weights = self.block(x), None
        return self.dropout(x), weights


class Encoder(nn.Module):
    def __init__(self, cfg: SASRConfig):
        super().__init__()
        d, feats = cfg.spatial_dims, cfg.features
        self.stages = nn.ModuleList(
            [DoubleConv(d, cfg.in_channels, feats[0], cfg.norm)]
            + [DoubleConv(d, feats[i - 1], feats[i], cfg.norm) for i in range(1, len(feats))]
        )
        self.pool = nn.MaxPool3d(2) if d == 3 else nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for i, stage in enumerate(self.stages):
            x = stage(x if i == 0 else self.pool(x))
            skips.append(x)
        return skips


class Decoder(nn.Module):
    """Decodes encoder features back to LR resolution; returns features and the stacked scale maps.
    `width` scales its own channels (never the encoder skips it reads)."""

    def __init__(self, cfg: SASRConfig, width: float = 1.0):
        super().__init__()
        feats = cfg.features
        self.widths = decoder_widths(feats, width)
        self.stages = nn.ModuleList(
            [
                DecoderStage(
                    cfg, feats[i] if i == len(feats) - 1 else self.widths[i], feats[i - 1], self.widths[i - 1]
                )
                for i in range(len(feats) - 1, 0, -1)
            ]
        )

    def forward(self, skips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = skips[-1]
        maps = []
        for stage, skip in zip(self.stages, reversed(skips[:-1])):
            x, weights = stage(x, skip)
            if weights is not None:
                maps.append(weights)
        # The scale maps feed only the SA loss: at inference bringing them to LR would cost a tenth of
        # the forward pass.
        if not maps or not self.training:
            return x, None
        # Scale maps from every stage, brought to the finest (LR) resolution, one channel per branch.
        size = x.shape[2:]
        return x, torch.cat([_interpolate(m, size=size) for m in maps], dim=1)


def decoder_widths(features: tuple[int, ...], width: float) -> list[int]:
    return [max(1, round(f * width)) for f in features]


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, C * scale^d, *S) -> (B, C, *(S * scale)) for any d; for d = 2 it is `F.pixel_shuffle`.

    Channel c * scale^d + k fills, in every LR voxel, the HR child whose offsets (one per axis, first
    axis slowest) spell k in base `scale`.
    """
    b, c, *size = x.shape
    d = len(size)
    if c % scale**d:
        raise ValueError(f"{c} channels do not divide into scale^{d} = {scale**d} children")
    x = x.reshape(b, c // scale**d, *([scale] * d), *size)
    # (B, C, o_1..o_d, n_1..n_d) -> (B, C, n_1, o_1, ..., n_d, o_d): each offset beside its axis.
    x = x.permute(0, 1, *[a for i in range(d) for a in (2 + d + i, 2 + i)])
    return x.reshape(b, c // scale**d, *(n * scale for n in size))


class HRHead(nn.Module):
    """Lifts LR decoder features to the HR grid (interpolation x scale, then two convs)."""

    def __init__(self, cfg: SASRConfig, channels: int):
        super().__init__()
        self.scale = cfg.scale
        self.out_channels = channels
        self.refine = DoubleConv(cfg.spatial_dims, channels + cfg.in_channels, channels, cfg.norm)

    def forward(self, features: torch.Tensor, x_lr: torch.Tensor) -> torch.Tensor:
        up = _interpolate(features, self.scale)
        # The interpolated input gives the head the intensity edges at HR positions.
        return self.refine(torch.cat([up, _interpolate(x_lr, self.scale)], dim=1))


class ChildFeatures:
    """HR features held as each LR voxel's scale^d children, (B, C * scale^d, *LR) with channel
    c * scale^d + k holding HR channel c of child k: the layout a sub-pixel convolution produces.
    Everything the network and the losses do with them (1x1 projections, pooling) has the same numbers
    in this layout, so the HR grid is never materialised for them: at HR those strided copies and
    broadcast products were half of a 3D training step on CPU."""

    def __init__(self, packed: torch.Tensor, channels: int, scale: int):
        self.packed = packed
        self.channels = channels
        self.scale = scale

    @property
    def shape(self) -> torch.Size:
        b, _, *size = self.packed.shape
        return torch.Size([b, self.channels, *(n * self.scale for n in size)])

    def crop(self, size: tuple[int, ...]) -> ChildFeatures:
        """The HR crop to `size` LR voxels per axis (LR voxel n owns HR children n*scale ...)."""
        return ChildFeatures(self.packed[(..., *(slice(0, n) for n in size))], self.channels, self.scale)

    def hr(self) -> torch.Tensor:
        return pixel_shuffle(self.packed, self.scale)

    def project(self, conv: nn.Module) -> torch.Tensor:
        """`conv` (a 1x1 convolution) applied at HR, returned on the HR grid: the same 1x1 convolution
        for every child, so one convolution at LR whose weight is `conv`'s Kronecker product with the
        identity over the children."""
        b, ck, *size = self.packed.shape
        children = ck // self.channels
        weight = conv.weight.reshape(conv.weight.shape[0], self.channels).to(self.packed.dtype)
        eye = torch.eye(children, dtype=weight.dtype, device=weight.device)
        kernel = torch.kron(weight, eye).view(-1, ck, *[1] * len(size))
        bias = conv.bias.to(weight.dtype).repeat_interleave(children)
        y = (F.conv3d if len(size) == 3 else F.conv2d)(self.packed, kernel, bias)
        return pixel_shuffle(y, self.scale)

    def pooled(self, grid: int) -> torch.Tensor:
        """Adaptive average pooling of the HR features to at most `grid` per axis. Where every pooling
        bin is whole LR voxels it is the children's mean pooled on the LR grid; otherwise the HR grid."""
        b, ck, *size = self.packed.shape
        bins = [min(grid, n * self.scale) for n in size]
        pool = F.adaptive_avg_pool3d if len(size) == 3 else F.adaptive_avg_pool2d
        if all(n % g == 0 for n, g in zip(size, bins)):
            pooled = pool(self.packed, bins).float()
            return pooled.view(b, self.channels, ck // self.channels, *bins).mean(2)
        return pool(self.hr(), bins).float()


class SubpixelHead(nn.Module):
    """Lifts LR decoder features to the HR grid by a sub-pixel convolution (Shi et al., CVPR 2016).

    A 3x3 convolution of the LR features predicts `hr_channels` features for each of an LR voxel's
    scale^d HR children, then norm and LeakyReLU per HR channel; the result stays in the children layout
    (`ChildFeatures`). Unlike the interpolating head it does not take the LR input as well: the encoder
    has seen it, and one channel more (17 instead of 16) made this convolution 1.5x slower on CPU.
    """

    def __init__(self, cfg: SASRConfig, channels: int):
        super().__init__()
        d, children = cfg.spatial_dims, cfg.scale**cfg.spatial_dims
        self.scale = cfg.scale
        self.out_channels = cfg.hr_channels
        self.conv = _conv(d)(channels, cfg.hr_channels * children, 3, padding=1)
        # ICNR (Aitken et al. 2017): every child starts with the same kernel, so the initial output is
        # a nearest-neighbour upsampling, free of the checkerboard a random sub-pixel kernel draws.
        with torch.no_grad():
            weight = self.conv.weight[::children].clone()
            self.conv.weight.copy_(weight.repeat_interleave(children, dim=0))
            self.conv.bias.copy_(self.conv.bias[::children].repeat_interleave(children))
        self.norm = _norm(d, cfg.norm, cfg.hr_channels)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, features: torch.Tensor, x_lr: torch.Tensor) -> ChildFeatures:
        y = self.conv(features)
        if isinstance(self.norm, nn.Identity):  # folded into the convolution (folding.py)
            return ChildFeatures(self.act(y), self.out_channels, self.scale)
        b, _, _, *rest = y.shape
        # Folding the children axis into the first spatial one keeps the norm's statistics those of
        # each HR channel over all HR voxels.
        flat = y.reshape(b, self.out_channels, -1, *rest)
        return ChildFeatures(self.act(self.norm(flat)).view(y.shape), self.out_channels, self.scale)


def hr_project(features: torch.Tensor | ChildFeatures, conv: nn.Module) -> torch.Tensor:
    """A 1x1 output convolution of HR features in either layout."""
    return features.project(conv) if isinstance(features, ChildFeatures) else conv(features)


def hr_crop(features: torch.Tensor | ChildFeatures, size: tuple[int, ...], scale: int):
    if isinstance(features, ChildFeatures):
        return features.crop(size)
    return features[(..., *(slice(0, n * scale) for n in size))]


def _hr_head(cfg: SASRConfig, channels: int) -> nn.Module:
    return SubpixelHead(cfg, channels) if cfg.hr_head == "subpixel" else HRHead(cfg, channels)


def encoder_stride(features) -> int:
    """How much coarser the deepest encoder level is than the input: inputs are padded to a multiple of it."""
    return 2 ** (len(features) - 1)


class SASRNet(nn.Module):
    """Scale-aware super-resolution lesion segmentation network.

    train(): `forward(x)` returns `SASROutput` (HR mask logits, HR image, what FA/SA need).
    eval(): `forward(x)` returns the HR mask logits only; the image-SR decoder is not run.
    `super_resolve_image(x)` returns the HR image when the network has the image-SR branch.
    Inputs of any spatial size are padded to a multiple of the encoder stride and cropped back.
    """

    def __init__(self, config: SASRConfig | None = None, **kwargs):
        super().__init__()
        cfg = config if config is not None else SASRConfig(**kwargs)
        if config is not None and kwargs:
            raise TypeError("pass either a SASRConfig or keyword arguments, not both")
        self.config = cfg
        conv = _conv(cfg.spatial_dims)
        f0 = cfg.features[0]
        self.encoder = Encoder(cfg)
        self.seg_decoder = Decoder(cfg)
        self.seg_lr_head = conv(f0, 1, 1)
        # The HR outputs have one channel (or one per input channel): a channel sum, not a convolution.
        pointwise = PointwiseConv3d if cfg.spatial_dims == 3 else PointwiseConv2d
        self.seg_hr_head = _hr_head(cfg, f0) if cfg.learned_upsampling else None
        self.seg_hr_logits = (
            pointwise(self.seg_hr_head.out_channels, 1, 1) if cfg.learned_upsampling else None
        )
        if cfg.image_sr:
            self.sr_decoder = Decoder(cfg, cfg.sr_width)
            self.sr_hr_head = _hr_head(cfg, self.sr_decoder.widths[0])
            self.sr_out = pointwise(self.sr_hr_head.out_channels, cfg.in_channels, 1)
        else:
            self.sr_decoder = self.sr_hr_head = self.sr_out = None

    @classmethod
    def from_config(cls, config: SASRConfig | dict) -> SASRNet:
        return cls(config if isinstance(config, SASRConfig) else SASRConfig.from_dict(config))

    @property
    def stride(self) -> int:
        return encoder_stride(self.config.features)

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        size = tuple(x.shape[2:])
        if x.dim() != self.config.spatial_dims + 2:
            raise ValueError(
                f"expected a (B, C, {'D, H, W' if self.config.spatial_dims == 3 else 'H, W'}) tensor, "
                f"got shape {tuple(x.shape)}"
            )
        pads = []
        for s in reversed(size):
            pads += [0, (-s) % self.stride]
        # Replicate padding keeps the padded border free of artificial edges.
        return (F.pad(x, pads, mode="replicate") if any(pads) else x), size

    def _crop(self, y: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        s = self.config.scale
        return y[(..., *(slice(0, n * s) for n in size))]

    def _segment(self, x: torch.Tensor, skips: list[torch.Tensor]):
        feats, scales = self.seg_decoder(skips)
        lr_logits = self.seg_lr_head(feats)
        logits = _interpolate(lr_logits, self.config.scale)
        if self.seg_hr_head is not None:
            hr_features = self.seg_hr_head(feats, x)
            # Learned HR detail is a residual on top of interpolated LR logits, so training starts
            # from the interpolation baseline rather than from noise.
            logits = logits + hr_project(hr_features, self.seg_hr_logits)
        else:
            hr_features = _interpolate(feats, self.config.scale)
        return logits, hr_features, scales

    def _image_sr(self, x: torch.Tensor, skips: list[torch.Tensor]):
        feats, scales = self.sr_decoder(skips)
        hr_features = self.sr_hr_head(feats, x)
        image = _interpolate(x, self.config.scale) + hr_project(hr_features, self.sr_out)
        return image, hr_features, scales

    def forward(self, x: torch.Tensor) -> torch.Tensor | SASROutput:
        x, size = self._pad(x)
        skips = self.encoder(x)
        logits, seg_features, seg_scales = self._segment(x, skips)
        if not self.training:
            return self._crop(logits, size)
        out = SASROutput(
            mask=self._crop(logits, size),
            seg_features=hr_crop(seg_features, size, self.config.scale),
            seg_scales=seg_scales,
        )
        if self.sr_decoder is not None:
            image, sr_features, sr_scales = self._image_sr(x, skips)
            out.image = self._crop(image, size)
            out.sr_features = hr_crop(sr_features, size, self.config.scale)
            out.sr_scales = sr_scales
        return out

    @torch.no_grad()
    def super_resolve_image(self, x: torch.Tensor) -> torch.Tensor:
        """HR image reconstructed by the image-SR decoder (only run when asked for)."""
        if self.sr_decoder is None:
            raise RuntimeError("this network was built without the image-SR branch (image_sr=False)")
        x, size = self._pad(x)
        image, _, _ = self._image_sr(x, self.encoder(x))
        return self._crop(image, size)
