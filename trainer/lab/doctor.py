"""`python -m trainer doctor`: will a run fit? Versions, the device, the settings `auto` picks and the predicted
peak GPU memory, in a second or two and without loading any model weights.

The memory model it reports is trainer/training/memory.py (its docstring has the calibration).
"""

from __future__ import annotations

import os
import platform
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__, cpu_malloc, installed_version
from ..base_models.load import (
    BUILTIN_MODELS,
    _check_diffusers_folder,
    _check_model_file,
    family_of_file,
    family_of_folder,
    resolve_model_path,
    stored_dtype,
)
from ..config import BUILTIN_RESOLUTION
from ..errors import OUT_OF_MEMORY_HINT, DreamLoomError
from ..files.safetensors_header import read_safetensors_header
from ..inference.gpu_memory import free_cuda_bytes
from ..training.half_convs import HALF_DTYPES, resolve_half_frozen_convs
from ..training.memory import (
    CONTEXT_GIB,
    ERROR,
    FAMILY_SIZES,
    FULL_OPTIMIZER_BYTES,
    GIB,
    predict_memory,
)
from ..training.precision import gpu_has_bf16, resolve_gradient_checkpointing, resolve_mixed_precision

SD15_NAME = "sd15"  # the CLI's default: the SD1.5 architecture, no file
FAMILY_ARCHITECTURES = {SD15_NAME: "SD1.5", "sdxl": "SDXL"}  # architecture names the CLI takes without a file


PRECISIONS = ("fp16", "bf16", "no")
ROW_LABELS = {"fp16": "fp16", "bf16": "bf16", "no": "fp32 (no)"}
HINT = "If it does not fit: " + OUT_OF_MEMORY_HINT


def full_finetune_table(family: str = "SD1.5", resolution: int | None = None) -> list[dict]:
    """The full fine-tune's predicted peak (GiB) for every precision, checkpointing, optimizer, EMA and text-encoder
    choice, batch 1 + 1 prior: the README's table."""
    rows = []
    for precision in ("fp16", "bf16", "no"):
        for checkpointing in (True, False):
            for adam8 in (True, False):
                for ema in (False, True):
                    for text in (False, True):
                        pred = predict_memory(
                            "full",
                            resolution,
                            1,
                            text,
                            precision,
                            checkpointing,
                            family=family,
                            use_8bit_adam=adam8,
                            use_ema=ema,
                        )
                        rows.append(
                            dict(
                                precision=precision,
                                checkpointing=checkpointing,
                                use_8bit_adam=adam8,
                                use_ema=ema,
                                train_text_encoder=text,
                                peak=round(pred.peak, 2),
                            )
                        )
    return rows


def predict_ram(
    method, resolution, batch_size, train_text_encoder, precision, checkpointing, family="SD1.5", half_convs=False
) -> float:
    """A CPU run, GiB (extrapolated): the GPU model in `precision` (bf16, else fp32), with the VAE and text encoders
    counted in the training phase too, since they stay in RAM; `half_convs` (fp32, frozen UNet convs kept 16-bit):
    2 bytes less per conv weight in every phase."""
    size = FAMILY_SIZES[family]
    precision = "bf16" if precision == "bf16" else "no"
    pred = predict_memory(method, resolution, batch_size, train_text_encoder, precision, checkpointing, family=family)
    weight_bytes = 2 if precision == "bf16" else 4
    resident = size.vae * weight_bytes
    if not (method == "ti" or train_text_encoder):  # otherwise already counted in the training phase
        resident += size.text_encoders * weight_bytes
    saved = size.conv_weights * 2 / GIB if half_convs and precision == "no" and method != "full" else 0.0
    return max(pred.training + resident / GIB, pred.samples) - saved


# ---------------------------------------------------------------------------------------------------- report


def _torch_version() -> str:
    if torch.version.cuda:
        return f"{torch.__version__} (CUDA {torch.version.cuda})"
    if getattr(torch.version, "hip", None):
        return f"{torch.__version__} (ROCm {torch.version.hip})"
    return f"{torch.__version__} (CPU build)"


def _versions() -> list[tuple[str, str]]:
    rows = [("Python", f"{platform.python_version()} ({platform.system()} {platform.machine()})")]
    rows.append(("torch", _torch_version()))
    for dist in ("diffusers", "peft", "accelerate", "transformers", "safetensors", "bitsandbytes"):
        rows.append((dist, installed_version(dist) or "not installed"))
    rows.append(("DreamLoom", __version__))
    return rows


