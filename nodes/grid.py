"""Prompt Batch and Image Grid: the two small pieces core ComfyUI lacks for labelled comparison grids."""

from __future__ import annotations

from ..trainer.errors import DreamLoomError
from .images import batch_to_pil, pil_to_batch
from .loader import check_embeddings
from .widgets import int_widget, string_widget

CATEGORY = "DreamLoom/utils"


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


class PromptBatch:
    DESCRIPTION = (
        "Encodes one prompt per line into a single CONDITIONING batch (one entry per line), so one core KSampler "
        "with a latent batch of the same size renders every prompt. '{s}' in a line is replaced by subject, "
        "which a training node can supply (e.g. embedding:<name>). A line may start with 'label: '."
    )
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "STRING", "INT")
    RETURN_NAMES = ("conditioning", "labels", "count")
    OUTPUT_TOOLTIPS = (
        "One conditioning entry per prompt line.",
        "The labels, one per line, for Image Grid.",
        "Number of prompts (use it as the latent batch size).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The CLIP to encode with (after a LoRA loader, if any)."}),
                "prompts": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "dress: a dress made of {s}\nwallpaper: a wallpaper with {s}",
                        "tooltip": "One prompt per line; 'label: prompt' sets the grid label; {s} is the subject.",
                    },
                ),
                "subject": string_widget("sks african fabric pattern", "Replaces {s} in every line."),
            }
        }

    def encode(self, clip, prompts, subject):
        import torch

        lines = _lines(prompts)
        if not lines:
            raise DreamLoomError("No prompts given.", "Write one prompt per line.")
        labels, texts = [], []
        for line in lines:
            label, sep, text = line.partition(": ")
            if not sep or "{s}" in label:
                label, text = line, line
            texts.append(text.replace("{s}", subject))
            labels.append(label.replace("{s}", subject))
        check_embeddings(clip, texts)
        conds, pooled = [], []
        for text in texts:
            tokens = clip.tokenize(text)
            cond, pool = clip.encode_from_tokens(tokens, return_pooled=True)
            conds.append(cond)
            pooled.append(pool)
        longest = max(c.shape[1] for c in conds)
        if any(c.shape[1] != longest for c in conds):  # prompts over 77 tokens: pad with the last chunk's end
            conds = [
                torch.cat([c, c[:, -1:].expand(1, longest - c.shape[1], c.shape[2])], 1) if c.shape[1] < longest else c
                for c in conds
            ]
        meta = {"pooled_output": torch.cat(pooled)} if pooled[0] is not None else {}
        return ([[torch.cat(conds), meta]], "\n".join(labels), len(texts))


class ImageGrid:
    DESCRIPTION = (
        "Arranges an IMAGE batch in a labelled grid (labels one per line, e.g. from Prompt Batch) "
        "with an optional title."
    )
    CATEGORY = CATEGORY
    FUNCTION = "grid"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("grid",)
    OUTPUT_TOOLTIPS = ("The grid as one image.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images, in reading order."}),
                "columns": int_widget(3, 1, 64, "Images per row."),
                "labels": (
                    "STRING",
                    {"multiline": True, "default": "", "tooltip": "One label per line (may be empty)."},
                ),
                "title": string_widget("", "A title line above the grid (optional)."),
            }
        }

    def grid(self, images, columns, labels, title):
        from ..trainer.pictures.grid import labelled_grid

        pil = batch_to_pil(images)
        names = labels.splitlines() if labels.strip() else None
        if names is not None:
            names = (names + [""] * len(pil))[: len(pil)]
        out = labelled_grid(pil, names, cols=int(columns), tile=pil[0].width, title=title or None)
        return (pil_to_batch([out]),)
