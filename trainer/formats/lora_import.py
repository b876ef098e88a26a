"""Read LoRA files of several formats and convert them to kohya keys with an explicit alpha.

Formats: kohya (`lora_unet_*` / `lora_te_*`; SDXL's `lora_te1_*` / `lora_te2_*` with LDM-named UNet modules),
diffusers (`unet.*` / `text_encoder.*` / SDXL's `text_encoder_2.*`, PEFT-style
`lora_A/lora_B`, `lora.down/up`, `lora_linear_layer`, old `processor.to_q_lora`), and raw PEFT
(`base_model.model.*` with an `adapter_config.json` holding `r` and `lora_alpha`, as
`PeftModel.save_pretrained` writes). The result is what ComfyUI's core LoRA patching expects; the scale
stays alpha / rank, so a converted file applies exactly as it was trained.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..base_models.components import text_model_path
from ..errors import DreamLoomError
from ..files.safetensors_header import read_safetensors_header
from .embeddings import EMBEDDING_KEY, SDXL_EMBEDDING_KEYS
from .kohya_names import kohya_module_name

_DOWN_UP = [
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_A.default.weight", ".lora_B.default.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    (".lora_down.weight", ".lora_up.weight"),
]
_OLD_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


@dataclass
class ImportedLoRA:
    tensors: dict  # kohya keys
    source_format: str
    modules: list[str] = field(default_factory=list)  # kohya module names, e.g. lora_unet_down_blocks_0_...
    notes: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)  # the file's safetensors metadata


def _is_text_path(path: str) -> bool:
    return (
        path.startswith("text_model.")
        or ".self_attn." in path
        or ".mlp.fc" in path
        or path.startswith("encoder.layers.")
    )


def _alpha_for(module_path: str, config: dict | None, rank: int) -> float:
    """alpha from a PEFT config, honouring alpha_pattern and use_rslora; alpha = rank without a config."""
    if not config:
        return float(rank)
    alpha = float(config.get("lora_alpha", rank))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module_path == pattern or module_path.endswith("." + pattern) or re.fullmatch(pattern, module_path):
            alpha = float(value)
    if config.get("use_rslora"):
        # rsLoRA scales by alpha / sqrt(r); kohya scales by alpha / r.
        alpha = alpha * math.sqrt(rank)
    return alpha


def _pairs(sd: dict, strip: str) -> tuple[dict[str, tuple], list[str]]:
    """Group down/up tensors by module path (with `strip` removed); return leftovers."""
    modules, leftovers = {}, []
    taken = set()
    for key in sd:
        if not key.startswith(strip):
            continue
        body = key[len(strip) :]
        m = _OLD_PROCESSOR.search(body)
        if m:
            proj = m[1] if m[1] != "to_out" else "to_out.0"
            path = body[: m.start()] + "." + proj
            modules.setdefault(path, {})[m[2]] = key
            taken.add(key)
            continue
        for down, up in _DOWN_UP:
            if body.endswith(down):
                modules.setdefault(body[: -len(down)], {})["down"] = key
                taken.add(key)
                break
            if body.endswith(up):
                modules.setdefault(body[: -len(up)], {})["up"] = key
                taken.add(key)
                break
        else:
            if body.endswith(".alpha"):
                modules.setdefault(body[: -len(".alpha")], {})["alpha"] = key
                taken.add(key)
    for key in sd:
        if key.startswith(strip) and key not in taken:
            leftovers.append(key)
    return modules, leftovers


def _checked_alpha(name: str, down, up, alpha) -> float:
    """The module's alpha as a number, after checking that down/up/alpha have LoRA shapes."""
    if down.ndim not in (2, 4) or up.ndim not in (2, 4) or down.shape[0] != up.shape[1] or down.shape[0] == 0:
        raise DreamLoomError(
            f"LoRA module {name} has mismatched shapes: down {tuple(down.shape)}, up {tuple(up.shape)}.",
            "The file is damaged or not a plain LoRA: export it again.",
        )
    if alpha is None:
        return float(down.shape[0])
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1:
            raise DreamLoomError(
                f"LoRA module {name} has an alpha of shape {tuple(alpha.shape)}, not a single number.",
                "The file is damaged: export it again.",
            )
        alpha = alpha.item()
    alpha = float(alpha)
    if not alpha == alpha or alpha in (float("inf"), float("-inf")):
        raise DreamLoomError(f"LoRA module {name} has alpha {alpha}.", "The file is damaged: export it again.")
    return alpha


def detect_format(keys) -> str:
    keys = list(keys)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys):
        return "diffusers"
    if any(k.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for k in keys):
        return "peft-unprefixed"
    return "unknown"


