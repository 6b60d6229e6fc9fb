"""Training patches: lesion-centred, size-balanced sampling at HR, augmentation, and LR synthesis.

A patch is cut from the cached HR working image (`patch_size_lr * scale` voxels); its LR network input is
made of the augmented HR patch, by block averaging (`lr_from_hr`, in the training loop) or, with a
`Degradation`, by one of the random ways real LR images are made (degrade.py, here), so input and
targets cover exactly the same physical extent whatever the augmentation. With probability `p_fg` a patch is centred on a lesion: a
case with lesions is drawn, then one of its connected lesions uniformly, so a 20-voxel metastasis is
sampled as often as the 50 mL tumour next to it.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .cache import Cache
from .degrade import Degradation, Scan
from .normalization import erode, smooth


@dataclass
class Augmentation:
    """Augmentation switches and ranges (numpy axis order: z, y, x or y, x)."""

    flip_axes: Sequence[int] = ()  # each flipped with probability 1/2
    rot90: bool = False  # 90-degree rotations in the last two axes (the axial / image plane)
    p_intensity: float = 0.5
    intensity_scale: Sequence[float] = (0.75, 1.25)
    intensity_shift: float = 0.1  # standard deviation, in normalised units
    p_gamma: float = 0.3
    gamma: Sequence[float] = (0.7, 1.5)
    p_affine: float = 0.0
    affine_degrees: float = 15.0
    affine_scale: Sequence[float] = (0.85, 1.15)
    p_lesion_fade: float = 0.0
    lesion_fade: Sequence[float] = (0.3, 1.0)  # the share of the lesion's contrast it keeps


@dataclass
class PatchSampler:
    """Draws (HR image float32 (C, *P), HR mask uint8 (*P)) patches from a cache with a numpy Generator."""

    cache: Cache
    names: Sequence[str]
    patch_size: Sequence[int]  # HR voxels
    p_fg: float = 0.5
    augmentation: Augmentation = field(default_factory=Augmentation)
    min_lesion_voxels: int | None = None  # smaller specks are not sampled as lesions; None: one LR voxel
    degradation: Degradation | None = None  # None: the LR input is the block average, made later

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.names = list(self.names)
        if not self.names:
            raise ValueError("no training cases")
        if self.min_lesion_voxels is None:
            self.min_lesion_voxels = int(self.cache.prep["scale"]) ** len(self.patch_size)
        # Label noise (1-voxel islands) would otherwise outnumber the real lesions they sit beside;
        # a case whose lesions are all specks keeps its largest one.
        self.components = {}
        for name in self.names:
            found = self.cache.cases[name]["components"]
            kept = [c for c in found if c["size"] >= self.min_lesion_voxels] or found[:1]
            if kept:
                self.components[name] = kept
        self.lesion_cases = sorted(self.components)
        if self.augmentation.rot90 and self.patch_size[-1] != self.patch_size[-2]:
            raise ValueError(f"rot90 needs a square patch in the last two axes, got {self.patch_size}")
        self._scans: dict[str, Scan | None] = {}

    def _tissue(self, name: str, image: np.ndarray) -> np.ndarray:
        """Where any channel of `image` (C, *spatial), normalised, differs from the case's background."""
        background = self.cache.background(name).reshape(-1, *([1] * (image.ndim - 1)))
        return np.any(image != background, axis=0)

    def _scan(self, name: str) -> Scan | None:
        """The whole normalised case, kept (a brain is about 40 MB): the MRI LR synthesis takes the
        normaliser's statistics from the whole scan, not from the patch."""
        if name not in self._scans:
            image = self.cache.normalized(np.asarray(self.cache.image(name)))
            self._scans[name] = Scan.of(image, self._tissue(name, image))
        return self._scans[name]

    # -- where
    def _centre(self, rng: np.random.Generator) -> tuple[str, np.ndarray | None]:
        if self.lesion_cases and rng.random() < self.p_fg:
            name = self.lesion_cases[rng.integers(len(self.lesion_cases))]
            components = self.components[name]
            comp = components[rng.integers(len(components))]
            lo, hi = np.asarray(comp["box"][0]), np.asarray(comp["box"][1])
            seg = self.cache.seg(name)
            for _ in range(8):  # a random lesion voxel, found by rejection inside the lesion's box
                point = lo + (rng.random(lo.size) * (hi - lo)).astype(int)
                if seg[tuple(point)]:
                    return name, point
            return name, np.round(comp["centroid"]).astype(int)
        return self.names[rng.integers(len(self.names))], None

    def _region_start(self, rng, shape, extent, centre) -> np.ndarray:
        extent = np.asarray(extent)
        shape = np.asarray(shape)
        if centre is None:
            lo, hi = np.minimum(0, shape - extent), np.maximum(0, shape - extent)
            return lo + (rng.random(len(shape)) * (hi - lo + 1)).astype(int)
        # Not always dead centre: the lesion lands anywhere in the middle half of the patch.
        jitter = (rng.random(len(shape)) - 0.5) * (np.asarray(self.patch_size) // 2)
        return np.round(centre - extent // 2 + jitter).astype(int)

    def _crop(self, name: str, start, extent) -> tuple[np.ndarray, np.ndarray]:
        """Crop [start, start+extent) of image and mask, padding outside with the case's background."""
        image, seg = self.cache.image(name), self.cache.seg(name)
        shape = seg.shape
        src = tuple(slice(max(0, s), min(n, s + e)) for s, e, n in zip(start, extent, shape))
        dst = tuple(slice(a.start - s, a.stop - s) for a, s in zip(src, start))
        out_img = np.empty((image.shape[0], *extent), dtype=np.float32)
        out_img[:] = self.cache.background(name).reshape(-1, *([1] * len(extent)))
        out_seg = np.zeros(tuple(extent), dtype=np.uint8)
        out_img[(slice(None), *dst)] = self.cache.normalized(image[(slice(None), *src)])
        out_seg[dst] = seg[src]
        return out_img, out_seg

    # -- what
    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """(HR image, HR mask), and the LR input last when there is a `degradation`."""
        aug = self.augmentation
        name, centre = self._centre(rng)
        shape = self.cache.seg(name).shape
        matrix = None
        extent = np.asarray(self.patch_size)
        if aug.p_affine > 0 and rng.random() < aug.p_affine:
            matrix = _random_affine(rng, len(extent), aug.affine_degrees, aug.affine_scale)
            # The input region that the rotated/scaled patch reads from.
            corners = np.array(np.meshgrid(*[[-0.5, 0.5]] * len(extent), indexing="ij")).reshape(
                len(extent), -1
            )
            reach = np.abs(matrix @ (corners * extent[:, None])).max(axis=1)
            extent = np.ceil(2 * reach).astype(int) + 2
        start = self._region_start(rng, shape, extent, centre)
        image, seg = self._crop(name, start, extent)
        if matrix is not None:
            image, seg = _warp(image, seg, matrix, self.patch_size)
        for axis in aug.flip_axes:
            if rng.random() < 0.5:
                image, seg = np.flip(image, axis + 1), np.flip(seg, axis)
        if aug.rot90:
            k = int(rng.integers(4))
            image, seg = np.rot90(image, k, axes=(-2, -1)), np.rot90(seg, k, axes=(-2, -1))
        image = np.ascontiguousarray(image)
        tissue = None
        if self.degradation is not None and self.degradation.kind == "mri":
            # Before the intensity augmentation moves the background off its value.
            tissue = self._tissue(name, image)
        if aug.p_lesion_fade > 0 and rng.random() < aug.p_lesion_fade:
            where = self._tissue(name, image) if tissue is None else tissue
            image = fade_lesion(image, seg, where, rng.uniform(*aug.lesion_fade))
        if aug.p_intensity > 0:
            for c in range(image.shape[0]):
                if rng.random() < aug.p_intensity:
                    image[c] *= rng.uniform(*aug.intensity_scale)
                    image[c] += rng.normal(0.0, aug.intensity_shift)
                if rng.random() < aug.p_gamma:
                    image[c] = _gamma(image[c], rng.uniform(*aug.gamma))
        seg = np.ascontiguousarray(seg)
        if self.degradation is None:
            return image, seg
        scale = int(self.cache.prep["scale"])
        scan = self._scan(name) if tissue is not None else None
        return image, seg, self.degradation.apply(image, scale, rng, tissue, scan)

    def batch(self, rng: np.random.Generator, size: int) -> tuple[torch.Tensor, ...]:
        """(HR images (B, C, *P) float32, HR masks (B, 1, *P) float32[, LR inputs]), sampled here."""
        parts = [np.stack(part) for part in zip(*[self.sample(rng) for _ in range(size)])]
        parts[1] = parts[1][:, None].astype(np.float32)
        return tuple(torch.from_numpy(p) for p in parts)


def _random_affine(rng: np.random.Generator, dims: int, degrees: float, scale: Sequence[float]) -> np.ndarray:
    """Output-to-input voxel offset map: rotation (in-plane for 2D, about each axis for 3D) times zoom."""

    def rot(a, i, j):
        m = np.eye(dims)
        m[i, i] = m[j, j] = math.cos(a)
        m[i, j], m[j, i] = -math.sin(a), math.sin(a)
        return m

    planes = [(0, 1)] if dims == 2 else [(1, 2), (0, 2), (0, 1)]
    matrix = np.eye(dims)
    for i, j in planes:
        matrix = matrix @ rot(math.radians(rng.uniform(-degrees, degrees)), i, j)
    return matrix / rng.uniform(*scale)


def _warp(image: np.ndarray, seg: np.ndarray, matrix: np.ndarray, out_size: Sequence[int]):
    """Resample the centre of (image, seg) with `matrix` (linear; the mask's indicator thresholded at 0.5)."""
    extent = np.asarray(image.shape[1:], dtype=float)
    out = np.asarray(out_size, dtype=float)
    # grid_sample wants (x, y[, z]) order and normalised coordinates (align_corners=False).
    theta = np.diag(1 / extent) @ matrix @ np.diag(out)
    theta = torch.from_numpy(theta[::-1, ::-1].astype(np.float32))
    # The sampling grid by hand: F.affine_grid does the same but takes ~40 ms for a 320^2 patch on CPU.
    axes = [torch.linspace(-1 + 1 / n, 1 - 1 / n, n) for n in out_size]
    xyz = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], dim=-1)
    grid = (xyz @ theta.T)[None]
    stack = torch.from_numpy(np.concatenate([image, seg[None].astype(np.float32)]))[None]
    warped = F.grid_sample(stack, grid, mode="bilinear", padding_mode="border", align_corners=False)[
        0
    ].numpy()
    return warped[:-1], (warped[-1] >= 0.5).astype(np.uint8)


