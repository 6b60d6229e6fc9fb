"""Write a volume as one Enhanced MR DICOM file (every frame in one file, as current scanners send), with
the frames' positions as given: the tests' stand-in for pydicom, which is no dependency of this project.

Explicit or implicit VR little endian, defined lengths; the elements GDCM needs to read the file as a
volume (the shared pixel measures and plane orientation, one plane position per frame), and on request
the other places real files write a position or pixel data: a vendor's private per-frame copy of the
position (Philips), an icon image before the functional groups, a position shared by every frame.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
_LONG_VRS = {"OB", "OW", "SQ", "UN", "UT"}


_IMPLICIT = False  # set by write_enhanced_mr for the data set it writes


def _element(group: int, element: int, vr: str, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr in ("UI", "OB") else b" "
    if _IMPLICIT and group != 0x0002:
        return struct.pack("<HHI", group, element, len(value)) + value
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, element, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr.encode(), len(value)) + value


def _sequence(group: int, element: int, items: list[bytes]) -> bytes:
    body = b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, len(item)) + item for item in items)
    return _element(group, element, "SQ", body)


def _decimals(values, digits: int) -> bytes:
    return "\\".join(f"{v:.{digits}f}" for v in values).encode()


def write_enhanced_mr(
    path: Path,
    frames: np.ndarray,
    spacing: tuple[float, float],
    orientation: np.ndarray,
    positions: list[np.ndarray],
    implicit: bool = False,
    instance_uid: str = "1.2.3.4.5.6.7.1",
    **options,
) -> Path:
    """`frames` (n, rows, columns) uint16 as stored; `spacing` (between columns, between rows) in mm;
    `orientation` the row and column directions (6 numbers; None: none written); `positions` each
    frame's first voxel, or one position shared by every frame; `instance_uid` tells apart the files of
    a series split over several; `options` those of `_data_set`."""
    global _IMPLICIT
    _IMPLICIT = implicit
    try:
        dataset = _data_set(frames, spacing, orientation, positions, instance_uid, **options)
    finally:
        _IMPLICIT = False
    syntax = b"1.2.840.10008.1.2" if implicit else b"1.2.840.10008.1.2.1"
    meta = b"".join(
        [
            _element(0x0002, 0x0001, "OB", b"\x00\x01"),
            _element(0x0002, 0x0002, "UI", ENHANCED_MR.encode()),
            _element(0x0002, 0x0003, "UI", instance_uid.encode()),
            _element(0x0002, 0x0010, "UI", syntax),
            _element(0x0002, 0x0012, "UI", b"1.2.3.4.5.6.7.9"),
        ]
    )
    header = b"\x00" * 128 + b"DICM" + _element(0x0002, 0x0000, "UL", struct.pack("<I", len(meta))) + meta
    path.write_bytes(header + dataset)
    return path


def _data_set(
    frames: np.ndarray,
    spacing: tuple[float, float],
    orientation: np.ndarray,
    positions: list[np.ndarray],
    instance_uid: str,
    digits: int = 5,
    private_copy: bool = False,
    icon: bool = False,
    unplaced: tuple[int, ...] = (),
    frame_orientation: np.ndarray | None = None,
) -> bytes:
    """Positions written with `digits` decimals; `private_copy`: Philips' private copy of each; `icon`: an
    icon image before the groups; the `unplaced` frames' positions are left out; `frame_orientation`:
    every frame's own orientation, beside the shared one."""
    us = lambda v: struct.pack("<H", v)  # noqa: E731
    n, rows, columns = frames.shape
    position = lambda p: _element(0x0020, 0x0032, "DS", _decimals(p, digits))  # noqa: E731
    shared = b"" if len(positions) == n else _sequence(0x0020, 0x9113, [position(positions[0])])
    if orientation is not None:
        shared += _sequence(0x0020, 0x9116, [_element(0x0020, 0x0037, "DS", _decimals(orientation, 8))])
    measures = _element(0x0018, 0x0050, "DS", b"1") + _element(
        0x0028, 0x0030, "DS", _decimals(spacing[::-1], 6)
    )
    shared += _sequence(0x0028, 0x9110, [measures])
    per_frame = []
    for k in range(n):
        # A frame's content (its stack position) always; its own plane position unless one is shared.
        item = _sequence(0x0020, 0x9111, [_element(0x0020, 0x9057, "UL", struct.pack("<I", k + 1))])
        if len(positions) == n and k not in unplaced:
            item += _sequence(0x0020, 0x9113, [position(positions[k])])
        if frame_orientation is not None:  # each frame's own, in place of the shared one
            item += _sequence(
                0x0020, 0x9116, [_element(0x0020, 0x0037, "DS", _decimals(frame_orientation, 8))]
            )
        if private_copy:  # Philips' private per-frame copy, here off by a whole slice
            item += _element(0x2005, 0x0010, "LO", b"Philips MR Imaging DD 005")
            item += _sequence(0x2005, 0x140F, [position(np.asarray(positions[k % len(positions)]) + 7.0)])
        per_frame.append(item)
    thumbnail = np.zeros((4, 4), "<u2").tobytes()
    icon_item = _element(0x0028, 0x0010, "US", us(4)) + _element(0x0028, 0x0011, "US", us(4))
    icon_item += _element(0x7FE0, 0x0010, "OW", thumbnail)
    return b"".join(
        [
            _element(0x0008, 0x0016, "UI", ENHANCED_MR.encode()),
            _element(0x0008, 0x0018, "UI", instance_uid.encode()),
            _element(0x0008, 0x0060, "CS", b"MR"),
            _element(0x0020, 0x000D, "UI", b"1.2.3.4.5.6.7.2"),
            _element(0x0020, 0x000E, "UI", b"1.2.3.4.5.6.7.3"),
            _element(0x0020, 0x0052, "UI", b"1.2.3.4.5.6.7.4"),
            _element(0x0028, 0x0002, "US", us(1)),
            _element(0x0028, 0x0004, "CS", b"MONOCHROME2"),
            _element(0x0028, 0x0008, "IS", str(n).encode()),
            _element(0x0028, 0x0010, "US", us(rows)),
            _element(0x0028, 0x0011, "US", us(columns)),
            _element(0x0028, 0x0100, "US", us(16)),
            _element(0x0028, 0x0101, "US", us(16)),
            _element(0x0028, 0x0102, "US", us(15)),
            _element(0x0028, 0x0103, "US", us(0)),
            _sequence(0x0088, 0x0200, [icon_item]) if icon else b"",
            _sequence(0x5200, 0x9229, [shared]),
            _sequence(0x5200, 0x9230, per_frame),
            _element(0x7FE0, 0x0010, "OW", frames.astype("<u2").tobytes()),
        ]
    )