def convert_state_dict(sd: dict, metadata: dict | None = None, adapter_config: dict | None = None) -> ImportedLoRA:
    """Convert a LoRA state dict to kohya keys with explicit alphas. Unknown keys are an error."""
    if not sd:
        raise DreamLoomError("The LoRA file is empty.", "Pick a LoRA .safetensors file that holds weights.")
    fmt = detect_format(sd.keys())
    if fmt == "unknown" and set(sd) & {EMBEDDING_KEY, *SDXL_EMBEDDING_KEYS}:
        raise DreamLoomError(
            f"This file is a textual-inversion embedding (keys {', '.join(sorted(sd)[:5])}), not a LoRA.",
            "Use it as an embedding: in ComfyUI write embedding:<file name> in the prompt; on the command line "
            "give it to generate or morph as --embedding. The LoRA tools and loaders take LoRA files.",
        )
    if fmt == "unknown":
        sample = ", ".join(sorted(sd)[:5])
        raise DreamLoomError(
            f"Unrecognised LoRA format (keys such as {sample}).",
            "DreamLoom loads kohya (lora_unet_*), diffusers (unet.*) and PEFT (base_model.model.* + "
            "adapter_config.json) LoRAs.",
        )
    if fmt == "kohya":
        return _convert_kohya(sd)
    return _convert_paired(sd, fmt, metadata, adapter_config)


def _unmapped(keys: list[str], fmt: str, fix: str) -> DreamLoomError:
    more = " ..." if len(keys) > 8 else ""
    return DreamLoomError(f"{len(keys)} keys of this {fmt} LoRA cannot be mapped: {', '.join(keys[:8])}{more}", fix)


def _add_module(imported: ImportedLoRA, name: str, down, up, alpha: float) -> None:
    imported.tensors[f"{name}.lora_down.weight"] = down
    imported.tensors[f"{name}.lora_up.weight"] = up
    imported.tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    imported.modules.append(name)


def _convert_kohya(sd: dict) -> ImportedLoRA:
    groups: dict[str, dict] = {}
    bad = []
    for key, value in sd.items():
        m = re.match(r"^(lora_(?:unet|te[12]?)_[A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)$", key)
        if not m:
            bad.append(key)
            continue
        groups.setdefault(m[1], {})[m[2]] = value
    if bad:
        raise _unmapped(
            bad,
            "kohya",
            "DreamLoom loads plain LoRA (lora_down/lora_up/alpha); LoHa, LoKr and other "
            "LyCORIS types need ComfyUI's core LoraLoader.",
        )
    imported = ImportedLoRA({}, "kohya")
    sdxl = any(name.startswith("lora_te2_") for name in groups)
    for name, parts in sorted(groups.items()):
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise DreamLoomError(
                f"LoRA module {name} lacks its down or up weight.", "The file is incomplete: export it again."
            )
        alpha = _checked_alpha(name, parts["lora_down.weight"], parts["lora_up.weight"], parts.get("alpha"))
        if "alpha" not in parts:
            imported.notes.append(f"{name}: no alpha stored; using alpha = rank ({alpha:g}), scale 1")
        if not sdxl:  # an SD1.5 file written with SDXL's prefix: ComfyUI reads lora_te_ for SD1.5's CLIP
            name = name.replace("lora_te1_", "lora_te_")
        _add_module(imported, name, parts["lora_down.weight"], parts["lora_up.weight"], alpha)
    return imported


def _diffusers_adapter_configs(metadata: dict | None) -> dict:
    """Per-component PEFT configs that diffusers stores in the file's `lora_adapter_metadata`."""
    configs: dict[str, dict] = {}
    if metadata and metadata.get("lora_adapter_metadata"):
        try:
            flat = json.loads(metadata["lora_adapter_metadata"])
        except json.JSONDecodeError:
            flat = {}
        for full_key, value in flat.items():
            component, _, name = full_key.partition(".")
            configs.setdefault(component, {})[name] = value
    return configs


def _convert_paired(sd: dict, fmt: str, metadata: dict | None, adapter_config: dict | None) -> ImportedLoRA:
    """diffusers and PEFT files: down/up pairs under a prefix, alpha from the key, a config, or the rank."""
    configs = _diffusers_adapter_configs(metadata) if fmt == "diffusers" else {}
    if fmt in ("peft", "peft-unprefixed"):
        if adapter_config is None:
            raise DreamLoomError(
                "This is a raw PEFT LoRA (base_model.model.* keys) but no adapter_config.json was found next to "
                "it, so its scale (lora_alpha / r) is unknown.",
                "Keep adapter_config.json in the same folder as the .safetensors file (PEFT's save_pretrained "
                "writes both).",
            )
        prefixes = [("base_model.model.", None)] if fmt == "peft" else [("", None)]
    else:
        prefixes = [("unet.", "unet"), ("text_encoder.", "text_encoder"), ("text_encoder_2.", "text_encoder_2")]
    imported = ImportedLoRA({}, fmt)
    unknown = []
    for strip, component in prefixes:
        pairs, leftovers = _pairs(sd, strip)
        unknown += leftovers
        for path, parts in sorted(pairs.items()):
            if "down" not in parts or "up" not in parts:
                raise DreamLoomError(
                    f"LoRA module {path} lacks its down or up weight.", "The file is incomplete: export it again."
                )
            down, up = sd[parts["down"]], sd[parts["up"]]
            config = adapter_config if component is None else configs.get(component)
            _checked_alpha(path, down, up, None)
            if "alpha" in parts:
                alpha = _checked_alpha(path, down, up, sd[parts["alpha"]])
            else:
                alpha = _alpha_for(path, config, down.shape[0])
                if config is None:
                    imported.notes.append(f"{path}: no alpha stored; using alpha = rank, scale 1")
            if component == "text_encoder_2":  # SDXL's OpenCLIP ViT-bigG
                name = kohya_module_name("lora_te2_", text_model_path(path))
            elif component == "text_encoder" or (component is None and _is_text_path(path)):
                name = kohya_module_name("lora_te_", text_model_path(path))
            else:
                name = kohya_module_name("lora_unet_", path)
            _add_module(imported, name, down, up, alpha)
    unknown += [k for k in sd if not any(k.startswith(p) for p, _ in prefixes)]
    if unknown:
        raise _unmapped(
            unknown,
            fmt,
            "DreamLoom maps LoRA down/up weights (and alpha). Other parameters (DoRA "
            "magnitudes, biases, full weights) are not supported here; use ComfyUI's core "
            "LoraLoader.",
        )
    return imported


