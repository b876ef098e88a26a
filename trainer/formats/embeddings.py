"""Textual Inversion embedding files: ComfyUI/A1111's `emb_params` file and diffusers' learned_embeds."""

from __future__ import annotations

from pathlib import Path

from ..errors import DreamLoomError
from ..files.atomic import atomic_save

EMBEDDING_KEY = "emb_params"  # the key A1111 and ComfyUI read for SD1.5
SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")  # ... and for SDXL: one tensor per text encoder
DIFFUSERS_EMBEDDING_NAME = "learned_embeds.safetensors"
DIFFUSERS_EMBEDDING_NAME_2 = "learned_embeds_2.safetensors"  # SDXL's second text encoder, as diffusers' SDXL TI


def save_embeddings(rows: dict, result_dir: Path, output_name: str, token: str, metadata: dict[str, str]) -> dict:
    """Write the trained rows, {file key: [n, dim]} ({"emb_params": ...} for SD1.5, {"clip_l", "clip_g"} for
    SDXL), as `<output_name>.safetensors` (ComfyUI, A1111) and diffusers' learned_embeds file(s) ({token: rows},
    one file per text encoder)."""
    from safetensors.torch import save_file

    rows = {key: r.detach().float().cpu().contiguous() for key, r in rows.items()}
    comfy = atomic_save(
        result_dir / f"{output_name}.safetensors",
        lambda tmp: save_file({k: r.clone() for k, r in rows.items()}, str(tmp), metadata=metadata),
    )
    files = {"embedding": str(comfy)}
    targets = (DIFFUSERS_EMBEDDING_NAME, "embedding_diffusers"), (DIFFUSERS_EMBEDDING_NAME_2, "embedding_diffusers_2")
    for encoder_rows, (name, field) in zip(rows.values(), targets):
        tensors = {token: encoder_rows.clone()}
        files[field] = str(
            atomic_save(result_dir / name, lambda tmp, t=tensors: save_file(t, str(tmp), metadata=metadata))
        )
    return files


def load_embedding_into_pipeline(pipe, path: str, token: str) -> None:
    """Load one of our (or an A1111/ComfyUI/diffusers) embedding files into a diffusers pipeline as `token`: an
    SDXL file's clip_l and clip_g rows into the pipeline's two text encoders."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.exists():
        raise DreamLoomError(f"Embedding file not found: {path}", "Give the .safetensors file written by TI training.")
    sd = load_file(str(p))
    two_encoders = getattr(pipe, "text_encoder_2", None) is not None
    if all(k in sd for k in SDXL_EMBEDDING_KEYS) != two_encoders:
        made_for = "SDXL" if all(k in sd for k in SDXL_EMBEDDING_KEYS) else "SD1.5"
        raise DreamLoomError(
            f"{p.name} is an {made_for} embedding; this model is {'SDXL' if two_encoders else 'SD1.5'}.",
            "Use an embedding trained on the same model family as the base model.",
        )

    def rows(tensor):
        return tensor if tensor.ndim == 2 else tensor.unsqueeze(0)

    if two_encoders:
        pipe.load_textual_inversion(
            rows(sd["clip_l"]), token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            rows(sd["clip_g"]), token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
        return
    pipe.load_textual_inversion(rows(sd.get(EMBEDDING_KEY, next(iter(sd.values())))), token=token)
