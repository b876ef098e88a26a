"""The quality benchmark's features and verdicts (issue 9)."""

import numpy as np
import pytest

import trainer.lab.quality as q


def test_lab_conversion_matches_reference_values():
    px = np.array([[[255, 255, 255], [255, 0, 0], [0, 0, 0], [0, 128, 0]]], np.uint8)
    lab = q.rgb_to_lab(px)[0]
    np.testing.assert_allclose(lab[0], [100.0, 0.0, 0.0], atol=0.05)
    np.testing.assert_allclose(lab[1], [53.24, 80.09, 67.20], atol=0.05)
    np.testing.assert_allclose(lab[2], [0.0, 0.0, 0.0], atol=0.05)
    np.testing.assert_allclose(lab[3], [46.23, -51.70, 49.90], atol=0.05)


def _stripes(period, vertical, colours=((200, 30, 40), (240, 236, 225))):
    y, x = np.mgrid[0:128, 0:128]
    mask = ((x if vertical else y) // (period // 2)) % 2 == 0
    return np.where(mask[..., None], np.array(colours[0], np.uint8), np.array(colours[1], np.uint8)).astype(np.uint8)


def test_similarity_separates_colour_orientation_and_scale():
    a = q.features(_stripes(16, True))
    assert q.similarity(a, a)["combined"] == pytest.approx(1.0, abs=1e-6)
    rotated = q.similarity(a, q.features(_stripes(16, False)))
    recoloured = q.similarity(a, q.features(_stripes(16, True, ((30, 70, 150), (230, 175, 30)))))
    rescaled = q.similarity(a, q.features(_stripes(48, True)))
    assert rotated["colour"] > 0.99 and rotated["texture"] < 0.2  # same colours, other orientation
    assert recoloured["texture"] > 0.95 and recoloured["colour"] < 0.2  # same weave, other colours
    assert rescaled["texture"] < 0.6 and rescaled["colour"] > 0.9  # same colours and direction, other frequency


def test_features_rank_unseen_held_out_images_first():
    report = q.feature_check(per_family=8)
    for k in q.FEATURES:
        means = report["per_family"][k]
        assert max(means, key=means.get) == "kente", (k, means)
    assert report["auc"]["combined"] > 0.98
    assert report["auc"]["colour"] > 0.95 and report["auc"]["texture"] > 0.9


def test_diversity_is_zero_for_identical_images_and_grows_with_variety():
    same = [q.features(_stripes(16, True))] * 3
    varied = [q.features(_stripes(p, v)) for p, v in ((16, True), (32, False), (8, True))]
    assert q.diversity(same)["combined"] == pytest.approx(0.0, abs=1e-6)
    assert q.diversity(varied)["combined"] > 0.2


def _run(fid, drift):
    return {
        "fidelity": {k: fid for k in q.FEATURES},
        "drift": {k: drift for k in q.FEATURES},
        "diversity": {k: 0.3 for k in q.FEATURES},
    }


def test_similarity_stays_in_0_1_when_float32_histograms_sum_above_1():
    """Eleven bins of 1/11 in float32 sum to 1.0000001: equal images once drifted by -1e-7 (out of [0, 1])."""
    flat = {name: np.full(11, 1 / 11, np.float32) for name in ("colour", "texture")}
    assert float(flat["colour"].sum()) > 1.0
    assert q.similarity(flat, flat) == {"colour": 1.0, "texture": 1.0, "combined": 1.0}
    assert q.pair_distance([flat], [flat]) == {"colour": 0.0, "texture": 0.0, "combined": 0.0}
    assert q.diversity([flat, flat])["combined"] == 0.0


def test_summary_targets_follow_the_issue_definitions():
    spec = q.QualitySpec(training_seeds=(0, 1, 2))
    good = {
        "base": [_run(0.40, 0.0)],
        "lora_prior": [_run(f, d) for f, d in ((0.70, 0.10), (0.72, 0.12), (0.71, 0.11))],
        "lora_no_prior": [_run(f, d) for f, d in ((0.74, 0.30), (0.75, 0.31), (0.73, 0.29))],
        "ti": [_run(f, 0.0) for f in (0.55, 0.57, 0.56)],
    }
    s = q.summarise(good, spec)
    assert all(s["targets"].values()), s["targets"]
    assert s["prior_preservation"]["drift_reduction"] == pytest.approx(1 - 0.11 / 0.30)
    assert s["lora_prior"]["fidelity_gain"] == pytest.approx(0.31)
    # TI within seed noise of the base, and a prior run that loses 20% fidelity, miss their targets.
    bad = dict(
        good,
        ti=[_run(f, 0.0) for f in (0.38, 0.45, 0.41)],
        lora_prior=[_run(f, d) for f, d in ((0.58, 0.10), (0.60, 0.12), (0.59, 0.11))],
    )
    t = q.summarise(bad, spec)["targets"]
    assert not t["ti_fidelity_above_base"] and not t["prior_fidelity_within_10pct"] and t["prior_drift_30pct_lower"]
    md = q.markdown_table(
        {"summary": q.summarise(good, spec), "spec": q.asdict(spec), "feature_check": q.feature_check(per_family=2)}
    )
    assert "| LoRA + prior | 0.710 ± 0.010 |" in md and "drift 63% lower" in md


@pytest.mark.slow
def test_quick_quality_run_writes_table_json_and_grid(tmp_path):
    import json

    from PIL import Image

    spec = q.QualitySpec(
        training_seeds=(0,),
        sample_seeds=(5,),
        lora_steps=3,
        ti_steps=3,
        num_class_images=2,
        gen_steps=2,
        contexts=("a {s}", "a dress made of {s}"),
    )
    report = q.run_quality(tmp_path, spec, log=lambda *_: None)
    md = (tmp_path / "quality.md").read_text()
    for label in q.METHOD_LABELS.values():
        assert f"| {label} |" in md
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["summary"] == report["summary"] and set(saved["runs"]) == {"base", "lora_prior", "lora_no_prior", "ti"}
    for method, runs in saved["runs"].items():
        for run in runs:
            for metric in ("fidelity", "drift", "diversity"):
                assert all(0.0 <= v <= 1.0 for v in run[metric].values()), (method, metric, run)
    assert saved["runs"]["base"][0]["drift"]["combined"] == 0.0
    assert len(list((tmp_path / "class_images").glob("class_*.png"))) == 2  # prior run made its class images
    with Image.open(tmp_path / "quality_grid.png") as grid:
        assert grid.width >= 3 * 128 and grid.height >= 4 * 128  # 4 models x (2 token prompts + class prompt)
