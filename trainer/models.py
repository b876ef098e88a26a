"""Offline loading of the base model: an SD1.5 single file, a diffusers folder, or the built-in tiny model."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DreamLoomError

ASSETS = Path(__file__).parent / "assets"
SD15_CONFIG_DIR = ASSETS / "sd15"
TOKENIZER_DIR = ASSETS / "clip_tokenizer"
TINY_FABRIC_PATH = ASSETS / "tiny_fabric" / "tiny_fabric.safetensors"
BUILTIN_RESOLUTION = {"tiny": 64, "tiny-fabric": 128}  # built-in model -> native size in pixels
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def set_offline() -> None:
    """Make every Hugging Face library refuse network access in this process."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DIFFUSERS_OFFLINE"):
        os.environ[var] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@dataclass
class Components:
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    scheduler_config: dict
    fingerprint: str
    source: str
    kind: str  # "tiny", "single_file" or "diffusers"
    native_resolution: int = 512
    extra: dict = field(default_factory=dict)

    def noise_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler_config)

    def modules(self):
        return {"text_encoder": self.text_encoder, "vae": self.vae, "unet": self.unet}


# --------------------------------------------------------------------------- tokenizer
def load_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)


# --------------------------------------------------------------------------- tiny model
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


def sd15_scheduler_config() -> dict:
    return json.loads((SD15_CONFIG_DIR / "scheduler" / "scheduler_config.json").read_text())


def build_tiny() -> Components:
    """The random-weight tiny model: SD1.5's architecture family at toy widths, seeded weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    devices = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(20241122)
        unet = UNet2DConditionModel(**TINY_UNET)
        vae = AutoencoderKL(**TINY_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    payload = json.dumps([TINY_VERSION, TINY_UNET, TINY_VAE, TINY_TEXT], sort_keys=True).encode()
    fingerprint = "tiny-" + _state_fingerprint([unet, vae, text_encoder], seed=payload)
    return _builtin_components("tiny", vae, unet, text_encoder, fingerprint, 64)


def _builtin_components(name: str, vae, unet, text_encoder, fingerprint: str, resolution: int) -> Components:
    comps = Components(
        tokenizer=load_tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        scheduler_config=sd15_scheduler_config(),
        fingerprint=fingerprint,
        source=name,
        kind="tiny",
        native_resolution=resolution,
    )
    _eval_frozen(comps)
    return comps


def build_tiny_fabric(path: Path | None = None) -> Components:
    """The built-in pretrained tiny-fabric model (128 px), from the weights `pretrain-tiny` wrote."""
    from .pretrain import load_tiny_fabric

    path = Path(path or TINY_FABRIC_PATH)
    vae, unet, text_encoder, meta = load_tiny_fabric(path)
    return _builtin_components("tiny-fabric", vae, unet, text_encoder, "tiny-fabric-" + fingerprint_file(path),
                               int(meta.get("resolution", 128)))


def _state_fingerprint(modules, seed: bytes = b"") -> str:
    import torch

    h = hashlib.sha256(seed)
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            t = tensor.detach().to("cpu", torch.float32).contiguous()
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _eval_frozen(comps: Components) -> None:
    for module in comps.modules().values():
        module.requires_grad_(False)
        module.eval()


# --------------------------------------------------------------------------- safetensors inspection
def read_safetensors_header(path: str | os.PathLike) -> dict:
    """Read a safetensors header without loading tensors, refusing truncated or oversized headers."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise DreamLoomError(f"{path.name} is not a valid safetensors file (it is only {size} bytes).", "Download or copy the file again.")
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
        raise DreamLoomError(f"{path.name} has an unreadable safetensors header.", "Download or copy the file again.") from None
    if not isinstance(header, dict):
        raise DreamLoomError(f"{path.name} has an unreadable safetensors header.", "Download or copy the file again.")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or "data_offsets" not in info or "shape" not in info:
            raise DreamLoomError(f"{path.name}: entry {key!r} in the header is malformed.", "Download or copy the file again.")
        end = max(end, int(info["data_offsets"][1]))
    if end + 8 + n > size:
        raise DreamLoomError(
            f"{path.name} is truncated: the header describes {end + 8 + n} bytes but the file has {size}.",
            "The copy or download was cut short: copy the file again.",
        )
    return header


