"""Safetensors files inspected without loading tensors: header checks and fast content fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from ..errors import DreamLoomError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """Read a safetensors header without loading tensors, refusing truncated or oversized headers."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise DreamLoomError(
                f"{path.name} is not a valid safetensors file (it is only {size} bytes).",
                "Download or copy the file again.",
            )
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n + 8 > size:
            raise DreamLoomError(
                f"{path.name} has a corrupt or malicious safetensors header (claims {n} bytes, file has {size}).",
                "The file is damaged or not a safetensors file: download it again from a trusted source.",
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DreamLoomError(
            f"{path.name} has an unreadable safetensors header.", "Download or copy the file again."
        ) from None
    if not isinstance(header, dict):
        raise DreamLoomError(f"{path.name} has an unreadable safetensors header.", "Download or copy the file again.")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or "data_offsets" not in info or "shape" not in info:
            raise DreamLoomError(
                f"{path.name}: entry {key!r} in the header is malformed.", "Download or copy the file again."
            )
        end = max(end, int(info["data_offsets"][1]))
    if end + 8 + n > size:
        raise DreamLoomError(
            f"{path.name} is truncated: the header describes {end + 8 + n} bytes but the file has {size}.",
            "The copy or download was cut short: copy the file again.",
        )
    return header


def fingerprint_file(path: str | os.PathLike, header: dict | None = None) -> str:
    """A fast content fingerprint: the header plus 16 evenly spaced 64 KiB samples and the size."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        h.update(fh.read(min(n, MAX_HEADER_BYTES)))
        for i in range(16):
            fh.seek(size * i // 16)
            h.update(fh.read(65536))
    return h.hexdigest()[:16]
