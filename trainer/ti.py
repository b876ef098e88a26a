"""Textual Inversion: learn the embedding rows of a new placeholder token; everything else stays frozen."""

from __future__ import annotations

from pathlib import Path

from .errors import DreamLoomError
from .methods import Method

# Our own prompt templates; "{}" is the placeholder. Style templates suit patterns and looks,
# object templates suit a thing.
STYLE_TEMPLATES = [
    "a pattern in the style of {}",
    "a fabric in the style of {}",
    "a close-up of a textile in the style of {}",
    "a design in the style of {}",
    "a swatch of cloth in the style of {}",
    "an illustration in the style of {}",
    "a detailed texture in the style of {}",
    "a flat scan of a fabric in the style of {}",
    "a woven cloth in the style of {}",
    "a bright pattern in the style of {}",
    "a photo of a textile in the style of {}",
    "a repeating motif in the style of {}",
]
OBJECT_TEMPLATES = [
    "a photo of {}",
    "a close-up photo of {}",
    "a rendering of {}",
    "a cropped photo of {}",
    "a bright photo of {}",
    "a good photo of {}",
    "a photo of the {}",
    "a clean photo of {}",
    "a detailed photo of {}",
    "a photo of a small {}",
    "a photo of a large {}",
    "a flat scan of {}",
]

EMBEDDING_KEY = "emb_params"