def load_lora_file(path: str | Path) -> ImportedLoRA:
    """Read a LoRA .safetensors file (plus adapter_config.json for raw PEFT) and convert it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise DreamLoomError(
            f"LoRA file not found: {path}", "Pick a file from the loras list, or connect a training node's output."
        )
    if path.suffix.lower() != ".safetensors":
        raise DreamLoomError(
            f"{path.name} is not a .safetensors file.",
            "DreamLoom loads LoRAs only from .safetensors (pickles can run code).",
        )
    read_safetensors_header(path)  # size, truncation and header checks first
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise DreamLoomError(
            f"Could not read {path.name}: {err}", "The file is damaged: copy or download it again."
        ) from err
    adapter_config = None
    cfg_path = path.parent / "adapter_config.json"
    if cfg_path.exists() and detect_format(sd.keys()) in ("peft", "peft-unprefixed"):
        try:
            adapter_config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DreamLoomError(
                f"{cfg_path} is not valid JSON ({err}).", "Fix or re-download adapter_config.json."
            ) from None
        if "r" not in adapter_config or "lora_alpha" not in adapter_config:
            raise DreamLoomError(
                f"{cfg_path} has no 'r' or 'lora_alpha'.", "Use the adapter_config.json PEFT wrote with the weights."
            )
    imported = convert_state_dict(sd, metadata, adapter_config)
    imported.metadata = dict(metadata)
    return imported


# cross-attention key width -> family, for LoRA files that do not say what they were trained on
CONTEXT_WIDTH_FAMILY = {768: "SD1.5", 1024: "SD2", 2048: "SDXL"}


def lora_family(header: dict) -> str | None:
    """The model family a LoRA file was made for ("SD1.5", "SDXL", "SD2"), from its safetensors header alone: the
    metadata kohya and DreamLoom write, SDXL's second text encoder, or the width of a cross-attention key
    projection's down matrix. None when nothing says (e.g. a LoRA of the built-in toy-width models without
    metadata)."""
    meta = header.get("__metadata__") or {}
    named = f"{meta.get('ss_base_model_version', '')} {meta.get('modelspec.architecture', '')}".lower()
    if "sdxl" in named or "stable-diffusion-xl" in named:
        return "SDXL"
    if "sd_v1" in named or "stable-diffusion-v1" in named:
        return "SD1.5"
    if "sd_v2" in named or "stable-diffusion-v2" in named:
        return "SD2"
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in header):
        return "SDXL"
    for key, info in header.items():
        if re.search(r"attn2[._]to_k.*(lora_down|lora_A|lora\.down)", key) and isinstance(info, dict):
            return CONTEXT_WIDTH_FAMILY.get(info["shape"][-1])
    return None


def trained_on(metadata: dict) -> str | None:
    """The base model a LoRA or embedding file says it was trained on, as a short name; None if it does not say."""
    base = metadata.get("dreamloom.base_model") or metadata.get("ss_sd_model_name")
    if base:
        return Path(base).name
    return metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture")


def lora_shape_mismatches(tensors: dict, modules: list[str], key_map: dict, weight_shapes: dict) -> list[str]:
    """LoRA modules whose down/up matrices do not fit the layer they map to, e.g. 'lora_unet_...: LoRA 64->64,
    layer 320->320'. `key_map`: module -> the layer's weight key; `weight_shapes`: weight key -> shape."""
    bad = []
    for module in modules:
        down, up = tensors.get(f"{module}.lora_down.weight"), tensors.get(f"{module}.lora_up.weight")
        shape = weight_shapes.get(key_map.get(module))
        if down is None or up is None or shape is None:
            continue
        if tuple(shape[:2]) != (up.shape[0], down.shape[1]):
            bad.append(f"{module}: LoRA {down.shape[1]}->{up.shape[0]}, layer {shape[1]}->{shape[0]}")
    return bad
