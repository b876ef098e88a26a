"""What a caption becomes in a training prompt: the token put where the user said, tags shuffled, dropout.

kohya's options, as a pure function of (seed, image, stream position), so a resumed or multi-process run shows
each image exactly the prompt an uninterrupted run would:
* `{token}` in a caption is replaced by the subject's token phrase; a caption without it gets the phrase in front;
* shuffle: the comma-separated tags after the first `keep_tokens` are shuffled (the kept ones stay in front);
* dropout: with probability `dropout` the prompt is empty, which trains the unconditional case CFG uses.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

TOKEN_SLOT = "{token}"


@dataclass(frozen=True)
class CaptionPolicy:
    shuffle: bool = False
    keep_tokens: int = 1
    dropout: float = 0.0
    seed: int = 0

    @property
    def varies(self) -> bool:
        """True when one image's prompt changes between stream positions (so prompts cannot be encoded once)."""
        return self.shuffle or self.dropout > 0

    def _rng(self, index: int, position: int) -> random.Random:
        key = f"{self.seed}:{index}:{position}".encode()
        return random.Random(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))

    def vary(self, text: str, index: int, position: int) -> str:
        """The prompt image `index` is shown with at stream position `position`."""
        if not self.varies:
            return text
        rng = self._rng(index, position)
        if self.dropout > 0 and rng.random() < self.dropout:
            return ""
        if self.shuffle:
            tags = [t.strip() for t in text.split(",") if t.strip()]
            kept, rest = tags[: self.keep_tokens], tags[self.keep_tokens :]
            rng.shuffle(rest)
            text = ", ".join(kept + rest)
        return text


def with_token(caption: str, phrase: str) -> str:
    """The caption with `{token}` replaced by `phrase`; a caption that has neither gets `phrase, ` in front."""
    if TOKEN_SLOT in caption:
        return caption.replace(TOKEN_SLOT, phrase)
    if phrase and _has_phrase(caption, phrase):
        return caption
    return f"{phrase}, {caption}" if phrase else caption


def _has_phrase(text: str, phrase: str) -> bool:
    words = text.replace(",", " ").split()
    want = phrase.split()
    return any(words[i : i + len(want)] == want for i in range(len(words) - len(want) + 1))
