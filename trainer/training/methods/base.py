"""The method extension point: what is trained, how prompts look, and what is exported.

The loop (training/loop.py) is shared. A method is one module in this package with one Method subclass,
registered in methods/__init__.py. It adds its trainable parameters to the plain modules of a Components
(setup), says which modules hold them (trainable_modules: accelerate wraps those for DDP), gives the
optimizer's parameter groups, saves and restores them for checkpoints, builds the prompt of each
training row and the sample prompts, and writes its result files.
"""

from __future__ import annotations

from pathlib import Path

from ...config import TrainConfig
from ...data.captions import CaptionPolicy, with_token


def subject_phrase(instance_prompt: str) -> str:
    """'a sks african fabric pattern' -> 'sks african fabric pattern'."""
    text = instance_prompt.strip()
    for article in ("a ", "an ", "the "):
        if text.lower().startswith(article):
            return text[len(article) :]
    return text


class Method:
    name = "base"
    trains_text_encoder = False  # True: text embeddings are recomputed every step, never cached
    uses_prior_preservation = (
        True  # False for TI: prompts without its token are unchanged, so a prior loss teaches nothing
    )

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.n_images = 1
        self.concepts = cfg.concept_list()
        self.concept_of: list[int] = []  # each training image's concept (set by the loop); empty: all the first
        # built once: instance_prompt runs for every row of every step
        self.captions = CaptionPolicy(cfg.caption_shuffle, cfg.caption_keep_tokens, cfg.caption_dropout, cfg.seed)

    # -- parameters ------------------------------------------------------------------------------------
    def setup(self, comps) -> None:
        """Add the trainable parameters to comps' modules (fp32; the loop casts the frozen rest)."""
        raise NotImplementedError

    def trainable_modules(self, comps) -> dict:
        """Components attribute -> module holding trainable parameters (wrapped by accelerate for DDP)."""
        raise NotImplementedError

    def param_groups(self, comps) -> list[dict]:
        raise NotImplementedError

    def trainable_state(self, comps) -> dict:
        raise NotImplementedError

    def load_trainable_state(self, comps, state: dict) -> None:
        raise NotImplementedError

    def after_optimizer_step(self, comps) -> None:
        pass

    def disk_estimate(self, comps) -> dict[str, int] | None:
        """Bytes a run writes, when they matter ({"checkpoint", "checkpoints", "result"}); None: too small to check
        (a LoRA's or an embedding's checkpoints are megabytes)."""
        return None

    # -- prompts ---------------------------------------------------------------------------------------
    def subject_prompt(self, caption: str | None, concept: int) -> str:
        """A picture's caption with its concept's token put in (data/captions.py), or the concept's instance prompt."""
        subject = self.concepts[concept]
        return with_token(caption, subject.token) if (self.cfg.use_captions and caption) else subject.instance_prompt

    def instance_prompt(self, index: int, caption: str | None, position: int) -> str:
        """The prompt of training image `index` shown at stream position `position`: its subject prompt, then the
        caption options (shuffle, dropout)."""
        concept = self.concept_of[index] if self.concept_of else 0
        return self.captions.vary(self.subject_prompt(caption, concept), index, position)

    def validation_prompt(self, caption: str | None, concept: int = 0) -> str:
        """The prompt a held-out image is measured with: as in training, but never shuffled or dropped, so every
        measurement sees the same conditioning."""
        return self.subject_prompt(caption, concept)

    def prompts_to_cache(self, captions: list[str | None]) -> list[str] | None:
        """Every instance prompt the run can show, when they can be encoded once; None when they cannot."""
        if self.trains_text_encoder or self.captions.varies:
            return None
        return sorted({self.instance_prompt(i, c, 0) for i, c in enumerate(captions)})

    def default_sample_prompts(self) -> list[str]:
        raise NotImplementedError

    def with_token(self, prompt: str) -> str:
        """A user's sample prompt as the text encoder must see it."""
        return prompt

    def sample_prompts(self) -> list[str]:
        """The user's sample prompts (or the method's defaults), plus the class prompt, which shows drift."""
        cfg = self.cfg
        prompts = (
            [self.with_token(p) for p in cfg.sample_prompts] if cfg.sample_prompts else self.default_sample_prompts()
        )
        for concept in self.concepts:
            if concept.class_prompt and concept.class_prompt not in prompts:
                prompts.append(concept.class_prompt)
        return prompts

    # -- result ----------------------------------------------------------------------------------------
    def export(self, comps, result_dir: Path, step: int) -> dict:
        raise NotImplementedError
