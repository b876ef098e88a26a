"""A base model's native training size, read from its name, folder index or file header: no torch, no weights,
so the CLI and the nodes can choose a default resolution before anything heavy is imported."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import BUILTIN_RESOLUTION
from ..files.safetensors_header import read_safetensors_header
from .detect import builtin_base_of, detect_family

FAMILY_RESOLUTION = {"SD1.5": 512, "SDXL": 1024}
SDXL_PIPELINES = ("StableDiffusionXLPipeline",)


def native_resolution(spec: str) -> int:
    """64/128 for the built-in models, 1024 for SDXL, 512 for SD1.5 and anything not recognised (whose loading
    then fails with its own message)."""
    if spec in BUILTIN_RESOLUTION:
        return BUILTIN_RESOLUTION[spec]
    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            index = json.loads((path / "model_index.json").read_text())
            return FAMILY_RESOLUTION["SDXL" if index.get("_class_name") in SDXL_PIPELINES else "SD1.5"]
        header = read_safetensors_header(path)
        base = builtin_base_of(header)  # a full fine-tune of a built-in model trains at the built-in's size
        if base:
            return BUILTIN_RESOLUTION[base]
        return FAMILY_RESOLUTION.get(detect_family(header), FAMILY_RESOLUTION["SD1.5"])
    except Exception:  # a missing or unreadable model is reported by the check that loads it
        return FAMILY_RESOLUTION["SD1.5"]
