"""Run a trainer job from a node: free VRAM, start the worker, mirror progress, forward interrupts."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..trainer.errors import DreamLoomError
from . import comfy

BUILTIN_TINY = "tiny (built-in test model)"
BUILTIN_TINY_FABRIC = "tiny-fabric (built-in 128 px fabric model)"
BUILTIN_TINY_SDXL = "tiny-sdxl (built-in 64 px SDXL test model)"
# the label each built-in model has in a checkpoint list -> its name in the trainer
BUILTIN_LABELS = {BUILTIN_TINY_FABRIC: "tiny-fabric", BUILTIN_TINY: "tiny", BUILTIN_TINY_SDXL: "tiny-sdxl"}
BUILTIN_MODELS = tuple(BUILTIN_LABELS.values())
PREVIEW_MAX_PX = 512
# The size a VAE or a preview gets where no node says which model it is for (a VAE from core Load Checkpoint, SLERP
# Noise without a VAE): SD1.5's. Wherever the model is known, its own native size is used (native_resolution).
SD15_RESOLUTION = 512
FAMILIES = "SD1.5 or SDXL"
BASE_MODEL_INPUT = (
    "DL_BASE_MODEL",
    {"tooltip": "From Load Checkpoint (DreamLoom): train on the model it loads (overrides ckpt_name)."},
)


def checkpoint_choices() -> list[str]:
    return comfy.filename_list("checkpoints") + [BUILTIN_TINY_FABRIC, BUILTIN_TINY, BUILTIN_TINY_SDXL]


def resolve_checkpoint(name: str) -> str:
    if name in BUILTIN_LABELS:
        return BUILTIN_LABELS[name]
    path = comfy.full_path("checkpoints", name)
    if not path or not os.path.exists(path):
        raise DreamLoomError(
            f"Checkpoint {name!r} not found in ComfyUI's checkpoints folder.",
            f"Pick an {FAMILIES} checkpoint from the list (put .safetensors files in models/checkpoints).",
        )
    return path


def native_resolution(base_model: str) -> int:
    """The size a model was trained at: the built-in models' own, 1024 for an SDXL checkpoint, 512 for SD1.5."""
    from ..trainer.base_models.native import native_resolution as of_model

    return of_model(base_model)


def model_family(base_model: str) -> str | None:
    """The family of a built-in model or checkpoint file as DreamLoom names it ("SD1.5", "SDXL"; for a model
    DreamLoom does not train, what it looks like, e.g. "SD2" or "SDXL refiner"); None if the file cannot be read."""
    from ..trainer.base_models.detect import detect_family
    from ..trainer.files.safetensors_header import read_safetensors_header

    if base_model in BUILTIN_MODELS:
        from ..trainer.base_models.load import BUILTIN_FAMILIES

        return BUILTIN_FAMILIES[base_model].name
    try:
        return detect_family(read_safetensors_header(Path(base_model)))
    except Exception:  # noqa: BLE001 - a file core loads but we cannot read (e.g. a .ckpt): no family to compare
        return None


def builtin_finetune_base(base_model: str) -> str | None:
    """The built-in model a checkpoint file is a DreamLoom full fine-tune of ("tiny", ...), else None."""
    from ..trainer.base_models.detect import builtin_base_of
    from ..trainer.files.safetensors_header import read_safetensors_header

    if base_model in BUILTIN_MODELS or not str(base_model).endswith((".safetensors", ".sft")):
        return None
    try:
        return builtin_base_of(read_safetensors_header(Path(base_model)))
    except DreamLoomError:
        return None


def model_fingerprint(base_model: str) -> str:
    """The base model's fingerprint as the worker will compute it (cheap: header and samples)."""
    from ..trainer.base_models.load import model_fingerprint as fingerprint

    return fingerprint(base_model)


def _load_preview(path: str):
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def run_with_progress(run_dir: Path, total: int, node_id=None) -> dict:
    """Run the job in `run_dir`; ProgressBar updates carry the newest sample; interrupts stop the worker."""
    from ..trainer.jobs import parent as jobs  # here, not at the top: ComfyUI's start-up stays light

    done = jobs.finished_outputs(run_dir)
    if done is not None:
        return done
    note = comfy.free_memory()
    if note:
        logging.getLogger("DreamLoom").warning("[DreamLoom] %s", note)  # ComfyUI's console
    pbar = comfy.progress_bar(max(total, 1), node_id)
    state = {"step": 0, "total": max(total, 1)}

    def on_event(event: dict) -> None:
        kind = event["event"]
        if kind not in ("progress", "sample"):
            return
        if kind == "progress":
            state["step"], state["total"] = int(event.get("step", 0)), max(int(event.get("total", total)), 1)
        picture = event.get("path") if kind == "sample" else event.get("latest")  # a grid, or a new class image
        preview = None
        if picture:
            try:
                preview = ("PNG", _load_preview(picture), PREVIEW_MAX_PX)
            except OSError:
                pass
        # The picture goes with the update that brings it, and only then: the editor keeps showing it, and
        # ComfyUI encodes and sends a preview on every update that carries one (on a CPU the worker reports
        # every step: a PNG per step took CPU from the training beside it).
        pbar.update_absolute(min(state["step"], state["total"]), state["total"], preview)

    try:
        return jobs.run_job(run_dir, on_event=on_event, should_interrupt=comfy.interrupt_requested)
    except jobs.JobInterrupted:
        comfy.raise_interrupt()
        raise  # raise_interrupt always raises; this keeps linters calm


def ui_images(paths: list[str]) -> list[dict]:
    """Entries for a node's {"ui": {"images": [...]}} for files under ComfyUI's output folder."""
    out_root = Path(comfy.output_directory()).resolve()
    items = []
    for p in paths:
        rel = Path(p).resolve().relative_to(out_root)
        items.append(
            {
                "filename": rel.name,
                "subfolder": str(rel.parent).replace(os.sep, "/") if str(rel.parent) != "." else "",
                "type": "output",
            }
        )
    return items
