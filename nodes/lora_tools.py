"""Extract LoRA, Merge LoRA into Checkpoint, Resize LoRA: the trainer's LoRA tools (trainer/formats/lora_tools.py)
run in ComfyUI's process, their results published into its loras / checkpoints folders, never over another file."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..trainer.errors import DreamLoomError
from . import comfy
from .widgets import choice_widget, float_widget, int_widget, string_widget

CATEGORY = "DreamLoom/tools"
RETURN_TOOLTIP = "The file's name in ComfyUI's {kind} folder (a _v2 suffix where another file had the name)."
REPORT_TOOLTIP = "What was kept: the share of the difference's energy (||kept||^2 / ||difference||^2), per module."


NONE_FOUND = "(no files found)"
SCRATCH_NAME = "result.safetensors"  # the tools' reports name the file they wrote: the scratch file


def _choices(kind: str) -> list[str]:
    """The .safetensors files of a models folder (the tools read no pickles), or a placeholder when there are none."""
    return [n for n in comfy.filename_list(kind) if n.lower().endswith((".safetensors", ".sft"))] or [NONE_FOUND]


def _input(kind: str, name: str) -> Path:
    path = comfy.full_path(kind, name) if name != NONE_FOUND else None
    if not path:
        raise DreamLoomError(
            f"{name!r} is not in the {kind} folder.", "Put a .safetensors file there, refresh (press R) and pick it."
        )
    return Path(path)


def _folder(kind: str) -> str:
    folders = comfy.folder_paths_for(kind)
    if not folders:
        raise DreamLoomError(f"ComfyUI has no {kind} folder configured.", "Check extra_model_paths.yaml.")
    return folders[0]


def _output_name(name: str) -> str:
    name = name.strip().removesuffix(".safetensors")
    if not name:
        raise DreamLoomError("No output name given.", "Type a file name (no folders) in output_name.")
    return name


def _progress(node_id):
    """A progress callback that moves ComfyUI's bar and stops at Cancel (the half-written file is removed)."""
    bar = comfy.progress_bar(1, node_id)

    def progress(done: int, total: int) -> None:
        if comfy.interrupt_requested():
            comfy.raise_interrupt()
        bar.update_absolute(done, total)

    return progress


def _make_and_publish(make, describe, kind: str, output_name: str, node_id) -> tuple[str, str]:
    """(published file name, report text): `make(path, progress)` writes a scratch file under DreamLoom's output
    folder (out of ComfyUI's model lists), moving ComfyUI's bar and stopping at Cancel; the file is then published
    into the `kind` folder as `output_name`, and `describe(report)` names it by its published name."""
    from ..trainer.files.atomic import publish

    name = _output_name(output_name)
    progress = _progress(node_id)
    folder = _folder(kind)
    scratch_root = Path(comfy.dreamloom_directory())
    scratch_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lora-tool-", dir=scratch_root) as scratch:
        tmp = Path(scratch) / SCRATCH_NAME
        report = make(tmp, progress)
        published = publish(tmp, folder, name, ".safetensors")
    return published.name, describe(report).replace(SCRATCH_NAME, published.name)


def _modules_choice():
    return choice_widget(
        ["attention", "all"],
        "attention",
        "attention: the attention projections (what DreamLoom's LoRA trains); all: every Linear and Conv layer "
        "(3x3 convs as LoCon).",
    )


class _ToolNode:
    """What the three tool nodes declare alike: they write a file, and return its name and a report."""

    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING")


