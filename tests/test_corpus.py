import numpy as np

from trainer.lab.corpus import COLORS, FAMILIES, HELD_OUT, corpus, describe, render


def test_corpus_is_deterministic_captioned_and_holds_out_kente():
    entries = corpus(3)
    assert HELD_OUT not in {f for f, _ in entries} and len(entries) == 3 * (len(FAMILIES) - 1)
    assert HELD_OUT in {f for f, _ in corpus(1, include_held_out=True)}
    for family in FAMILIES:
        a, sa = render(family, 2, 64)
        b, sb = render(family, 2, 64)
        assert sa == sb and np.array_equal(np.asarray(a), np.asarray(b))
        assert a.size == (64, 64) and sa.caption.endswith("fabric pattern")
        assert all(c in sa.caption for c in sa.colors) and sa.colors[0] != sa.colors[1]


def test_families_look_different_and_use_their_colours():
    # Each non-kente image is made of its two caption colours (plus grain): the dominant pixels match them.
    for family in FAMILIES:
        if family == HELD_OUT:
            continue
        img, sample = render(family, 0, 96)
        arr = np.asarray(img, dtype=np.float32).reshape(-1, 3)
        palette = np.array([COLORS[c] for c in sample.colors], np.float32)
        dist = np.linalg.norm(arr[:, None, :] - palette[None], axis=2).min(axis=1)
        assert np.median(dist) < 25, family
    captions = {describe(f, i).caption for f in FAMILIES for i in range(5)}
    assert len(captions) > 25
