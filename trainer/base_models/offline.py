"""The libraries' run-time environment: no network (every Hugging Face library is told to stay offline), and none
of their warnings that concern nothing DreamLoom does. No torch, so the CLI can call it before anything heavy is
imported."""

from __future__ import annotations

import logging
import os
import warnings

# Messages a library prints on every run that ask nothing of the user: (logger, words in the message).
KNOWN_NOISE = (
    # transformers 5 without torchvision: image processors of models DreamLoom never uses fall back to Pillow
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back"),
    # diffusers, casting a VAE to the training dtype: only with an empty list (no module to keep in fp32)
    ("diffusers.models.modeling_utils", "that should be kept in float32: []."),
    # transformers, when diffusers' load_textual_inversion makes room for an embedding's tokens: the new rows it
    # describes are overwritten with the embedding's vectors at once
    ("transformers.modeling_utils", "The new embeddings will be initialized from a multivariate normal distribution"),
)


def set_offline() -> None:
    """Make every Hugging Face library refuse network access in this process."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DIFFUSERS_OFFLINE"):
        os.environ[var] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


class _DropMessages(logging.Filter):
    def __init__(self, words: str):
        super().__init__()
        self.words = words

    def filter(self, record: logging.LogRecord) -> bool:
        return self.words not in record.getMessage()


def hide_known_noise() -> None:
    """Drop KNOWN_NOISE, and peft's warning that a model already has an adapter (`generate --lora A --lora B` loads
    several on purpose). Every other warning stays (a LoRA key a loader drops must be seen)."""
    for name, words in KNOWN_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.words == words for f in logger.filters):
            logger.addFilter(_DropMessages(words))
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