def fade_lesion(image: np.ndarray, seg: np.ndarray, tissue: np.ndarray, keep: float) -> np.ndarray:
    """`image` (C, *P) with the lesion's contrast to the patch's healthy tissue scaled by `keep`.

    The hard validation cases are the faintest lesions (docs/models.md): this shows the network faint
    versions of every training lesion under the same label. Background and tissue more than four voxels
    from the lesion keep their values.
    """
    lesion = seg > 0
    healthy = tissue & ~lesion
    if not lesion.any() or np.count_nonzero(healthy) < 64:
        return image
    # The label grown by two voxels, then smoothed: the partial-volume voxels just outside it fade with
    # the lesion (else they would stay as a bright rim) and the fade is gone four voxels out. Healthy
    # tissue inside that margin barely moves, as it sits near the reference already.
    grown = ~erode(erode(~lesion))
    weight = smooth(grown) * tissue
    out = image.copy()
    for c in range(image.shape[0]):
        reference = float(np.median(image[c][healthy]))
        out[c] -= (1.0 - keep) * weight * (image[c] - reference)
    return out


def _gamma(channel: np.ndarray, gamma: float) -> np.ndarray:
    """Gamma on the patch's own range (nnU-Net style), keeping its min and max."""
    lo, hi = float(channel.min()), float(channel.max())
    if hi - lo < 1e-6:
        return channel
    return ((channel - lo) / (hi - lo)) ** gamma * (hi - lo) + lo