def _ram_gib() -> tuple[float | None, float | None]:
    """(total, available) RAM in GiB where the system says."""
    total = available = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (AttributeError, ValueError, OSError):
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024 / GIB
    except (OSError, ValueError, IndexError):
        pass
    return total, available


@dataclass
class _Device:
    kind: str  # cuda, mps or cpu
    lines: list[str]
    free_gib: float | None = None
    bf16: bool = True
    capability: tuple[int, int] | None = None


def _device() -> _Device:
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        free, total = free_cuda_bytes(index), props.total_memory  # free as `auto` checkpointing sees it
        capability = torch.cuda.get_device_capability(index)
        bf16 = gpu_has_bf16(index)
        count = torch.cuda.device_count()
        which = f"GPU {index} of {count}" if count > 1 else "GPU"
        lines = [
            f"CUDA {which}: {props.name}, compute capability {capability[0]}.{capability[1]}",
            f"memory: {total / GIB:.1f} GiB total, {free / GIB:.1f} GiB free",
            f"bf16: {'yes' if bf16 else 'no'}",
        ]
        return _Device("cuda", lines, free / GIB, bf16, capability)
    cores = os.cpu_count() or 1
    total, available = _ram_gib()
    ram = f"{total:.1f} GiB RAM" if total else "RAM unknown"
    if available is not None:
        ram += f" ({available:.1f} GiB available)"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return _Device("mps", [f"Apple MPS GPU (memory not reported); CPU: {cores} cores, {ram}"], bf16=False)
    return _Device("cpu", [f"CPU: {cores} cores, {ram}; no CUDA GPU"], bf16=False)


def _describe_model(spec: str) -> tuple[str, str | None]:
    """(what the model is, its family for the memory model: "SD1.5", "SDXL", or None for a built-in tiny model);
    raises the loader's DreamLoomError for a bad path or file."""
    if spec in BUILTIN_MODELS:
        return f"{spec}: DreamLoom's built-in {BUILTIN_RESOLUTION[spec]} px model", None
    if spec in FAMILY_ARCHITECTURES and not Path(spec).exists():
        family = FAMILY_ARCHITECTURES[spec]
        return f"the {family} architecture (no checkpoint given: its fine-tunes are the same size)", family
    path = resolve_model_path(spec)
    if path.is_dir():
        _check_diffusers_folder(path)
        family = family_of_folder(path)
        return f"{path}: a diffusers folder, loaded as {family.name}", family.name
    _check_model_file(path)
    family = family_of_file(path, read_safetensors_header(path))
    size = path.stat().st_size / 1e9
    return f"{path}: {family.name}, single file, {size:.2f} GB (header read, no weights)", family.name


def _stores_16_bit(spec: str) -> bool:
    """Whether the model's weights are fp16/bf16 in its files (headers only); an architecture name stands for the
    usual published checkpoint, which is fp16."""
    if spec in FAMILY_ARCHITECTURES and not Path(spec).exists():
        return True
    return stored_dtype(spec) in HALF_DTYPES


