"""The checkpoint / LoRA tools: extract a LoRA from a fine-tune (the truncated SVD of its difference to the base),
merge LoRAs into a checkpoint, resize a LoRA to a lower rank. The maths is in lora_svd.py (the share each keeps
is energy: ||kept||^2 / ||difference||^2).

They work on single-file checkpoints in the original layout (SD1.5's LDM, SDXL's sgm) tensor by tensor, so memory
stays near one layer: `checkpoint_layout` names every layer a LoRA can hold the way kohya does (SD1.5's UNet by its
diffusers path, SDXL's by its LDM path, text encoders as lora_te_ / lora_te1_ / lora_te2_; SDXL's second text
encoder is stored in OpenCLIP's layout, with q, k and v fused into the rows of one `in_proj_weight`), plus the
other names ComfyUI maps to the same layer, which merging accepts.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..base_models.components import text_model_path
from ..base_models.detect import builtin_base_of, detect_family
from ..base_models.sd15 import SD15
from ..base_models.sdxl import SDXL
from ..errors import DreamLoomError
from ..files.atomic import atomic_save, check_new_file
from ..files.safetensors_copy import copy_safetensors
from ..files.safetensors_header import fingerprint_file, read_safetensors_header
from .kohya_names import kohya_module_name
from .ldm_layout import (
    SDXL_TEXT_2_PREFIX,
    SDXL_TEXT_PREFIX,
    TEXT_PREFIX,
    UNET_PREFIX,
    ldm_module_to_unet,
    ldm_unet_layout,
)
from .lora_export import kohya_network_metadata
from .lora_import import load_lora_file, lora_family
from .lora_svd import LowRank, lora_delta, lora_factors, low_rank, low_rank_of_product

MODULE_SETS = ("attention", "all")
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# safetensors dtype names of the floating-point tensors a LoRA can be merged into
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
UNCHANGED = 1e-6  # a layer whose difference is below this fraction of its weight (Frobenius) counts as unchanged
SHARE_MEASURE = "energy: ||kept||^2 / ||difference||^2 (the kept singular values squared over all of them squared)"
Progress = Callable[[int, int], None]

_UNET_ATTENTION = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_TEXT_ATTENTION = re.compile(r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")
_TEXT_LAYER = re.compile(r"^text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
_OPEN_CLIP_LAYER = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


@dataclass(frozen=True)
class Target:
    """One layer a LoRA module can change: a checkpoint tensor, or a band of its rows (SDXL's fused q/k/v)."""

    key: str
    shape: tuple[int, ...]  # the layer's weight shape (the band's, for a fused tensor)
    part: str  # "UNet", "text encoder", "text encoder 1", "text encoder 2"
    attention: bool  # an attention projection (the trainer's default LoRA targets)
    rows: tuple[int, int] | None = None


@dataclass
class CheckpointLayout:
    path: Path
    header: dict
    family: object  # base_models' SD15 or SDXL
    detected: str  # what detect_family calls the file, e.g. "SD1.5 inpainting"
    targets: dict[str, Target]  # kohya module name as DreamLoom writes it -> layer
    aliases: dict[str, str] = field(default_factory=dict)  # other names ComfyUI maps to a layer -> ours

    def target(self, module: str) -> tuple[str, Target] | None:
        name = module if module in self.targets else self.aliases.get(module)
        return (name, self.targets[name]) if name else None


def _keys(header: dict, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix) :]: tuple(v["shape"]) for k, v in header.items() if k.startswith(prefix)}


