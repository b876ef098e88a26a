"""The built-in models: `tiny` (random weights, for fast tests), `tiny-fabric` (pretrained, 128 px) and
`tiny-sdxl` (random weights in SDXL's component layout: two text encoders, pooled and time-id conditioning).

All have their family's architecture at toy widths and use the real CLIP tokenizer. The tiny-fabric file format
(one fp16 safetensors, prefixes vae./unet./text_encoder., configs in the metadata) lives here; its recipe
is trainer/lab/pretrain.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import DreamLoomError
from ..files.atomic import atomic_path
from ..files.safetensors_header import fingerprint_file
from .components import ASSETS, Components, load_tokenizer, match_text_model_level, state_fingerprint
from .detect import BUILTIN_BASE_KEY, BUILTIN_FINETUNE_FORMAT, builtin_base_of
from .sd15 import SD15, sd15_scheduler_config
from .sdxl import SDXL, load_tokenizer_2, sdxl_scheduler_config

TINY_FABRIC_PATH = ASSETS / "tiny_fabric" / "tiny_fabric.safetensors"
TINY_FABRIC_FORMAT = "dreamloom-tiny-fabric-v1"
BUILTIN_RESOLUTION = {"tiny": 64, "tiny-fabric": 128, "tiny-sdxl": 64}  # built-in model -> native size in pixels

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.18215,
)
TINY_TEXT = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=64,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
TINY_VERSION = "tiny-v1"

# SDXL's layout at toy widths: no attention in the first level, deeper transformers further down, linear
# projections, text_time conditioning (6 time ids x 8 + a 32-wide pooled embedding = 80), 32 + 32 = 64-wide context.
TINY_SDXL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
    cross_attention_dim=64,
    norm_num_groups=8,
)
TINY_SDXL_VAE = {**TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True}
TINY_SDXL_TEXT = {**TINY_TEXT, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32}
TINY_SDXL_TEXT_2 = {**TINY_SDXL_TEXT, "hidden_act": "gelu"}
TINY_SDXL_VERSION = "tiny-sdxl-v1"


def _modules_from_configs(vae_config: dict, unet_config: dict, text_config: dict):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(**unet_config)  # this order: the tiny model's seeded weights depend on it
    vae = AutoencoderKL(**vae_config)
    return vae, unet, CLIPTextModel(CLIPTextConfig(**text_config))


def _builtin(name: str, vae, unet, text_encoder, fingerprint: str, resolution: int, family=SD15, **extra) -> Components:
    """Components of a built-in model; `extra`: SDXL's tokenizer_2 and text_encoder_2."""
    return Components(
        tokenizer=load_tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        scheduler_config=sd15_scheduler_config() if family is SD15 else sdxl_scheduler_config(),
        fingerprint=fingerprint,
        source=name,
        kind="tiny",
        family=family,
        native_resolution=resolution,
        builtin=name,
        **extra,
    ).freeze()


def build_tiny() -> Components:
    """The random-weight tiny model: SD1.5's architecture family at toy widths, seeded weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(20241122)
        vae, unet, text_encoder = _modules_from_configs(TINY_VAE, TINY_UNET, TINY_TEXT)
    payload = json.dumps([TINY_VERSION, TINY_UNET, TINY_VAE, TINY_TEXT], sort_keys=True).encode()
    fingerprint = "tiny-" + state_fingerprint([unet, vae, text_encoder], seed=payload)
    return _builtin("tiny", vae, unet, text_encoder, fingerprint, BUILTIN_RESOLUTION["tiny"])


def build_tiny_sdxl() -> Components:
    """The random-weight tiny SDXL: SDXL's component layout at toy widths, seeded weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(20261122)
        unet = UNet2DConditionModel(**TINY_SDXL_UNET)
        vae = AutoencoderKL(**TINY_SDXL_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_SDXL_TEXT))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TEXT_2))
    payload = json.dumps(
        [TINY_SDXL_VERSION, TINY_SDXL_UNET, TINY_SDXL_VAE, TINY_SDXL_TEXT, TINY_SDXL_TEXT_2], sort_keys=True
    ).encode()
    fingerprint = "tiny-sdxl-" + state_fingerprint([unet, vae, text_encoder, text_encoder_2], seed=payload)
    resolution = BUILTIN_RESOLUTION["tiny-sdxl"]
    extra = dict(tokenizer_2=load_tokenizer_2(), text_encoder_2=text_encoder_2)
    return _builtin("tiny-sdxl", vae, unet, text_encoder, fingerprint, resolution, family=SDXL, **extra)


def build_tiny_fabric(path: Path | None = None) -> Components:
    """The built-in pretrained tiny-fabric model (128 px), from the weights `pretrain-tiny` wrote."""
    path = Path(path or TINY_FABRIC_PATH)
    vae, unet, text_encoder, meta = load_tiny_fabric(path)
    return _builtin(
        "tiny-fabric",
        vae,
        unet,
        text_encoder,
        tiny_fabric_fingerprint(path),
        int(meta.get("resolution", BUILTIN_RESOLUTION["tiny-fabric"])),
    )


