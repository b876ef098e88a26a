"""Copy a safetensors file tensor by tensor, changing some tensors' values (never their dtype or shape) and the
metadata: what merging a LoRA into a checkpoint needs, holding one tensor in memory at a time instead of the
whole model (an SDXL checkpoint is ~7 GB in fp16). No torch here: the caller converts bytes to tensors."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from ..errors import DreamLoomError
from .atomic import atomic_path
from .safetensors_header import read_safetensors_header

# (name, header entry {"dtype", "shape", "data_offsets"}, the tensor's raw little-endian bytes) -> new bytes or None
Transform = Callable[[str, dict, bytes], "bytes | bytearray | memoryview | None"]


def _header_bytes(header: dict) -> bytes:
    """A safetensors header, padded with spaces to a multiple of 8 bytes as the safetensors library writes it."""
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def copy_safetensors(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    transform: Transform,
    metadata: dict[str, str] | None,
    on_tensor: Callable[[int, int], None] | None = None,
) -> Path:
    """Write `src` to `dest` atomically with every tensor passed through `transform` (None keeps the bytes) and the
    metadata replaced by `metadata` (None keeps the file's own); `on_tensor(done, total)` after each tensor (it may
    raise to stop; `dest` is then left untouched)."""
    src = Path(src)
    header = read_safetensors_header(src)
    entries = sorted(
        ((name, info) for name, info in header.items() if name != "__metadata__"),
        key=lambda item: item[1]["data_offsets"][0],
    )
    out_header = {name: info for name, info in header.items() if name != "__metadata__"}
    metadata = header.get("__metadata__") if metadata is None else metadata
    if metadata:
        out_header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}, **out_header}
    with open(src, "rb") as fh:
        data_start = 8 + int.from_bytes(fh.read(8), "little")
        with atomic_path(dest) as tmp, open(tmp, "wb") as out:
            out.write(_header_bytes(out_header))
            position = 0  # within the data section
            for done, (name, info) in enumerate(entries, 1):
                start, end = (int(x) for x in info["data_offsets"])
                if start != position:
                    raise DreamLoomError(
                        f"{src.name} has a gap or overlap in its tensor data at {name}.",
                        "The file is damaged: copy or download it again.",
                    )
                fh.seek(data_start + start)
                raw = fh.read(end - start)
                new = transform(name, info, raw)
                if new is None:
                    out.write(raw)
                elif len(new) != end - start:
                    raise ValueError(f"{name}: {len(new)} bytes written for a tensor of {end - start}")
                else:
                    out.write(new)
                position = end
                if on_tensor:
                    on_tensor(done, len(entries))
    return Path(dest)
