"""The per-frame geometry of a multi-frame DICOM file, read where the standard puts it.

Enhanced MR and CT files keep each frame's position in the Per-frame Functional Groups Sequence
(5200,9230), and the plane orientation and pixel spacing there or in the Shared Functional Groups
Sequence (5200,9229). ITK does not show these sequences, and a search of the file's bytes is misled by
the other places a position is written (a vendor's private per-frame copy, a source image's, an icon's
pixel data before the groups), so the data set is walked: explicit or implicit VR little endian,
defined or undefined lengths, up to the top-level pixel data.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

_SHARED, _PER_FRAME = 0x52009229, 0x52009230
_PIXEL_DATA = 0x7FE00010
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
# Functional group sequence -> (the value it holds, how many numbers, the name given here).
_GROUPS = {
    0x00209113: (0x00200032, 3, "position"),
    0x00209116: (0x00200037, 6, "orientation"),
    0x00289110: (0x00280030, 2, "spacing"),
}
_POSITION = "position"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_IMPLICIT, _UNREADABLE = "1.2.840.10008.1.2", ("1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99")


class _Malformed(Exception):
    pass


class _Walker:
    """Elements and items of a little-endian data set in `data`, by position."""

    def __init__(self, data, explicit: bool):
        self.data, self.explicit = data, explicit

    def _unpack(self, fmt: str, pos: int) -> tuple:
        if pos + struct.calcsize(fmt) > len(self.data):
            raise _Malformed
        return struct.unpack_from(fmt, self.data, pos)

    def header(self, pos: int) -> tuple[int, bytes | None, int, int]:
        """(tag, VR or None, where the value starts, its length) of the element at `pos`."""
        group, element = self._unpack("<HH", pos)
        tag = group << 16 | element
        if group == 0xFFFE or not self.explicit:
            (length,) = self._unpack("<I", pos + 4)
            return tag, (b"SQ" if tag in _GROUPS or tag in (_SHARED, _PER_FRAME) else None), pos + 8, length
        vr = bytes(self.data[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            return tag, vr, pos + 12, self._unpack("<I", pos + 8)[0]
        return tag, vr, pos + 8, self._unpack("<H", pos + 6)[0]

    def elements(self, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(tag, value start, length) of each element from `pos` to `end` or an item's end."""
        while pos < end:
            tag, vr, value, length = self.header(pos)
            if tag == _ITEM_END:
                return
            yield tag, value, length
            pos = self._after(vr, value, length)

    def _after(self, vr: bytes | None, value: int, length: int) -> int:
        """Where the element whose value starts at `value` ends."""
        if vr == b"SQ" or length == _UNDEFINED:
            return self.sequence_end(value, length)
        if value + length > len(self.data):
            raise _Malformed
        return value + length

    def items(self, value: int, length: int) -> Iterator[tuple[int, int]]:
        """(start, end) of each item of the sequence whose value starts at `value`."""
        end = len(self.data) if length == _UNDEFINED else value + length
        pos = value
        while pos < end:
            tag, _, start, size = self.header(pos)
            if tag == _SEQUENCE_END:
                return
            if tag != _ITEM:
                raise _Malformed
            stop = self.item_end(start) if size == _UNDEFINED else start + size
            yield start, stop
            pos = stop

    def item_end(self, start: int) -> int:
        """Where an item of undefined length ends (after its delimiter)."""
        pos = start
        while True:
            tag, vr, value, length = self.header(pos)
            if tag == _ITEM_END:
                return value
            pos = self._after(vr, value, length)

    def sequence_end(self, value: int, length: int) -> int:
        if length != _UNDEFINED:
            return value + length
        pos = value
        for _, stop in self.items(value, length):
            pos = stop
        tag, _, after, _ = self.header(pos)
        if tag != _SEQUENCE_END:
            raise _Malformed
        return after


def _numbers(raw: bytes, count: int) -> np.ndarray | None:
    try:
        values = np.array([float(v) for v in raw.decode("ascii").strip("\x00 ").split("\\")])
    except (UnicodeDecodeError, ValueError):
        return None
    return values if values.size == count and np.isfinite(values).all() else None


def _group_values(walker: _Walker, start: int, end: int) -> dict[str, np.ndarray]:
    """The wanted values of one functional groups item (a frame's, or the shared one)."""
    found = {}
    for tag, value, length in walker.elements(start, end):
        if tag not in _GROUPS:
            continue
        wanted, count, name = _GROUPS[tag]
        for item_start, item_end in walker.items(value, length):
            for inner, inner_value, inner_length in walker.elements(item_start, item_end):
                if inner == wanted:
                    numbers = _numbers(bytes(walker.data[inner_value : inner_value + inner_length]), count)
                    if numbers is not None:
                        found[name] = numbers
            break  # one item per functional group
    return found


def _data_set_start(data) -> tuple[int, bool] | None:
    """(where the data set starts, explicit VR) after the file meta information; None where this walker
    cannot read it (no DICM preamble, big endian, deflated)."""
    if bytes(data[128:132]) != b"DICM":
        return None
    walker, pos, syntax = _Walker(data, explicit=True), 132, None
    while pos + 8 <= len(data) and struct.unpack_from("<H", data, pos)[0] == 0x0002:
        tag, _, value, length = walker.header(pos)
        if tag == 0x00020010:
            syntax = bytes(data[value : value + length]).decode("ascii", "replace").strip("\x00 ")
        pos = value + length
    if syntax is None or syntax in _UNREADABLE:
        return None
    return pos, syntax != _IMPLICIT


def functional_groups(path: Path, frames: int) -> dict | None:
    """{"position", "orientation", "spacing": one row per frame (a frame's own, else the shared one), or
    None where a frame has none; "shared position": whether one position is given for every frame};
    {} where the file holds no per-frame functional groups (a classic multi-frame file); None where
    this walker cannot read the file (no preamble, big endian, deflated, damaged, not one group per
    frame)."""
    if Path(path).stat().st_size < 132:
        return None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            start = _data_set_start(data)
            if start is None:
                return None
            walker = _Walker(data, explicit=start[1])
            shared, per_frame = {}, None
            for tag, value, length in walker.elements(start[0], len(data)):
                if tag == _PIXEL_DATA:
                    break
                if tag == _SHARED:
                    for item in walker.items(value, length):
                        shared = _group_values(walker, *item)
                elif tag == _PER_FRAME:
                    per_frame = [_group_values(walker, *item) for item in walker.items(value, length)]
        except (_Malformed, RecursionError):  # RecursionError: sequences nested hundreds deep
            return None
    if per_frame is None:
        return {}
    if len(per_frame) != frames:
        return None
    result: dict = {"shared position": _POSITION in shared}
    for name in (_POSITION, "orientation", "spacing"):
        # A position shared by every frame places no stack: it is left for the caller to refuse.
        fallback = None if name == _POSITION else shared.get(name)
        rows = [frame.get(name, fallback) for frame in per_frame]
        result[name] = None if any(r is None for r in rows) else np.array(rows)
    return result