def checkpoint_layout(path: str | Path, header: dict | None = None) -> CheckpointLayout:
    """Every layer of a single-file SD1.5 or SDXL checkpoint that a LoRA can hold (Linear and Conv weights of the
    UNet and of the text encoders' transformer layers), by kohya name; other layouts are refused by name."""
    path = Path(path)
    header = header if header is not None else read_safetensors_header(path)
    detected = detect_family(header)
    unet = _keys(header, UNET_PREFIX)
    if _keys(header, SDXL_TEXT_PREFIX) and _keys(header, SDXL_TEXT_2_PREFIX) and unet:
        family = SDXL
    elif _keys(header, TEXT_PREFIX) and unet and not any(k.startswith("conditioner.") for k in header):
        family = SD15
    elif builtin_base_of(header):
        raise DreamLoomError(
            f"{path.name} is a fine-tune of DreamLoom's built-in test model {builtin_base_of(header)!r}, kept in "
            "diffusers' layout; the LoRA tools read SD1.5 and SDXL single-file checkpoints (original layout).",
            "Use them on a fine-tune of a real SD1.5 or SDXL checkpoint (the built-in models are for tests and the "
            "demo).",
        )
    else:
        raise DreamLoomError(
            f"{path.name} looks like {detected}; the LoRA tools read SD1.5 and SDXL single-file checkpoints (original "
            "layout, with their text encoders).",
            "Use an SD1.5 or SDXL .safetensors checkpoint, as ComfyUI's checkpoints folder holds them.",
        )
    layout = CheckpointLayout(path, header, family, detected, {})
    _add_unet(layout, unet)
    if family is SD15:
        _add_text(layout, _keys(header, TEXT_PREFIX), TEXT_PREFIX, "lora_te_", "text encoder", ("lora_te1_",))
    else:
        text_1 = _keys(header, SDXL_TEXT_PREFIX)
        _add_text(layout, text_1, SDXL_TEXT_PREFIX, "lora_te1_", "text encoder 1", ("lora_te_",))
        _add_open_clip(layout, _keys(header, SDXL_TEXT_2_PREFIX))
    return layout


def _add_unet(layout: CheckpointLayout, unet: dict) -> None:
    config = ldm_unet_layout(unet)
    for key, shape in unet.items():
        if not key.endswith(".weight") or len(shape) not in (2, 4):
            continue
        ldm = key.removesuffix(".weight")
        try:
            diffusers = ldm_module_to_unet(ldm, config)
        except KeyError:
            diffusers = None
        ldm_name = kohya_module_name("lora_unet_", ldm)
        diffusers_name = kohya_module_name("lora_unet_", diffusers) if diffusers else None
        ours = ldm_name if layout.family.kohya_unet_layout == "ldm" or diffusers_name is None else diffusers_name
        attention = bool(_UNET_ATTENTION.search(diffusers or ldm))
        layout.targets[ours] = Target(UNET_PREFIX + key, shape, "UNet", attention)
        for other in (ldm_name, diffusers_name):
            if other and other != ours:
                layout.aliases[other] = ours


def _add_text(layout, keys: dict, prefix: str, kohya_prefix: str, part: str, alias_prefixes=()) -> None:
    for key, shape in keys.items():
        module = text_model_path(key).removesuffix(".weight")
        if not key.endswith(".weight") or len(shape) != 2 or not _TEXT_LAYER.match(module):
            continue
        name = kohya_module_name(kohya_prefix, module)
        layout.targets[name] = Target(prefix + key, shape, part, bool(_TEXT_ATTENTION.search(module)))
        for alias in alias_prefixes:
            layout.aliases[kohya_module_name(alias, module)] = name


def _add_open_clip(layout: CheckpointLayout, keys: dict) -> None:
    for key, shape in keys.items():
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.weight", key) or re.fullmatch(
            r"transformer\.resblocks\.(\d+)\.attn\.(in_proj)_weight", key
        )
        if not m or len(shape) != 2:
            continue
        layer = f"text_model.encoder.layers.{m[1]}"
        if m[2] == "in_proj":  # q, k and v stacked in this order
            width = shape[0] // 3
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                name = kohya_module_name("lora_te2_", f"{layer}.self_attn.{proj}")
                rows = (i * width, (i + 1) * width)
                layout.targets[name] = Target(SDXL_TEXT_2_PREFIX + key, (width, shape[1]), "text encoder 2", True, rows)
        elif m[2] in _OPEN_CLIP_LAYER:
            module = _OPEN_CLIP_LAYER[m[2]]
            name = kohya_module_name("lora_te2_", f"{layer}.{module}")
            layout.targets[name] = Target(
                SDXL_TEXT_2_PREFIX + key, shape, "text encoder 2", module == "self_attn.out_proj"
            )


# --------------------------------------------------------------------------- reports


@dataclass
class ModuleShare:
    name: str
    rank: int
    kept: float  # share of the module's difference energy kept
    energy: float  # the module's ||difference||^2 (scaled, for a LoRA)


