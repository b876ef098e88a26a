"""Textual Inversion embedding files: ComfyUI/A1111's `emb_params` file and diffusers' learned_embeds."""

from __future__ import annotations

from pathlib import Path

from ..errors import DreamLoomError
from ..files.atomic import atomic_save

EMBEDDING_KEY = "emb_params"  # the key A1111 and ComfyUI read
DIFFUSERS_EMBEDDING_NAME = "learned_embeds.safetensors"


def save_embeddings(rows, result_dir: Path, output_name: str, token: str, metadata: dict[str, str]) -> dict:
    """Write the [n, dim] rows as `<output_name>.safetensors` (ComfyUI, A1111) and learned_embeds (diffusers)."""
    from safetensors.torch import save_file

    rows = rows.detach().float().cpu().contiguous()
    comfy = atomic_save(
        result_dir / f"{output_name}.safetensors",
        lambda tmp: save_file({EMBEDDING_KEY: rows.clone()}, str(tmp), metadata=metadata),
    )
    diffusers = atomic_save(
        result_dir / DIFFUSERS_EMBEDDING_NAME, lambda tmp: save_file({token: rows.clone()}, str(tmp), metadata=metadata)
    )
    return {"embedding": str(comfy), "embedding_diffusers": str(diffusers)}


def load_embedding_into_pipeline(pipe, path: str, token: str) -> None:
    """Load one of our (or an A1111/diffusers) embedding files into a diffusers pipeline as `token`."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.exists():
        raise DreamLoomError(f"Embedding file not found: {path}", "Give the .safetensors file written by TI training.")
    sd = load_file(str(p))
    tensor = sd.get(EMBEDDING_KEY, next(iter(sd.values())))
    pipe.load_textual_inversion(tensor if tensor.ndim == 2 else tensor.unsqueeze(0), token=token)
