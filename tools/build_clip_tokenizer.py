"""Build the CLIP BPE tokenizer files (vocab.json, merges.txt) shipped in trainer/assets.

The source is the BPE merge list that open_clip_torch (MIT licence) ships on PyPI as
`open_clip/bpe_simple_vocab_16e6.txt.gz`; this is the same merge list OpenAI's CLIP uses, and the
vocabulary is derived from it the way CLIP's reference tokenizer does.

    pip download --no-deps open_clip_torch && unzip -j open_clip_torch-*.whl '*bpe_simple_vocab_16e6.txt.gz'
    python tools/build_clip_tokenizer.py bpe_simple_vocab_16e6.txt.gz trainer/assets/clip_tokenizer
"""

import gzip
import json
import sys
from pathlib import Path

N_MERGES = 49152 - 256 - 2


def byte_alphabet() -> list[str]:
    # GPT-2/CLIP byte-to-unicode table, in CLIP's order: printable bytes first (as themselves),
    # then the remaining bytes mapped to code points from 256 up.
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def main(src: str, dst: str) -> None:
    lines = gzip.open(src).read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]
    alphabet = byte_alphabet()
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"{len(vocab)} tokens, {len(merges)} merges -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