@dataclass
class ToolReport:
    action: str
    path: Path
    modules: list[ModuleShare] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # unchanged layers
    notes: list[str] = field(default_factory=list)
    coverage: float | None = None  # extract: the chosen layers' share of the whole difference energy

    @property
    def kept(self) -> float:
        """The share of the whole difference's energy kept, over all modules (weighted by their energy)."""
        total = sum(m.energy for m in self.modules)
        return sum(m.kept * m.energy for m in self.modules) / total if total > 0 else 1.0

    def summary(self) -> str:
        if not self.modules:
            return "\n".join([f"{self.action}: {self.path.name}", *self.notes])
        ranks = sorted({m.rank for m in self.modules})
        rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]} (median {_median(self.modules)})"
        shares = [m.kept for m in self.modules]
        lines = [
            f"{self.action}: {self.path.name}: {len(self.modules)} modules at rank {rank}; kept {_pct(self.kept)} of "
            f"the difference's energy (per module {_pct(min(shares))} to {_pct(max(shares))})"
        ]
        if self.skipped:
            lines.append(f"{len(self.skipped)} layers unchanged (no difference), left out")
        if self.coverage is not None:
            lines.append(f"the chosen layers hold {_pct(self.coverage)} of the difference of all LoRA-able layers")
        return "\n".join(lines + self.notes)

    def text(self) -> str:
        """The summary, then one line per module: its rank and kept share."""
        rows = [f"  {m.name}: rank {m.rank}, kept {_pct(m.kept)}" for m in self.modules]
        return "\n".join([self.summary(), "per module:", *rows]) if rows else self.summary()

    def shares_json(self) -> str:
        return json.dumps({m.name: [m.rank, round(m.kept, 6)] for m in self.modules}, separators=(",", ":"))


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _median(modules) -> int:
    return int(statistics.median(m.rank for m in modules))


def check_tool_args(rank: int, keep_share: float | None, precision: str | None = None) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise DreamLoomError(f"Invalid rank {rank!r}.", "Use a whole number of at least 1 (e.g. 8, 16, 32).")
    if keep_share is not None and not (0.0 < keep_share <= 1.0):
        raise DreamLoomError(
            f"Invalid kept share {keep_share!r}.", "Give a fraction above 0 and at most 1, e.g. 0.9 for 90%."
        )
    if precision is not None and precision not in PRECISIONS:
        raise DreamLoomError(f"Invalid precision {precision!r}.", f"Use one of: {', '.join(PRECISIONS)}.")


def _clamp_note(report: ToolReport, rank: int, clamped: list[str]) -> None:
    if clamped:
        more = " ..." if len(clamped) > 5 else ""
        report.notes.append(
            f"note: rank {rank} is more than {len(clamped)} modules allow; they keep their full rank "
            f"({', '.join(clamped[:5])}{more})"
        )


def _family_name(header: dict) -> str:
    return lora_family(header) or "an unnamed model family"


