"""Small file utilities shared by every layer: atomic writes, JSON reading with one-line errors, hashes."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..runtime.errors import UserError

# Formats whose pixel size, where one is stored at all, is a print or screen resolution (here, not in
# `headers`, so that the Slicer module can read it without numpy).
PICTURE_FORMATS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def plain_permissions() -> int:
    """The mode a plain open() gives a new file (0666 less the umask). mkstemp makes files private
    (0600): a bundle, cache or checkpoint written so could not be read by colleagues, or by Slicer
    running as another user."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write) -> None:
    """Call `write(binary_file)` on a temporary file beside `path`, then rename it to `path`.

    Readers never see a half-written file, and a failure (or Ctrl-C) leaves no temporary behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, plain_permissions())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def read_json(path: Path, unreadable: Callable[[Exception], str], missing: str | None = None):
    """The JSON value in `path`, or a UserError: `missing` for a file that does not exist (when given),
    `unreadable(exc)` for any other failure to read or parse it (bad UTF-8 included)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise UserError(unreadable(exc) if missing is None else missing) from None
    except (OSError, ValueError) as exc:
        raise UserError(unreadable(exc)) from None