class ExtractLoRA(_ToolNode):
    DESCRIPTION = (
        "A LoRA holding what a fine-tuned checkpoint changed from its base: the truncated SVD of each layer's "
        "difference at the chosen rank (kohya format, scale 1), so a fine-tune can be shared as a few MB. Reports "
        "the share of the difference kept. Publishes into the loras folder."
    )
    FUNCTION = "extract"
    RETURN_NAMES = ("lora_name", "report")
    OUTPUT_TOOLTIPS = (RETURN_TOOLTIP.format(kind="loras"), REPORT_TOOLTIP)

    @classmethod
    def INPUT_TYPES(cls):
        checkpoints = _choices("checkpoints")
        return {
            "required": {
                "base_ckpt_name": (checkpoints, {"tooltip": "The base checkpoint the fine-tune was trained from."}),
                "tuned_ckpt_name": (checkpoints, {"tooltip": "The fine-tuned checkpoint."}),
                "rank": int_widget(16, 1, 1024, "LoRA rank (clamped to what each layer allows)."),
                "modules": _modules_choice(),
                "text_encoders": ("BOOLEAN", {"default": True, "tooltip": "Include the text encoders' changes."}),
                "output_name": string_widget("extracted_lora", "File name for the LoRA (no folders)."),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def extract(self, base_ckpt_name, tuned_ckpt_name, rank, modules, text_encoders, output_name, unique_id=None):
        from ..trainer.formats.lora_tools import extract_lora

        base, tuned = _input("checkpoints", base_ckpt_name), _input("checkpoints", tuned_ckpt_name)
        return _make_and_publish(
            lambda tmp, progress: extract_lora(
                base, tuned, tmp, int(rank), modules=modules, text_encoders=bool(text_encoders), progress=progress
            ),
            lambda report: report.text(),
            "loras",
            output_name,
            unique_id,
        )


class MergeLoRA(_ToolNode):
    DESCRIPTION = (
        "A new checkpoint with a LoRA merged into its weights (W += strength * alpha/rank * up @ down), in the "
        "checkpoint's own layout and precision. Reads kohya, diffusers and PEFT LoRAs; a LoRA of another model "
        "family, or with modules the checkpoint lacks, is refused. Publishes into the checkpoints folder."
    )
    FUNCTION = "merge"
    RETURN_NAMES = ("ckpt_name", "report")
    OUTPUT_TOOLTIPS = (RETURN_TOOLTIP.format(kind="checkpoints"), "What was merged, and where.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ckpt_name": (_choices("checkpoints"), {"tooltip": "The checkpoint to merge into."}),
                "lora_name": (_choices("loras"), {"tooltip": "The LoRA to merge."}),
                "strength": float_widget(1.0, -10.0, 10.0, 0.01, "Multiplier on the LoRA (1.0 = as trained)."),
                "output_name": string_widget("merged", "File name for the new checkpoint (no folders)."),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def merge(self, ckpt_name, lora_name, strength, output_name, unique_id=None):
        from ..trainer.formats.lora_tools import merge_loras

        checkpoint, lora = _input("checkpoints", ckpt_name), _input("loras", lora_name)
        return _make_and_publish(
            lambda tmp, progress: merge_loras(checkpoint, [(lora, float(strength))], tmp, progress=progress),
            lambda report: report.summary(),
            "checkpoints",
            output_name,
            unique_id,
        )


class ResizeLoRA(_ToolNode):
    DESCRIPTION = (
        "The same LoRA at a lower rank: each module's up @ down replaced by its truncated SVD, its scale kept. "
        "Reports the share of each module kept; keep_share > 0 picks each module's rank dynamically (the lowest "
        "that keeps that share, at most rank). Publishes into the loras folder."
    )
    FUNCTION = "resize"
    RETURN_NAMES = ("lora_name", "report")
    OUTPUT_TOOLTIPS = (RETURN_TOOLTIP.format(kind="loras"), REPORT_TOOLTIP)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_name": (_choices("loras"), {"tooltip": "The LoRA to resize."}),
                "rank": int_widget(8, 1, 1024, "The new rank."),
                "keep_share": float_widget(
                    0.0, 0.0, 1.0, 0.01, "0: every module at rank; else the lowest rank keeping this share."
                ),
                "output_name": string_widget("resized_lora", "File name for the LoRA (no folders)."),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def resize(self, lora_name, rank, keep_share, output_name, unique_id=None):
        from ..trainer.formats.lora_tools import resize_lora

        lora, share = _input("loras", lora_name), float(keep_share) or None
        return _make_and_publish(
            lambda tmp, progress: resize_lora(lora, tmp, int(rank), keep_share=share, progress=progress),
            lambda report: report.text(),
            "loras",
            output_name,
            unique_id,
        )