def lr_from_hr(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """LR input of an HR batch (B, C, *spatial): mean over scale^d blocks, as `geometry.downsample_block`."""
    pool = F.avg_pool3d if hr.dim() == 5 else F.avg_pool2d
    return pool(hr, kernel_size=scale, stride=scale)


class PatchStream(IterableDataset):
    """An endless stream of samples; every (seed, rank, worker) gets its own random stream."""

    def __init__(self, sampler: PatchSampler, seed: int, rank: int = 0):
        super().__init__()
        self.sampler, self.seed, self.rank = sampler, seed, rank

    def __iter__(self) -> Iterator[tuple[np.ndarray, ...]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng([self.seed, self.rank, worker])
        while True:
            image, seg, *lr = self.sampler.sample(rng)
            yield (image, seg[None].astype(np.float32), *lr)


def _worker_init(_: int) -> None:
    # Ctrl-C goes to the whole process group; the main process alone decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def batches(
    sampler: PatchSampler, batch_size: int, workers: int, seed: int, rank: int = 0, pin_memory: bool = False
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless (HR image, HR mask[, LR input]) batches, from `workers` loader processes or (0) this
    process."""
    if workers <= 0:
        rng = np.random.default_rng([seed, rank, 1 << 20])
        while True:
            yield sampler.batch(rng, batch_size)
    loader = DataLoader(
        PatchStream(sampler, seed, rank),
        batch_size=batch_size,
        num_workers=workers,
        worker_init_fn=_worker_init,
        pin_memory=pin_memory,
        persistent_workers=True,
        prefetch_factor=4,
    )
    yield from loader