def _write_lora(out: Path, tensors: dict, metadata: dict, overwrite: bool) -> None:
    from safetensors.torch import save_file

    check_new_file(out, overwrite, "the output")
    atomic_save(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _share_metadata(report: ToolReport, rank: int, keep_share: float | None) -> dict[str, str]:
    """What an extracted or resized LoRA's file says of its rank and of the share of each module it kept."""
    return {
        "dreamloom.rank": str(rank),
        "dreamloom.keep_share": "" if keep_share is None else str(keep_share),
        "dreamloom.kept_share": f"{report.kept:.6f}",
        "dreamloom.share_measure": SHARE_MEASURE,
        "dreamloom.kept_shares": report.shares_json(),
    }


def _add_module(tensors: dict, name: str, result: LowRank, shape, alpha: float, dtype) -> None:
    down, up = lora_factors(result, shape)
    tensors[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
    tensors[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
    tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)


# --------------------------------------------------------------------------- extract


def _read(f, target: Target) -> torch.Tensor:
    if target.rows is None:
        return f.get_tensor(target.key)
    start, stop = target.rows
    return f.get_slice(target.key)[start:stop]


def _energy(weight: torch.Tensor) -> float:
    """The sum of squares of `weight`, to about 1e-7: per-row norms in fp32, added in fp64. A whole-tensor fp32 norm
    was off by 1e-3 on a 1280 x 11520 conv; upcasting the tensor to fp64 first took 20 s over SD1.5's 886 layers."""
    rows = torch.linalg.vector_norm(weight.reshape(weight.shape[0], -1), dim=1)
    return float(rows.double().square().sum())


def extract_lora(
    base: str | Path,
    tuned: str | Path,
    out: str | Path,
    rank: int,
    modules: str = "attention",
    text_encoders: bool = True,
    keep_share: float | None = None,
    precision: str = "fp16",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ToolReport:
    """A kohya LoRA (alpha = rank, so scale 1) holding the best rank-`rank` approximation of tuned - base for each
    chosen layer: the attention projections (the trainer's LoRA targets) or `all` Linear and Conv layers (3x3
    convs as LoCon); the text encoders' layers too where they differ. Unchanged layers are left out."""
    check_tool_args(rank, keep_share, precision)
    if modules not in MODULE_SETS:
        raise DreamLoomError(f"Invalid module set {modules!r}.", f"Use one of: {', '.join(MODULE_SETS)}.")
    base, tuned, out = Path(base), Path(tuned), Path(out)
    check_new_file(out, overwrite, "the output", (base, tuned))
    base_layout, tuned_layout = checkpoint_layout(base), checkpoint_layout(tuned)
    if base_layout.family is not tuned_layout.family:
        raise DreamLoomError(
            f"The base {base.name} is {base_layout.detected}, the fine-tune {tuned.name} is {tuned_layout.detected}.",
            "Give the checkpoint the fine-tune was trained from as the base.",
        )
    chosen = {
        name: t
        for name, t in base_layout.targets.items()
        if (modules == "all" or t.attention) and (text_encoders or t.part == "UNet")
    }
    _check_same_layers(base_layout, tuned_layout, base_layout.targets)
    from safetensors import safe_open

    report = ToolReport("extracted", out)
    tensors, clamped = {}, []
    dtype = PRECISIONS[precision]
    all_energy = chosen_energy = 0.0
    measure_all = len(chosen) < len(base_layout.targets)  # then also how much of the difference the rest holds
    items = sorted((base_layout.targets if measure_all else chosen).items())
    with safe_open(str(base), "pt") as fb, safe_open(str(tuned), "pt") as ft:
        for done, (name, target) in enumerate(items, 1):
            base_w = _read(fb, target).float()
            delta = _read(ft, target).float() - base_w
            energy = _energy(delta)
            all_energy += energy
            if name in chosen:
                if energy <= (UNCHANGED**2) * _energy(base_w) or energy == 0.0:
                    report.skipped.append(name)
                else:
                    chosen_energy += energy
                    result = low_rank(delta, rank, keep_share)
                    if rank > result.max_rank:
                        clamped.append(name)
                    _add_module(tensors, name, result, target.shape, result.rank, dtype)
                    report.modules.append(ModuleShare(name, result.rank, result.kept, result.energy))
            if progress:
                progress(done, len(items))
    if measure_all:
        report.coverage = chosen_energy / all_energy if all_energy > 0 else 1.0
        if modules == "attention" and report.coverage < 0.99:
            report.notes.append(
                "note: layers other than attention changed too; --modules all (the nodes' 'all') extracts them"
            )
    _clamp_note(report, rank, clamped)
    if not report.modules:
        raise DreamLoomError(
            f"{tuned.name} does not differ from {base.name} in any of the chosen layers ({modules}).",
            "Check that the fine-tune and the base are the right files, or choose --modules all.",
        )
    ranks = {m.rank for m in report.modules}
    meta = kohya_network_metadata(
        base_layout.family, rank if len(ranks) == 1 else "Dynamic", rank if len(ranks) == 1 else "Dynamic", out.stem
    )
    meta.update(
        {
            "ss_training_comment": f"DreamLoom: extracted from {tuned.name} - {base.name}",
            "dreamloom.tool": "extract",
            "dreamloom.base_model": base.name,
            "dreamloom.base_fingerprint": fingerprint_file(base),
            "dreamloom.tuned_model": tuned.name,
            "dreamloom.tuned_fingerprint": fingerprint_file(tuned),
            "dreamloom.modules": modules,
            **_share_metadata(report, rank, keep_share),
        }
    )
    _write_lora(out, tensors, meta, overwrite)
    return report


def _check_same_layers(base: CheckpointLayout, tuned: CheckpointLayout, targets: dict) -> None:
    missing = [n for n in targets if n not in tuned.targets]
    different = [
        f"{n}: {tuple(t.shape)} vs {tuple(tuned.targets[n].shape)}"
        for n, t in targets.items()
        if n in tuned.targets and tuned.targets[n].shape != t.shape
    ]
    if missing or different:
        what = [f"missing in the fine-tune: {', '.join(missing[:5])}"] if missing else []
        what += [f"of another shape: {'; '.join(different[:5])}"] if different else []
        raise DreamLoomError(
            f"{tuned.path.name} is not a fine-tune of {base.path.name}: {len(missing) + len(different)} layers "
            f"differ in name or shape ({'; '.join(what)}).",
            "Give the checkpoint the fine-tune was trained from as the base (same architecture and size).",
        )


# --------------------------------------------------------------------------- merge


@dataclass
class _Patch:
    rows: tuple[int, int] | None
    down: torch.Tensor
    up: torch.Tensor
    scale: float  # strength * alpha / rank


def _plan_lora(layout: CheckpointLayout, lora: Path, strength: float, plan: dict) -> list[str]:
    """Add one LoRA's modules to `plan` (checkpoint key -> patches); return the modules it changes."""
    header = read_safetensors_header(lora)
    made_for = lora_family(header)
    if made_for and made_for != layout.family.name:
        raise DreamLoomError(
            f"{lora.name} was made for {made_for}; the checkpoint {layout.path.name} is {layout.detected}.",
            f"Merge an {layout.family.name} LoRA into this checkpoint, or this LoRA into an {made_for} checkpoint.",
        )
    imported = load_lora_file(lora)
    unmapped = [m for m in imported.modules if layout.target(m) is None]
    if unmapped:
        raise DreamLoomError(
            f"{len(unmapped)} of {len(imported.modules)} modules of {lora.name} have no layer in "
            f"{layout.path.name} ({layout.detected}): {', '.join(unmapped[:8])}{' ...' if len(unmapped) > 8 else ''}",
            "Merge the LoRA into the model family and architecture it was trained on; DreamLoom never drops part of "
            "a LoRA silently.",
        )
    wrong, merged = [], []
    for module in imported.modules:
        name, target = layout.target(module)
        down = imported.tensors[f"{module}.lora_down.weight"]
        up = imported.tensors[f"{module}.lora_up.weight"]
        layer_in, lora_in = math.prod(target.shape[1:]), math.prod(down.shape[1:])
        if up.shape[0] != target.shape[0] or lora_in != layer_in:
            wrong.append(f"{module}: LoRA {lora_in}->{up.shape[0]}, layer {layer_in}->{target.shape[0]}")
            continue
        alpha = float(imported.tensors[f"{module}.alpha"])
        scale = strength * alpha / down.shape[0]
        plan.setdefault(target.key, []).append(_Patch(target.rows, down, up, scale))
        merged.append(name)
    if wrong:
        raise DreamLoomError(
            f"{len(wrong)} modules of {lora.name} do not fit the layers of {layout.path.name}: "
            + "; ".join(wrong[:5])
            + (" ..." if len(wrong) > 5 else ""),
            "The LoRA was trained on a model of another size: merge it into its own base model's family and size.",
        )
    return merged


def merge_loras(
    checkpoint: str | Path,
    loras: list[tuple[str | Path, float]],
    out: str | Path,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ToolReport:
    """A copy of `checkpoint` with W += strength * alpha/rank * up @ down for every module of every LoRA (any format
    lora_import reads), in the checkpoint's own layout, dtypes and metadata (plus what was merged)."""
    checkpoint, out = Path(checkpoint), Path(out)
    if not loras:
        raise DreamLoomError("No LoRA to merge.", "Give at least one LoRA file.")
    check_new_file(out, overwrite, "the output", [checkpoint, *(Path(p) for p, _ in loras)])
    layout = checkpoint_layout(checkpoint)
    plan: dict[str, list[_Patch]] = {}
    report = ToolReport("merged", out)
    merged_record = []
    for path, strength in loras:
        path = Path(path)
        if not math.isfinite(strength):
            raise DreamLoomError(f"Invalid strength {strength} for {path.name}.", "Give a finite number, e.g. 1.0.")
        names = _plan_lora(layout, path, float(strength), plan)
        report.notes.append(f"{path.name} at strength {strength:g}: {len(names)} modules")
        record = {"file": path.name, "strength": float(strength), "modules": len(names)}
        merged_record.append({**record, "fingerprint": fingerprint_file(path)})
    not_float = sorted(k for k in plan if layout.header[k]["dtype"] not in FLOAT_DTYPES)
    if not_float:
        raise DreamLoomError(
            f"{checkpoint.name} stores {len(not_float)} of the LoRA's layers as {layout.header[not_float[0]]['dtype']} "
            f"({not_float[0]} ...), which DreamLoom does not merge into.",
            "Merge into an fp16, bf16 or fp32 checkpoint.",
        )

    def transform(name: str, info: dict, raw: bytes):
        patches = plan.get(name)
        if not patches:
            return None
        dtype = FLOAT_DTYPES[info["dtype"]]
        weight = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(info["shape"]).float()
        for patch in patches:
            rows = slice(*patch.rows) if patch.rows else slice(None)
            band = weight[rows]
            band += lora_delta(patch.down, patch.up, patch.scale, band.shape)
        return weight.to(dtype).contiguous().view(torch.uint8).numpy().tobytes()

    metadata = dict(layout.header.get("__metadata__") or {})
    earlier = json.loads(metadata.get("dreamloom.merged_loras", "[]") or "[]")
    metadata["dreamloom.merged_loras"] = json.dumps(earlier + merged_record)
    metadata["dreamloom.merged_into"] = checkpoint.name
    check_new_file(out, overwrite, "the output")
    copy_safetensors(checkpoint, out, transform, metadata, progress)
    report.notes.insert(0, f"{len(plan)} layers of {checkpoint.name} ({layout.detected}) changed")
    return report


# --------------------------------------------------------------------------- resize


def resize_lora(
    lora: str | Path,
    out: str | Path,
    rank: int,
    keep_share: float | None = None,
    precision: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ToolReport:
    """The same LoRA at rank `rank` (or lower, where `keep_share` of a module's energy is reached sooner): each
    module's up @ down replaced by its truncated SVD, alpha set so that alpha / rank, the scale, stays as it was."""
    check_tool_args(rank, keep_share, precision)
    lora, out = Path(lora), Path(out)
    check_new_file(out, overwrite, "the output", (lora,))
    imported = load_lora_file(lora)
    report = ToolReport("resized", out)
    tensors, lower = {}, []
    for done, module in enumerate(imported.modules, 1):
        down = imported.tensors[f"{module}.lora_down.weight"]
        up = imported.tensors[f"{module}.lora_up.weight"]
        old_rank = down.shape[0]
        scale = float(imported.tensors[f"{module}.alpha"]) / old_rank
        result = low_rank_of_product(up, down, rank, keep_share)
        if rank > old_rank:
            lower.append(module)
        shape = (up.shape[0], *down.shape[1:]) if down.ndim == 4 else (up.shape[0], down.shape[1])
        dtype = PRECISIONS[precision] if precision else down.dtype
        _add_module(tensors, module, result, shape, scale * result.rank, dtype)
        report.modules.append(ModuleShare(module, result.rank, result.kept, result.energy * scale * scale))
        if progress:
            progress(done, len(imported.modules))
    if lower:
        report.notes.append(f"note: {len(lower)} modules already had a rank of at most {rank}: kept at their rank")
    ranks = {m.rank for m in report.modules}
    alphas = {float(tensors[f"{m.name}.alpha"]) for m in report.modules}
    family = {"SD1.5": SD15, "SDXL": SDXL}.get(lora_family(read_safetensors_header(lora)))
    network = kohya_network_metadata(
        family or SD15,
        ranks.pop() if len(ranks) == 1 else "Dynamic",
        alphas.pop() if len(alphas) == 1 else "Dynamic",
        out.stem,
    )
    if family is None:  # keep what the file says about its model (or that it says nothing), never invent it
        del network["ss_base_model_version"], network["modelspec.architecture"]
    meta = {**imported.metadata, **network}
    meta.update(
        {
            "dreamloom.tool": "resize",
            "dreamloom.resized_from": lora.name,
            **_share_metadata(report, rank, keep_share),
        }
    )
    _write_lora(out, tensors, meta, overwrite)
    return report
