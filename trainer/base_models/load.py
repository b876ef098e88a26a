"""Offline loading of a base model by name: a built-in model, a single-file checkpoint or a diffusers folder."""

from __future__ import annotations

from pathlib import Path

from ..errors import DreamLoomError
from ..files.safetensors_header import read_safetensors_header
from .builtin import TINY_FABRIC_PATH, build_tiny, build_tiny_fabric, tiny_fabric_fingerprint
from .components import Components
from .detect import detect_family
from .family import ModelFamily
from .offline import set_offline
from .sd15 import SD15, folder_fingerprint, single_file_fingerprint

FAMILIES: list[ModelFamily] = [SD15]  # a new family is a module in this package plus one entry here
BUILTIN_MODELS = ("tiny", "tiny-fabric")


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
            "Give 'tiny-fabric' or 'tiny', the path of an SD1.5 .safetensors checkpoint, or a diffusers folder "
            "(one with model_index.json).",
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
            "Use an SD1.5 .safetensors checkpoint or a diffusers folder.",
        )


def _check_diffusers_folder(path: Path) -> None:
    if not (path / "model_index.json").exists() or not (path / "unet").is_dir():
        raise DreamLoomError(
            f"{path} is not a diffusers model folder (no model_index.json or unet/).",
            "Point to the folder that holds model_index.json, or to a single .safetensors checkpoint.",
        )


def family_of_file(path: Path, header: dict) -> ModelFamily:
    detected = detect_family(header)
    for family in FAMILIES:
        if family.recognises(detected):
            return family
    supported = ", ".join(f.name for f in FAMILIES)
    raise DreamLoomError(
        f"{path.name} looks like {detected}, not Stable Diffusion 1.5.",
        f"DreamLoom trains {supported}-family checkpoints (v1-5-pruned-emaonly and its fine-tunes). "
        "Pick an SD1.5 checkpoint.",
    )


def load_base_model(spec: str, dtype=None, search_dirs: list[str] | None = None) -> Components:
    """Load the base model named by `spec`, with no network access."""
    if spec == "tiny":
        return build_tiny()
    if spec == "tiny-fabric":
        return build_tiny_fabric()
    set_offline()
    path = resolve_model_path(spec, search_dirs)
    if path.is_dir():
        _check_diffusers_folder(path)
        return SD15.load_folder(path, dtype)
    _check_model_file(path)
    header = read_safetensors_header(path)
    return family_of_file(path, header).load_single_file(path, header, dtype)


def model_fingerprint(spec: str, search_dirs: list[str] | None = None) -> str:
    """The fingerprint load_base_model would report, without loading the weights."""
    if spec == "tiny":
        return build_tiny().fingerprint
    if spec == "tiny-fabric":
        if not TINY_FABRIC_PATH.exists():
            build_tiny_fabric()  # raises the missing-weights error
        return tiny_fabric_fingerprint()
    path = resolve_model_path(spec, search_dirs)
    return folder_fingerprint(path) if path.is_dir() else single_file_fingerprint(path)
