"""Textual Inversion: learn the embedding rows of a new placeholder token; everything else stays frozen."""

from __future__ import annotations

from pathlib import Path

import torch

from ...data.captions import with_token
from ...errors import DreamLoomError
from ...formats.embeddings import save_embeddings
from .base import Method

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


class TokenEmbeddingWithNewRows(torch.nn.Module):
    """A token embedding: the frozen base rows plus trainable rows for the new ids that follow them.

    peft's TrainableTokens does a similar job, but keeps a delta over the whole vocabulary's ids and
    saves differently; this keeps the new rows as one small parameter that is the exported embedding.
    """

    def __init__(self, base_embedding, new_rows):
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
        # Always merged, even when no id is new: asking first (`if is_new.any()`) made the host wait for the GPU
        # at every training step. A batch without the token then gives the rows a zero gradient, as a full
        # embedding matrix would.
        last = self.new_rows.shape[0] - 1
        rows = self.new_rows.to(out.dtype)[(ids - self.first_new_id).clamp(min=0, max=last)]
        return torch.where(is_new.unsqueeze(-1), rows, out)


def placeholder_tokens(token: str, num_vectors: int) -> list[str]:
    """diffusers' convention: '<tok>', '<tok>_1', ..., so load_textual_inversion expands prompts the same way."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def check_new_token(tokenizer, token: str, num_vectors: int) -> None:
    vocab = tokenizer.get_vocab()
    for tok in placeholder_tokens(token, num_vectors):
        if tok in vocab or f"{tok.lower()}</w>" in vocab:
            raise DreamLoomError(
                f"The placeholder token {tok!r} is already a word in the CLIP vocabulary, so training it would "
                f"change that word.",
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
    uses_prior_preservation = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.tokens = placeholder_tokens(cfg.placeholder_token, cfg.num_vectors)
        self.templates = {"style": STYLE_TEMPLATES, "object": OBJECT_TEMPLATES}.get(cfg.ti_templates, STYLE_TEMPLATES)
        self.init_norms: dict[str, float] = {}

    @property
    def phrase(self) -> str:
        return " ".join(self.tokens)

    def setup(self, comps) -> None:
        """The placeholder token in every tokenizer of the model, and its rows in every text encoder (SDXL: both,
        trained together), each initialised from that encoder's row of the initializer word."""
        tokenizers = comps.tokenizers()
        for name, te in comps.text_encoders().items():
            tok = tokenizers[name]
            check_new_token(tok, self.cfg.placeholder_token, self.cfg.num_vectors)
            init_id = initializer_id(tok, self.cfg.initializer_token)
            base = te.get_input_embeddings()
            if base.num_embeddings != len(tok):
                raise DreamLoomError(
                    "The tokenizer and text encoder disagree on the vocabulary size.",
                    "Reload the base model and train again.",
                )
            added = tok.add_tokens(self.tokens)
            if added != len(self.tokens):
                raise DreamLoomError(
                    f"Could not add the placeholder token(s) {self.tokens}.", "Pick another placeholder token."
                )
            init = base.weight.detach()[init_id].float()
            self.init_norms[name] = float(init.norm())
            new_rows = init.unsqueeze(0).repeat(self.cfg.num_vectors, 1).clone()
            te.requires_grad_(False)
            te.set_input_embeddings(TokenEmbeddingWithNewRows(base, new_rows))
            te.get_input_embeddings().new_rows.requires_grad_(True)
            if tok.convert_tokens_to_ids(self.tokens[0]) != base.num_embeddings:
                raise DreamLoomError(
                    "The placeholder token did not get the next free id.", "Reload the base model and train again."
                )

    def new_rows(self, comps) -> dict:
        """The trained rows per text encoder attribute: {"text_encoder": [n, 768]} (+ "text_encoder_2" for SDXL)."""
        return {name: te.get_input_embeddings().new_rows for name, te in comps.text_encoders().items()}

    def trainable_modules(self, comps) -> dict:
        return comps.text_encoders()

    def param_groups(self, comps) -> list[dict]:
        return [{"params": list(self.new_rows(comps).values()), "lr": self.cfg.learning_rate}]

    @staticmethod
    def _state_key(name: str) -> str:
        return "ti.new_rows" if name == "text_encoder" else f"ti.new_rows.{name}"

    def trainable_state(self, comps) -> dict:
        return {self._state_key(n): rows.detach().float().cpu().clone() for n, rows in self.new_rows(comps).items()}

    def load_trainable_state(self, comps, state: dict) -> None:
        for name, rows in self.new_rows(comps).items():
            saved = state.get(self._state_key(name))
            if saved is None or saved.shape != rows.shape:
                raise DreamLoomError(
                    "The checkpoint does not fit this embedding (other num_vectors or model).",
                    "Resume with the same settings, or start a new run.",
                )
            with torch.no_grad():
                rows.copy_(saved.to(rows.device, rows.dtype))

    def instance_prompt(self, index: int, caption: str | None, position: int) -> str:
        if self.cfg.ti_templates == "captions" and caption:
            text = with_token(caption.replace(self.cfg.placeholder_token, self.phrase), self.phrase)
            return self.captions.vary(text, index, position)
        # Template for (image, epoch): image i sees template (epoch + i) mod T, so over T epochs every
        # image is shown with every template.
        epoch = position // max(self.n_images, 1)
        return self.templates[(epoch + index) % len(self.templates)].format(self.phrase)

    def validation_prompt(self, caption: str | None, concept: int = 0) -> str:
        if self.cfg.ti_templates == "captions" and caption:
            return with_token(caption.replace(self.cfg.placeholder_token, self.phrase), self.phrase)
        return self.templates[0].format(self.phrase)

    def after_optimizer_step(self, comps) -> None:
        if not self.cfg.clamp_norm:
            return
        with torch.no_grad():
            for name, rows in self.new_rows(comps).items():
                norms = rows.norm(dim=1, keepdim=True).clamp(min=1e-12)
                rows.mul_(torch.clamp(self.init_norms[name] / norms, max=1.0))

    # Sample prompts go through a diffusers pipeline, whose textual-inversion loader expands a multi-vector
    # token '<t>' into '<t> <t>_1 ...' itself; expanding here too gave '<t> <t>_1 <t> <t>_1_1'. So samples
    # carry the bare token, and only the training prompts (encoded by us) carry the expanded phrase.
    def default_sample_prompts(self) -> list[str]:
        p = self.cfg.placeholder_token
        return [
            f"a pattern in the style of {p}",
            f"a dress made of fabric in the style of {p}",
            f"a watercolor painting in the style of {p}",
        ]

    def export(self, comps, result_dir: Path, step: int) -> dict:
        meta = {
            "dreamloom.format": "textual_inversion",
            "dreamloom.token": self.cfg.placeholder_token,
            "dreamloom.initializer": self.cfg.initializer_token,
            "dreamloom.num_vectors": str(self.cfg.num_vectors),
            "dreamloom.steps": str(step),
            "dreamloom.base_model": comps.source,
            "dreamloom.base_fingerprint": comps.fingerprint,
            "dreamloom.config": self.cfg.to_json(),
            "modelspec.architecture": f"{comps.family.modelspec_architecture}/textual-inversion",
        }
        rows = {comps.family.embedding_keys[name]: r for name, r in self.new_rows(comps).items()}
        files = save_embeddings(rows, result_dir, self.cfg.output_name, self.cfg.placeholder_token, meta)
        return {**files, "token": self.cfg.placeholder_token, "comfy_prompt": f"embedding:{self.cfg.output_name}"}