def tiny_fabric_fingerprint(path: Path | None = None) -> str:
    return "tiny-fabric-" + fingerprint_file(Path(path or TINY_FABRIC_PATH))


def save_tiny_fabric(path: Path, modules: dict, configs: dict, resolution: int, info: dict) -> None:
    """One fp16 safetensors file: `modules` and `configs` keyed "vae"/"unet"/"text_encoder" (atomic)."""
    from safetensors.torch import save_file

    tensors = {}
    for prefix in ("vae", "unet", "text_encoder"):
        for name, t in modules[prefix].state_dict().items():
            if not name.endswith("position_ids"):
                tensors[f"{prefix}.{name}"] = t.detach().to(torch.float16).contiguous()
    metadata = {
        "format": TINY_FABRIC_FORMAT,
        "vae_config": json.dumps(configs["vae"]),
        "unet_config": json.dumps(configs["unet"]),
        "text_config": json.dumps(configs["text_encoder"]),
        "resolution": str(resolution),
        "pretrain": json.dumps(info),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_tiny_fabric(path: Path):
    """(vae, unet, text_encoder, metadata) from a file written by save_tiny_fabric, in fp32."""
    from safetensors import safe_open

    if not path.exists():
        raise DreamLoomError(
            f"The tiny-fabric weights are missing ({path}).",
            "Reinstall DreamLoom, or rebuild them with `python -m trainer pretrain-tiny`.",
        )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != TINY_FABRIC_FORMAT:
            raise DreamLoomError(
                f"{path.name} is not a tiny-fabric file (format {meta.get('format')!r}).",
                "Rebuild it with `python -m trainer pretrain-tiny`.",
            )
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    vae, unet, text_encoder = _modules_from_configs(
        json.loads(meta["vae_config"]), json.loads(meta["unet_config"]), json.loads(meta["text_config"])
    )
    for prefix, module in (("vae.", vae), ("unet.", unet), ("text_encoder.", text_encoder)):
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if module is text_encoder:
            state = match_text_model_level(state, text_encoder)
        missing, unexpected = module.load_state_dict(state, strict=False)
        missing = [m for m in missing if not m.endswith("position_ids")]
        if missing or unexpected:
            raise DreamLoomError(
                f"{path.name} does not match the tiny-fabric architecture "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}).",
                "Rebuild it with `python -m trainer pretrain-tiny`.",
            )
    return vae, unet, text_encoder, meta


BUILTIN_BUILDERS = {"tiny": build_tiny, "tiny-fabric": build_tiny_fabric, "tiny-sdxl": build_tiny_sdxl}


def save_builtin_finetune(path: Path, base: str, state_dicts: dict, metadata: dict[str, str]) -> Path:
    """A fine-tuned built-in model as one safetensors file (detect.py: BUILTIN_FINETUNE_FORMAT), written atomically;
    `state_dicts` maps a Components attribute (unet, vae, text_encoder, text_encoder_2) to its state dict."""
    from safetensors.torch import save_file

    if base not in BUILTIN_BUILDERS:
        raise ValueError(f"{base!r} is not a built-in model")
    tensors = {
        f"{part}.{name}": t.detach().cpu().contiguous()
        for part, sd in state_dicts.items()
        for name, t in sd.items()
        if not name.endswith("position_ids")
    }
    meta = {**metadata, "format": BUILTIN_FINETUNE_FORMAT, BUILTIN_BASE_KEY: base}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def load_builtin_finetune(path: Path, header: dict, fingerprint: str) -> Components:
    """A file written by save_builtin_finetune as Components: the built-in's modules with the file's weights (fp32)."""
    from safetensors.torch import load_file

    base = builtin_base_of(header)
    comps = BUILTIN_BUILDERS[base]()
    tensors = load_file(str(path))
    for part, module in {"unet": comps.unet, "vae": comps.vae, **comps.text_encoders()}.items():
        state = {k[len(part) + 1 :]: v.float() for k, v in tensors.items() if k.startswith(part + ".")}
        if part.startswith("text_encoder"):  # the text model's level follows transformers; the projection has none
            projection = {k: v for k, v in state.items() if k.startswith("text_projection.")}
            rest = {k: v for k, v in state.items() if k not in projection}
            state = {**match_text_model_level(rest, module), **projection}
        missing, unexpected = module.load_state_dict(state, strict=False)
        missing = [m for m in missing if not m.endswith("position_ids")]
        if missing or unexpected:
            raise DreamLoomError(
                f"{Path(path).name} does not match the built-in {base} model's {part} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}).",
                "The file is damaged or was not written by DreamLoom's full fine-tune; train it again.",
            )
    comps.fingerprint, comps.source, comps.kind = fingerprint, str(path), "single_file"
    return comps.freeze()