def detect_family(header: dict) -> str:
    """Name the model family of an LDM-layout checkpoint from its tensor names and shapes."""
    keys = header.keys()

    def shape(k):
        return header.get(k, {}).get("shape")

    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "SDXL"
    if any(k.startswith("model.diffusion_model.joint_blocks") for k in keys):
        return "SD3"
    if any(k.startswith("double_blocks.") or k.startswith("model.diffusion_model.double_blocks") for k in keys):
        return "Flux"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "SD2"
    in_w = shape("model.diffusion_model.input_blocks.0.0.weight")
    if in_w is None:
        if any(k.startswith("down_blocks.") or k.startswith("lora_unet_") for k in keys):
            return "not a full checkpoint (looks like a LoRA or a lone UNet)"
        return "unknown"
    if in_w[1] == 9:
        return "SD1.5 inpainting"
    if in_w[1] != 4:
        return f"an SD variant with {in_w[1]} input channels (e.g. instruct-pix2pix)"
    ctx = shape("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if ctx and ctx[1] != 768:
        return f"an SD variant with {ctx[1]}-wide text conditioning"
    if in_w[0] != 320:
        return f"an SD variant with {in_w[0]} base channels"
    if not any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "SD1.5 without a text encoder"
    return "SD1.5"


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


# --------------------------------------------------------------------------- loading
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


def load_base_model(spec: str, dtype=None, search_dirs: list[str] | None = None) -> Components:
    """Load the base model named by `spec`, with no network access."""
    if spec == "tiny":
        return build_tiny()
    if spec == "tiny-fabric":
        return build_tiny_fabric()
    set_offline()
    path = resolve_model_path(spec, search_dirs)
    if path.is_dir():
        return _load_diffusers_folder(path, dtype)
    suffix = path.suffix.lower()
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise DreamLoomError(
            f"{path.name} is a pickle-based checkpoint ({suffix}); DreamLoom loads only .safetensors, because "
            "loading a pickle can run arbitrary code.",
            "Convert it to .safetensors (many tools do this, e.g. ComfyUI's CheckpointSave node), or download the "
            ".safetensors version.",
        )
    if suffix not in (".safetensors", ".sft"):
        raise DreamLoomError(f"{path.name} is not a model file DreamLoom knows.", "Use an SD1.5 .safetensors checkpoint or a diffusers folder.")
    return _load_single_file(path, dtype)


def _load_single_file(path: Path, dtype) -> Components:
    import torch

    header = read_safetensors_header(path)
    family = detect_family(header)
    if family != "SD1.5":
        raise DreamLoomError(
            f"{path.name} looks like {family}, not Stable Diffusion 1.5.",
            "DreamLoom trains SD1.5-family checkpoints (v1-5-pruned-emaonly and its fine-tunes). "
            "Pick an SD1.5 checkpoint.",
        )
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(SD15_CONFIG_DIR),
            tokenizer=load_tokenizer(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            local_files_only=True,
            torch_dtype=dtype or torch.float32,
        )
    except DreamLoomError:
        raise
    except Exception as err:  # diffusers raises many types for a bad file
        raise DreamLoomError(f"Could not load {path.name} as an SD1.5 checkpoint: {err}", "Check that the file is a complete SD1.5 .safetensors checkpoint.") from err
    comps = Components(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        unet=pipe.unet,
        scheduler_config=sd15_scheduler_config(),
        fingerprint="sd15-" + fingerprint_file(path, header),
        source=str(path),
        kind="single_file",
    )
    _eval_frozen(comps)
    return comps


def _load_diffusers_folder(path: Path, dtype) -> Components:
    import torch

    if not (path / "model_index.json").exists() or not (path / "unet").is_dir():
        raise DreamLoomError(f"{path} is not a diffusers model folder (no model_index.json or unet/).", "Point to the folder that holds model_index.json, or to a single .safetensors checkpoint.")
    unet_cfg = json.loads((path / "unet" / "config.json").read_text())
    if unet_cfg.get("cross_attention_dim") != 768 or unet_cfg.get("in_channels") != 4:
        raise DreamLoomError(
            f"{path.name} is not an SD1.5 model (cross_attention_dim={unet_cfg.get('cross_attention_dim')}, in_channels={unet_cfg.get('in_channels')}).",
            "DreamLoom trains SD1.5-family models; pick an SD1.5 folder.",
        )
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    kw = dict(local_files_only=True, torch_dtype=dtype or torch.float32)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True, dtype=dtype or torch.float32)
    tokenizer = load_tokenizer() if not (path / "tokenizer").is_dir() else _folder_tokenizer(path / "tokenizer")
    sched = path / "scheduler" / "scheduler_config.json"
    weight_files = sorted(p for p in path.rglob("*.safetensors"))
    h = hashlib.sha256()
    for wf in weight_files:
        h.update(str(wf.relative_to(path)).encode())
        h.update(fingerprint_file(wf).encode())
    comps = Components(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        scheduler_config=json.loads(sched.read_text()) if sched.exists() else sd15_scheduler_config(),
        fingerprint="diffusers-" + h.hexdigest()[:16],
        source=str(path),
        kind="diffusers",
    )
    _eval_frozen(comps)
    return comps


def _folder_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def model_fingerprint(spec: str, search_dirs: list[str] | None = None) -> str:
    """The fingerprint load_base_model would report, without loading the weights."""
    if spec == "tiny":
        return build_tiny().fingerprint
    if spec == "tiny-fabric":
        if not TINY_FABRIC_PATH.exists():
            build_tiny_fabric()  # raises the missing-weights error
        return "tiny-fabric-" + fingerprint_file(TINY_FABRIC_PATH)
    path = resolve_model_path(spec, search_dirs)
    if path.is_dir():
        h = hashlib.sha256()
        for wf in sorted(path.rglob("*.safetensors")):
            h.update(str(wf.relative_to(path)).encode())
            h.update(fingerprint_file(wf).encode())
        return "diffusers-" + h.hexdigest()[:16]
    return "sd15-" + fingerprint_file(path)