def _parse_checkpointing(value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    choices = {"auto": None, "true": True, "false": False}
    if str(value).lower() not in choices:
        raise DreamLoomError(f"Invalid gradient_checkpointing {value!r}.", "Use auto, true or false.")
    return choices[str(value).lower()]


def _check_arguments(method, resolution, batch_size, mixed_precision) -> None:
    if method not in ("lora", "ti", "full"):
        raise DreamLoomError(f"Invalid method {method!r}.", "Use lora, ti or full.")
    if mixed_precision not in ("auto", *PRECISIONS):
        raise DreamLoomError(f"Invalid mixed_precision {mixed_precision!r}.", "Use auto, no, fp16 or bf16.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DreamLoomError(f"Invalid batch size {batch_size!r}.", "Use a whole number of 1 or more.")
    if resolution is not None and (not 64 <= resolution <= 2048 or resolution % 8):
        raise DreamLoomError(
            f"Invalid resolution {resolution}.", "Use a multiple of 8 from 64 to 2048, for example 512."
        )


def _wrap(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, 112, initial_indent=indent, subsequent_indent=indent + "  ")


def _fits(peak: float, free: float) -> bool:
    return peak + CONTEXT_GIB <= free


def _suggestion(settings: dict, free: float, bf16: bool) -> str:
    """The first change, taken in the README's order (precision, checkpointing, resolution, batch), that fits."""
    s = dict(settings)
    changes = []
    steps = []
    if s["method"] == "full" and not s.get("use_8bit_adam"):  # 6 bytes less per trained weight
        steps.append(("use_8bit_adam", True, "use_8bit_adam true"))
    if s["precision"] == "no":
        steps.append(("precision", "bf16" if bf16 else "fp16", f"mixed_precision {'bf16' if bf16 else 'fp16'}"))
    if not s["checkpointing"]:
        steps.append(("checkpointing", True, "gradient_checkpointing true"))
    for res in range(s["resolution"] - 64, 255, -64):
        steps.append(("resolution", res, f"resolution {res}"))
    if s["batch_size"] > 1:
        steps.append(("batch_size", 1, "batch size 1"))
    for key, value, text in steps:
        s[key] = value
        if key == "resolution":
            changes = [c for c in changes if not c.startswith("resolution")]
        changes.append(text)
        peak = predict_memory(**s).peak
        if _fits(peak, free):
            return f"try {' + '.join(changes)} (predicted {peak:.2f} GiB)"
    return "even the smallest settings do not fit: close other GPU programs or use a GPU with more memory"


def _table(args: dict, chosen: tuple[str, bool], device: _Device) -> list[str]:
    head = f"  {'precision':<10} {'checkpointing':<14} {'training':>9} {'samples':>8} {'class img':>10} {'peak':>9}"
    lines = [head]
    for precision in PRECISIONS:
        for ckpt in (False, True):
            pred = predict_memory(precision=precision, checkpointing=ckpt, **args)
            cls = f"{pred.class_images:.2f}" if pred.class_images is not None else "-"
            notes = []
            if (precision, ckpt) == chosen:
                notes.append("<- chosen")
            if args["method"] == "full":
                notes.append("predicted")
            elif precision == "no" or (args["family"] == "SDXL" and not ckpt):
                notes.append("extrapolated")
            if precision == "bf16" and device.kind == "cuda" and not device.bf16:
                notes.append("no bf16 on this GPU")
            label, on = ROW_LABELS[precision], "on" if ckpt else "off"
            line = f"  {label:<10} {on:<14} {pred.training:>9.2f} {pred.samples:>8.2f} {cls:>10} {pred.peak:>5.2f} GiB"
            lines.append(line + (f"  {', '.join(notes)}" if notes else ""))
    return lines


def doctor(
    base_model: str = SD15_NAME,
    resolution: int | None = None,
    method: str = "lora",
    batch_size: int = 1,
    train_text_encoder: bool = False,
    mixed_precision: str = "auto",
    gradient_checkpointing="auto",
    use_8bit_adam: bool = False,
    use_ema: bool = False,
) -> str:
    """A plain-text report: versions, device, the settings DreamLoom would choose and the predicted peak memory.

    Reads at most a checkpoint's safetensors header; raises the loader's DreamLoomError for a missing file, a
    pickle checkpoint or another model family."""
    _check_arguments(method, resolution, batch_size, mixed_precision)
    requested_ckpt = _parse_checkpointing(gradient_checkpointing)
    model_text, family = _describe_model(base_model)
    if resolution is None:
        resolution = BUILTIN_RESOLUTION.get(base_model) or FAMILY_SIZES[family].resolution
    device = _device()

    out = ["DreamLoom doctor", "", "Versions"]
    out += [f"  {name:<13} {value}" for name, value in _versions()]
    out += ["", "Device"] + [f"  {line}" for line in device.lines]

    prior = method in ("lora", "full")
    rows = batch_size * (2 if prior else 1)
    what = f"LoRA rank 4{' + text-encoder LoRA' if train_text_encoder else ''}" if method == "lora" else "TI"
    if method == "full":
        optimizer = "8-bit AdamW" if use_8bit_adam else "AdamW"
        what = f"full fine-tune of the UNet{' and text encoder(s)' if train_text_encoder else ''}, {optimizer}"
        what += ", EMA" if use_ema else ""
    plural = "s" if batch_size > 1 else ""
    batch = f"batch {batch_size} + {batch_size} prior image{plural}" if prior else f"batch {batch_size}"
    out += ["", "Run", f"  model: {model_text}"]
    out.append(f"  {what}, {resolution} px, {batch} = {rows} UNet row{'s' if rows > 1 else ''} per step")

    precision, precision_why = resolve_mixed_precision(mixed_precision, device.kind)
    args = dict(
        method=method,
        resolution=resolution,
        batch_size=batch_size,
        train_text_encoder=train_text_encoder,
        family=family,
        use_8bit_adam=use_8bit_adam,
        use_ema=use_ema,
    )
    run = dict(args, precision=precision) if family else None
    ckpt, ckpt_why = resolve_gradient_checkpointing(requested_ckpt, device.kind, run, device.free_gib)
    tf32 = device.capability is not None and device.capability[0] >= 8
    tf32_why = "Ampere or newer" if tf32 else ("needs compute capability 8.0+" if device.kind == "cuda" else "no GPU")
    out += ["", "Settings DreamLoom would choose"]
    out.append(f"  mixed_precision         {precision} ({precision_why})")
    out.append(f"  gradient_checkpointing  {'on' if ckpt else 'off'} ({ckpt_why})")
    out.append(f"  TF32                    {'on' if tf32 else 'off'} ({tf32_why})")
    compute_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    half_convs, half_why = resolve_half_frozen_convs(None, device.kind, compute_dtype, torch_compile=False)
    if half_convs and method == "full":
        half_convs, half_why = False, "a full fine-tune trains the convs"
    elif half_convs and not _stores_16_bit(base_model):
        half_convs, half_why = False, "the checkpoint stores fp32 weights"
    out.append(f"  half_frozen_convs       {'on' if half_convs else 'off'} ({half_why})")
    if device.kind == "cpu":  # what `python -m trainer` and the job runner give a CPU training process
        out.append(f"  CPU allocator           {cpu_malloc.describe()}")
    if device.kind != "cuda":
        out += _wrap(
            "On a CUDA GPU, auto picks bf16 (fp16 where the GPU has no bf16: compute capability under 8.0) and "
            "turns gradient checkpointing on when the training steps would not fit the free memory without it "
            f"(predicted as below, with a {ERROR:.0%} margin and the CUDA context).",
            "  ",
        )

    out += [""]
    if family is None:
        out.append(f"Memory: {base_model} is tiny: a run needs well under 1 GB on any device (not modelled).")
        return "\n".join(out)

    where = "" if device.kind == "cuda" else ", on a GPU"
    out.append(
        f"Peak GPU memory of an {family} run (predicted, +-{ERROR:.0%}{where}; GiB allocated, without the CUDA context)"
    )
    out += _table(args, (precision, ckpt), device)
    chosen = predict_memory(precision=precision, checkpointing=ckpt, **args)
    out += _wrap(
        "phases: training = the training steps; samples = the sample grid (the VAE back on the GPU; a frozen text "
        "encoder only while it encodes)"
        f"{'; class img = making prior images' if prior else ''}.",
        "  ",
    )
    out.append("")
    if device.kind == "cuda":
        need = chosen.peak + CONTEXT_GIB
        if _fits(chosen.peak, device.free_gib):
            spare = device.free_gib - need
            tight = " (tight: within the prediction's error)" if spare < ERROR * chosen.peak else ""
            verdict = f"fits with {spare:.1f} GiB to spare{tight}"
        else:
            settings = dict(args, precision=precision, checkpointing=ckpt)
            verdict = f"does not fit: {_suggestion(settings, device.free_gib, device.bf16)}"
        out += _wrap(
            f"Verdict: {chosen.peak:.2f} GiB (predicted) + ~{CONTEXT_GIB} GiB CUDA context and cache = "
            f"{need:.1f} GiB of {device.free_gib:.1f} GiB free: {verdict}."
        )
    else:
        ram = predict_ram(method, resolution, batch_size, train_text_encoder, precision, ckpt, family, half_convs)
        total, available = _ram_gib()
        have = f"{available:.1f} GiB available" if available is not None else "RAM unknown"
        if total is not None:
            have += f" of {total:.1f} GiB"
        kind = "Apple MPS" if device.kind == "mps" else "no CUDA GPU"
        out += _wrap(
            f"Verdict: {kind}, so the table is for a CUDA GPU. Here the run keeps everything in RAM in "
            f"{'bf16' if precision == 'bf16' else 'fp32'}{' (frozen convs in fp16)' if half_convs else ''}: about "
            f"{ram:.1f} GiB (extrapolated), {have}."
        )
        if precision == "fp16":
            out.append("  fp16 training is not supported on the CPU: use mixed_precision no (or bf16) here.")
        if available is not None and ram > available:
            out.append("  That is more than is available: lower the resolution or batch size, or use a GPU.")
    if method == "full":
        saved = FAMILY_SIZES[family].unet * (FULL_OPTIMIZER_BYTES[False] - FULL_OPTIMIZER_BYTES[True]) / GIB
        out += _wrap(
            f"Full fine-tune: every UNet weight trains in fp32 with its gradient and optimizer state. On CUDA turn "
            f"use_8bit_adam on (bitsandbytes; {saved:.1f} GiB less for {family}: what fits SD1.5 in about 10 GiB with "
            "fp16 and gradient checkpointing); use_ema adds 4 bytes per weight. No full fine-tune has been measured "
            "on a GPU yet: these rows are predicted."
        )
    out += _wrap(HINT)
    return "\n".join(out)
