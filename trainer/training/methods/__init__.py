"""Training methods, by the name TrainConfig.method uses. A new method is one module here plus one entry."""

from __future__ import annotations

from ...config import TrainConfig
from ...errors import DreamLoomError
from .base import Method
from .full import FullFineTuneMethod
from .lora import LoRAMethod
from .ti import TextualInversionMethod

METHODS: dict[str, type[Method]] = {"lora": LoRAMethod, "ti": TextualInversionMethod, "full": FullFineTuneMethod}


def make_method(cfg: TrainConfig) -> Method:
    if cfg.method not in METHODS:
        raise DreamLoomError(f"Unknown method {cfg.method!r}.", f"Use one of: {', '.join(METHODS)}.")
    return METHODS[cfg.method](cfg)