class TokenEmbeddingWithNewRows:
    """Factory for a token-embedding module: frozen base rows plus trainable rows for new ids."""

    @staticmethod
    def build(base_embedding, new_rows):
        import torch

        class _Embedding(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.base = base_embedding
                self.new_rows = torch.nn.Parameter(new_rows)
                self.first_new_id = base_embedding.num_embeddings

            @property
            def weight(self):  # code that reads .weight sees the full matrix
                return torch.cat([self.base.weight, self.new_rows.to(self.base.weight.dtype)])

            @property
            def num_embeddings(self):
                return self.first_new_id + self.new_rows.shape[0]

            @property
            def embedding_dim(self):
                return self.base.embedding_dim

            def forward(self, ids):
                is_new = ids >= self.first_new_id
                out = self.base(torch.where(is_new, torch.zeros_like(ids), ids))
                if bool(is_new.any()):
                    rows = self.new_rows.to(out.dtype)[(ids - self.first_new_id).clamp(min=0)]
                    out = torch.where(is_new.unsqueeze(-1), rows, out)
                return out

        return _Embedding()


def placeholder_tokens(token: str, num_vectors: int) -> list[str]:
    """diffusers' convention: '<tok>', '<tok>_1', ..., so load_textual_inversion expands prompts the same way."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def check_new_token(tokenizer, token: str, num_vectors: int) -> None:
    vocab = tokenizer.get_vocab()
    for tok in placeholder_tokens(token, num_vectors):
        if tok in vocab or f"{tok.lower()}</w>" in vocab:
            raise DreamLoomError(
                f"The placeholder token {tok!r} is already a word in the CLIP vocabulary, so training it would change that word.",
                "Use a made-up token in angle brackets, for example '<sks-fabric>'.",
            )


def initializer_id(tokenizer, initializer: str) -> int:
    ids = tokenizer.encode(initializer, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise DreamLoomError(
            f"The initializer {initializer!r} is {len(ids)} tokens ({', '.join(pieces)}), not one.",
            "Use one common word that describes the subject, for example 'pattern', 'fabric' or 'cloth'.",
        )
    return ids[0]


class TextualInversionMethod(Method):
    name = "ti"
    trains_text_encoder = True  # prompts go through the text encoder every step

    def __init__(self, cfg):
        super().__init__(cfg)
        self.tokens = placeholder_tokens(cfg.placeholder_token, cfg.num_vectors)
        self.templates = {"style": STYLE_TEMPLATES, "object": OBJECT_TEMPLATES}.get(cfg.ti_templates, STYLE_TEMPLATES)
        self.init_norm = None

    @property
    def phrase(self) -> str:
        return " ".join(self.tokens)

    def setup(self, comps) -> None:
        tok = comps.tokenizer
        check_new_token(tok, self.cfg.placeholder_token, self.cfg.num_vectors)
        init_id = initializer_id(tok, self.cfg.initializer_token)
        te = comps.text_encoder
        base = te.get_input_embeddings()
        if base.num_embeddings != len(tok):
            raise DreamLoomError("The tokenizer and text encoder disagree on the vocabulary size.", "Reload the base model and train again.")
        added = tok.add_tokens(self.tokens)
        if added != len(self.tokens):
            raise DreamLoomError(f"Could not add the placeholder token(s) {self.tokens}.", "Pick another placeholder token.")
        init = base.weight.detach()[init_id].float()
        self.init_norm = float(init.norm())
        new_rows = init.unsqueeze(0).repeat(self.cfg.num_vectors, 1).clone()
        te.requires_grad_(False)
        te.set_input_embeddings(TokenEmbeddingWithNewRows.build(base, new_rows))
        self._embedding(comps).new_rows.requires_grad_(True)
        if tok.convert_tokens_to_ids(self.tokens[0]) != base.num_embeddings:
            raise DreamLoomError("The placeholder token did not get the next free id.", "Reload the base model and train again.")

    def _embedding(self, comps):
        te = getattr(comps.text_encoder, "module", comps.text_encoder)
        return te.get_input_embeddings()

    def models_to_prepare(self, comps) -> dict:
        return {"text_encoder": comps.text_encoder}

    def param_groups(self, comps) -> list[dict]:
        return [{"params": [self._embedding(comps).new_rows], "lr": self.cfg.learning_rate}]

    def trainable_state(self, comps) -> dict:
        return {"ti.new_rows": self._embedding(comps).new_rows.detach().float().cpu().clone()}

    def load_trainable_state(self, comps, state: dict) -> None:
        rows = self._embedding(comps).new_rows
        if "ti.new_rows" not in state or state["ti.new_rows"].shape != rows.shape:
            raise DreamLoomError("The checkpoint does not fit this embedding (other num_vectors or model).", "Resume with the same settings, or start a new run.")
        import torch

        with torch.no_grad():
            rows.copy_(state["ti.new_rows"].to(rows.device, rows.dtype))

    def all_instance_prompts(self, captions) -> list[str]:
        return []  # not cached: the text encoder runs every step

    def instance_prompt(self, index: int, caption: str | None, position: int) -> str:
        if self.cfg.ti_templates == "captions" and caption:
            text = caption.replace(self.cfg.placeholder_token, self.phrase)
            return text if self.phrase in text else f"{self.phrase}, {text}"
        # Template for (image, epoch): image i sees template (epoch + i) mod T, so over T epochs every
        # image is shown with every template.
        epoch = position // max(self.n_images, 1)
        return self.templates[(epoch + index) % len(self.templates)].format(self.phrase)

    def after_optimizer_step(self, comps) -> None:
        if not self.cfg.clamp_norm:
            return
        import torch

        rows = self._embedding(comps).new_rows
        with torch.no_grad():
            norms = rows.norm(dim=1, keepdim=True).clamp(min=1e-12)
            rows.mul_(torch.clamp(self.init_norm / norms, max=1.0))

    def sample_prompts(self) -> list[str]:
        if self.cfg.sample_prompts:
            prompts = [p.replace(self.cfg.placeholder_token, self.phrase) for p in self.cfg.sample_prompts]
        else:
            p = self.phrase
            prompts = [f"a pattern in the style of {p}", f"a dress made of fabric in the style of {p}", f"a watercolor painting in the style of {p}"]
        if self.cfg.class_prompt not in prompts:
            prompts.append(self.cfg.class_prompt)
        return prompts

    def export(self, comps, result_dir: Path, step: int) -> dict:
        from safetensors.torch import save_file

        from .fsutil import atomic_save

        rows = self._embedding(comps).new_rows.detach().float().cpu().contiguous()
        meta = {
            "dreamloom.format": "textual_inversion",
            "dreamloom.token": self.cfg.placeholder_token,
            "dreamloom.initializer": self.cfg.initializer_token,
            "dreamloom.num_vectors": str(self.cfg.num_vectors),
            "dreamloom.steps": str(step),
            "dreamloom.base_model": comps.source,
            "dreamloom.base_fingerprint": comps.fingerprint,
            "dreamloom.config": self.cfg.to_json(),
            "modelspec.architecture": "stable-diffusion-v1/textual-inversion",
        }
        a1111 = atomic_save(result_dir / f"{self.cfg.output_name}.safetensors",
                            lambda tmp: save_file({EMBEDDING_KEY: rows.clone()}, str(tmp), metadata=meta))
        diffusers = atomic_save(result_dir / "learned_embeds.safetensors",
                                lambda tmp: save_file({self.cfg.placeholder_token: rows.clone()}, str(tmp), metadata=meta))
        return {"embedding": str(a1111), "embedding_diffusers": str(diffusers), "token": self.cfg.placeholder_token,
                "comfy_prompt": f"embedding:{self.cfg.output_name}"}


def load_embedding_into_pipeline(pipe, path: str, token: str) -> None:
    """Load one of our (or an A1111/diffusers) embedding files into a diffusers pipeline as `token`."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.exists():
        raise DreamLoomError(f"Embedding file not found: {path}", "Give the .safetensors file written by TI training.")
    sd = load_file(str(p))
    tensor = sd.get(EMBEDDING_KEY, next(iter(sd.values())))
    pipe.load_textual_inversion(tensor if tensor.ndim == 2 else tensor.unsqueeze(0), token=token)
