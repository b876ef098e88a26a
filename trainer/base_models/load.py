"""Offline loading of a base model by name: a built-in model, a single-file checkpoint or a diffusers folder."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DreamLoomError
from ..files.safetensors_header import read_safetensors_header
from .builtin import (
    TINY_FABRIC_PATH,
    build_tiny,
    build_tiny_fabric,
    build_tiny_sdxl,
    load_builtin_finetune,
    tiny_fabric_fingerprint,
)
from .components import Components
from .detect import builtin_base_of, detect_family
from .family import ModelFamily
from .offline import set_offline
from .sd15 import SD15, folder_fingerprint
from .sdxl import SDXL

FAMILIES: list[ModelFamily] = [SD15, SDXL]  # a new family is a module in this package plus one entry here
BUILTIN_MODELS = ("tiny", "tiny-fabric", "tiny-sdxl")
BUILTIN_FAMILIES = {"tiny": SD15, "tiny-fabric": SD15, "tiny-sdxl": SDXL}
# diffusers pipeline classes of folders (model_index.json's _class_name) -> the family that loads them
FOLDER_PIPELINES = {"StableDiffusionPipeline": SD15, "StableDiffusionXLPipeline": SDXL}


def resolve_model_path(spec: str, search_dirs: list[str] | None = None) -> Path:
    path = Path(spec).expanduser()
    if not path.exists() and search_dirs:
        for folder in search_dirs:
            if (Path(folder) / spec).exists():
                path = Path(folder) / spec
                break
    if not path.exists():
        raise DreamLoomError(
            f"Base model not found: {spec}",
            "Give a built-in model (tiny-fabric, tiny, tiny-sdxl), the path of an SD1.5 or SDXL .safetensors "
            "checkpoint, or a diffusers folder (one with model_index.json).",
        )
    return path


def _check_model_file(path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise DreamLoomError(
            f"{path.name} is a pickle-based checkpoint ({suffix}); DreamLoom loads only .safetensors, because "
            "loading a pickle can run arbitrary code.",
            "Convert it to .safetensors (many tools do this, e.g. ComfyUI's CheckpointSave node), or download the "
            ".safetensors version.",
        )
    if suffix not in (".safetensors", ".sft"):
        raise DreamLoomError(
            f"{path.name} is not a model file DreamLoom knows.",
            "Use an SD1.5 or SDXL .safetensors checkpoint or a diffusers folder.",
        )


def _check_diffusers_folder(path: Path) -> None:
    if not (path / "model_index.json").exists() or not (path / "unet").is_dir():
        raise DreamLoomError(
            f"{path} is not a diffusers model folder (no model_index.json or unet/).",
            "Point to the folder that holds model_index.json, or to a single .safetensors checkpoint.",
        )


SUPPORTED = "SD1.5 (v1-5-pruned-emaonly and its fine-tunes) and SDXL base (sd_xl_base_1.0 and its fine-tunes)"


def family_of_file(path: Path, header: dict) -> ModelFamily:
    detected = detect_family(header)
    for family in FAMILIES:
        if family.recognises(detected):
            return family
    hint = f"DreamLoom trains {SUPPORTED} checkpoints."
    if "refiner" in detected:
        hint += " The refiner only polishes the base model's output; train on the SDXL base checkpoint."
    elif "inpainting" in detected:
        hint += " Inpainting models take 9 input channels; train on the matching base checkpoint."
    raise DreamLoomError(f"{path.name} looks like {detected}, which DreamLoom cannot train.", hint)


def family_of_folder(path: Path) -> ModelFamily:
    """The family of a diffusers folder, from the pipeline class its model_index.json names."""
    try:
        pipeline = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        pipeline = ""
    if pipeline in FOLDER_PIPELINES:
        return FOLDER_PIPELINES[pipeline]
    hint = f"DreamLoom trains {SUPPORTED} models."
    if pipeline == "StableDiffusionXLImg2ImgPipeline":
        hint += " This looks like the SDXL refiner; train on the SDXL base model."
    raise DreamLoomError(
        f"{path.name} is a {pipeline or 'an unknown'} diffusers folder, which DreamLoom cannot train.", hint
    )


def family_of(spec: str, search_dirs: list[str] | None = None) -> ModelFamily:
    """The family of a base model, from its name, folder index or file header (no weights are read)."""
    if spec in BUILTIN_FAMILIES:
        return BUILTIN_FAMILIES[spec]
    path = resolve_model_path(spec, search_dirs)
    if path.is_dir():
        _check_diffusers_folder(path)
        return family_of_folder(path)
    _check_model_file(path)
    return family_of_file(path, read_safetensors_header(path))


# safetensors' names of the half-precision dtypes a base model may be stored in
HALF_DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16"}


def stored_dtype(spec: str, search_dirs: list[str] | None = None):
    """The narrowest dtype that holds a base model's weights exactly, from its headers (no weights are read): fp16
    or bf16 when every floating-point tensor is stored so, else fp32 (built-in models, fp32 files, files that mix
    fp16 and fp32, folders without safetensors). Refuses what load_base_model refuses. Loading in it never upcasts
    on the host: SDXL's 6.9 GB fp16 file loaded in fp32 would hold about 21 GB before any of it reaches the GPU."""
    import torch

    if spec in BUILTIN_FAMILIES:
        return torch.float32
    path = resolve_model_path(spec, search_dirs)
    if path.is_dir():
        parts = ("unet", "vae", "text_encoder", "text_encoder_2")
        headers = [read_safetensors_header(f) for part in parts for f in (path / part).glob("*.safetensors")]
    else:
        _check_model_file(path)  # a pickle or unknown file gets load_base_model's refusal, not a header error
        headers = [read_safetensors_header(path)]
    stored = {
        info.get("dtype")
        for header in headers
        for key, info in header.items()
        if key != "__metadata__" and str(info.get("dtype", "")).startswith(("F", "BF"))
    }
    if len(stored) == 1 and next(iter(stored)) in HALF_DTYPE_NAMES:
        return getattr(torch, HALF_DTYPE_NAMES[stored.pop()])
    return torch.float32


def load_base_model(spec: str, dtype=None, search_dirs: list[str] | None = None) -> Components:
    """Load the base model named by `spec`, with no network access."""
    if spec == "tiny":
        return build_tiny()
    if spec == "tiny-fabric":
        return build_tiny_fabric()
    if spec == "tiny-sdxl":
        return build_tiny_sdxl()
    set_offline()
    path = resolve_model_path(spec, search_dirs)
    if path.is_dir():
        _check_diffusers_folder(path)
        return family_of_folder(path).load_folder(path, dtype)
    _check_model_file(path)
    header = read_safetensors_header(path)
    family = family_of_file(path, header)
    if builtin_base_of(header):  # a full fine-tune of a built-in model (base_models/builtin.py)
        return load_builtin_finetune(path, header, family.file_fingerprint(path, header))
    return family.load_single_file(path, header, dtype)


def model_fingerprint(spec: str, search_dirs: list[str] | None = None) -> str:
    """The fingerprint load_base_model would report, without loading the weights."""
    if spec == "tiny":
        return build_tiny().fingerprint
    if spec == "tiny-sdxl":
        return build_tiny_sdxl().fingerprint
    if spec == "tiny-fabric":
        if not TINY_FABRIC_PATH.exists():
            build_tiny_fabric()  # raises the missing-weights error
        return tiny_fabric_fingerprint()
    path = resolve_model_path(spec, search_dirs)
    if path.is_dir():
        return folder_fingerprint(path)
    header = read_safetensors_header(path)
    return family_of_file(path, header).file_fingerprint(path, header)
