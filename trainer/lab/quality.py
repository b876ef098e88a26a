"""`python -m trainer quality`: a CPU "mini DreamBench" on the held-out kente style (issue 9).

Trains a LoRA with prior preservation, a LoRA without it and a TI embedding on the 10 instance images,
for several training seeds, then generates a fixed set of prompts and seeds and scores them against
the base model with image features that need no downloaded weights:

- colour: a Lab histogram (8 L bins, then 8x8 a*b* bins over [-80, 80]), each part normalised;
- texture: the grey-level power spectrum (Hann window, mean removed) pooled into 6 orientation bins
  x 5 log-spaced radial frequency bins (2 to 64 cycles per image), normalised to sum 1;
- similarity of two images: histogram intersection, per feature, in [0, 1]; `combined` is their mean.

Subject fidelity = mean similarity of each token generation to the 10 instance images.
Prior drift = mean (1 - similarity) between a model's class-prompt generation and the base model's at
the same seed. Diversity = mean (1 - similarity) over pairs of token generations.
`feature_check` shows that these features rank unseen real kente images above the other families.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FEATURE_SIZE = 128
L_BINS, AB_BINS, AB_RANGE = 8, 8, 80.0
ORIENT_BINS, RADIAL_BINS = 6, 5
FEATURES = ("colour", "texture", "combined")
MIN_GAIN = 0.02  # smallest combined-fidelity gain over the base that counts as a visible change


# --------------------------------------------------------------------------- features
def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8 (H, W, 3) -> CIE Lab (D65), float32."""
    c = rgb.astype(np.float32) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array(
        [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]],
        np.float32,
    )
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883], np.float32)
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    L = 116 * f[..., 1] - 16
    a = 500 * (f[..., 0] - f[..., 1])
    b = 200 * (f[..., 1] - f[..., 2])
    return np.stack([L, a, b], -1)


def _as_array(image) -> np.ndarray:
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if image.size != (FEATURE_SIZE, FEATURE_SIZE):
        image = image.resize((FEATURE_SIZE, FEATURE_SIZE), Image.LANCZOS)
    return np.asarray(image)


def colour_histogram(rgb: np.ndarray) -> np.ndarray:
    lab = rgb_to_lab(rgb).reshape(-1, 3)
    h_l, _ = np.histogram(lab[:, 0], bins=L_BINS, range=(0, 100))
    h_ab, _, _ = np.histogram2d(lab[:, 1], lab[:, 2], bins=AB_BINS, range=[[-AB_RANGE, AB_RANGE]] * 2)
    h_l = h_l / max(1, h_l.sum())
    h_ab = h_ab.ravel() / max(1, h_ab.sum())
    return np.concatenate([h_l, h_ab]).astype(np.float32) / 2  # sums to 1


_SPECTRUM_BINS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _spectrum_bins(n: int):
    if n not in _SPECTRUM_BINS:
        fy, fx = np.meshgrid(np.fft.fftfreq(n) * n, np.fft.fftfreq(n) * n, indexing="ij")
        radius = np.hypot(fx, fy)
        angle = np.mod(np.arctan2(fy, fx), np.pi)
        edges = np.geomspace(2, n / 2, RADIAL_BINS + 1)
        r_bin = np.digitize(radius, edges) - 1
        o_bin = np.minimum((angle / np.pi * ORIENT_BINS).astype(int), ORIENT_BINS - 1)
        valid = (r_bin >= 0) & (r_bin < RADIAL_BINS)
        _SPECTRUM_BINS[n] = (np.where(valid, o_bin * RADIAL_BINS + r_bin, -1), valid)
    return _SPECTRUM_BINS[n]


def texture_histogram(rgb: np.ndarray) -> np.ndarray:
    grey = rgb_to_lab(rgb)[..., 0]
    grey = grey - grey.mean()
    n = grey.shape[0]
    window = np.outer(np.hanning(n), np.hanning(n))
    power = np.abs(np.fft.fft2(grey * window)) ** 2
    index, valid = _spectrum_bins(n)
    hist = np.bincount(index[valid], weights=power[valid], minlength=ORIENT_BINS * RADIAL_BINS)
    total = hist.sum()
    if total <= 0:  # a flat image: no texture at all
        return np.full(ORIENT_BINS * RADIAL_BINS, 1.0 / (ORIENT_BINS * RADIAL_BINS), np.float32)
    return (hist / total).astype(np.float32)


def features(image) -> dict:
    rgb = _as_array(image)
    return {"colour": colour_histogram(rgb), "texture": texture_histogram(rgb)}


def similarity(f1: dict, f2: dict) -> dict:
    # histograms sum to 1 only to float32 rounding: two equal ones may intersect in 1 + 1e-9, a drift of -1e-9
    colour = min(1.0, float(np.minimum(f1["colour"], f2["colour"]).sum()))
    texture = min(1.0, float(np.minimum(f1["texture"], f2["texture"]).sum()))
    return {"colour": colour, "texture": texture, "combined": (colour + texture) / 2}


def mean_similarity_to(feats: list[dict], refs: list[dict]) -> dict:
    """Per feature: the mean over `feats` of the mean similarity to the reference set."""
    sims = [[similarity(f, r) for r in refs] for f in feats]
    return {k: float(np.mean([[s[k] for s in row] for row in sims])) for k in FEATURES}


def pair_distance(a: list[dict], b: list[dict]) -> dict:
    """Mean (1 - similarity) over aligned pairs (same seed)."""
    d = [similarity(x, y) for x, y in zip(a, b)]
    return {k: float(np.mean([1 - s[k] for s in d])) for k in FEATURES}


def diversity(feats: list[dict]) -> dict:
    d = [similarity(feats[i], feats[j]) for i in range(len(feats)) for j in range(i + 1, len(feats))]
    return {k: float(np.mean([1 - s[k] for s in d])) if d else 0.0 for k in FEATURES}


def reference_features():
    from ..data.sample_set import COUNT, fabric_image

    return [features(fabric_image(i, FEATURE_SIZE)) for i in range(COUNT)]


def feature_check(per_family: int = 20) -> dict:
    """Score unseen real images of every family against the instance set; kente must come first.

    Returns, per feature: each family's mean fidelity, and the AUC of kente vs all other families
    (the chance that a random unseen kente image outscores a random image of another family).
    """
    from ..data.sample_set import COUNT, fabric_image
    from .corpus import FAMILIES, HELD_OUT, render

    refs = reference_features()
    scores: dict[str, list[dict]] = {}
    for family in FAMILIES:
        if family == HELD_OUT:  # unseen kente: indices after the instance set
            imgs = [fabric_image(COUNT + i, FEATURE_SIZE) for i in range(per_family)]
        else:
            imgs = [render(family, 10_000 + i, FEATURE_SIZE)[0] for i in range(per_family)]
        scores[family] = [mean_similarity_to([features(im)], refs) for im in imgs]
    report: dict = {"per_family": {}, "auc": {}, "held_out_ranks_first": {}}
    for k in FEATURES:
        means = {f: float(np.mean([s[k] for s in v])) for f, v in scores.items()}
        report["per_family"][k] = means
        pos = np.array([s[k] for s in scores[HELD_OUT]])
        neg = np.array([s[k] for f, v in scores.items() if f != HELD_OUT for s in v])
        report["auc"][k] = float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())
        report["held_out_ranks_first"][k] = max(means, key=means.get) == HELD_OUT
    return report


# --------------------------------------------------------------------------- the benchmark
@dataclass
class QualitySpec:
    base_model: str = "tiny-fabric"
    training_seeds: tuple[int, ...] = (0, 1, 2)
    sample_seeds: tuple[int, ...] = (11, 22, 33, 44)
    class_seeds: tuple[int, ...] = tuple(range(100, 116))  # drift is per seed, so it gets more seeds
    lora_steps: int = 800
    lora_lr: float = 1e-4
    ti_steps: int = 800
    ti_lr: float = 5e-3
    rank: int = 4
    # Text-encoder LoRA for both LoRA runs: tiny-fabric's text encoder never saw "sks" or "african", so the
    # instance prompt encodes within cosine 0.97 of the class prompt and a UNet-only LoRA cannot tell them
    # apart; prior preservation then barely lowers drift (README, "The quality benchmark").
    train_text_encoder: bool = True
    text_encoder_lr: float = 3e-4
    prior_loss_weight: float = 1.0
    lora_targets: tuple[str, ...] | None = None  # None: the trainer's default (to_q, to_k, to_v, to_out.0)
    num_class_images: int = 100
    gen_steps: int = 20
    guidance: float = 7.5
    subject: str = "sks african fabric pattern"
    ti_token: str = "<sks-fabric>"
    class_prompt: str = "a fabric pattern"
    contexts: tuple[str, ...] = ("a {s}", "a close-up photo of {s}", "a wallpaper with {s}", "a dress made of {s}")
    methods: tuple[str, ...] = ("lora_prior", "lora_no_prior", "ti")
    extra: dict = field(default_factory=dict)

    def token_prompts(self, method: str) -> list[str]:
        s = self.ti_token if method == "ti" else self.subject
        return [c.format(s=s) for c in self.contexts]


METHOD_LABELS = {"base": "base model", "lora_prior": "LoRA + prior", "lora_no_prior": "LoRA, no prior", "ti": "TI"}


def _train_one(
    spec: QualitySpec, method: str, seed: int, instance_dir: Path, class_dir: Path, out: Path, comps_factory
):
    from ..config import TrainConfig
    from ..events import Events
    from ..training.loop import train

    comps = comps_factory()  # training adds adapters to these modules; generation loads its own copy
    common = dict(
        base_model=spec.base_model,
        instance_dir=str(instance_dir),
        resolution=comps.native_resolution,
        seed=seed,
        sample_every=0,
        checkpoint_every=0,
        sample_steps=spec.gen_steps,
        output_name=f"{method}_s{seed}",
    )
    if method == "ti":
        cfg = TrainConfig(
            method="ti",
            placeholder_token=spec.ti_token,
            initializer_token="pattern",
            learning_rate=spec.ti_lr,
            max_train_steps=spec.ti_steps,
            with_prior_preservation=False,
            **common,
        )
    else:
        cfg = TrainConfig(
            method="lora",
            rank=spec.rank,
            alpha=float(spec.rank),
            learning_rate=spec.lora_lr,
            max_train_steps=spec.lora_steps,
            with_prior_preservation=method == "lora_prior",
            num_class_images=spec.num_class_images,
            train_text_encoder=spec.train_text_encoder,
            text_encoder_lr=spec.text_encoder_lr,
            prior_loss_weight=spec.prior_loss_weight,
            **({"lora_targets": list(spec.lora_targets)} if spec.lora_targets else {}),
            class_prompt=spec.class_prompt,
            **common,
        )
    cfg.validate()
    run_dir = out / "runs" / f"{method}_s{seed}"
    result = train(cfg, run_dir, events=Events(run_dir), comps=comps, class_dir=class_dir)
    return result.outputs["embedding" if method == "ti" else "lora"]


def _generate(comps, method: str, weights: str | None, spec: QualitySpec, prompts: list[str]):
    """Images for every (token prompt, sample seed), prompt-major, then the class prompt at every class seed."""
    from ..inference.pipelines import generate, make_pipeline

    pipe = make_pipeline(comps, sampler="dpmpp_2m")
    if method == "ti":
        from ..formats.embeddings import load_embedding_into_pipeline

        load_embedding_into_pipeline(pipe, weights, spec.ti_token)
    elif weights:
        pipe.load_lora_weights(str(Path(weights).parent), weight_name=Path(weights).name)
    all_prompts = [p for p in prompts for _ in spec.sample_seeds] + [spec.class_prompt] * len(spec.class_seeds)
    seeds = [s for _ in prompts for s in spec.sample_seeds] + list(spec.class_seeds)
    return generate(pipe, all_prompts, seeds, spec.gen_steps, spec.guidance, comps.native_resolution, batch_size=8)


def _score(images_token, images_class, base_class_feats, refs) -> dict:
    tok = [features(im) for im in images_token]
    cls = [features(im) for im in images_class]
    return {
        "fidelity": mean_similarity_to(tok, refs),
        "drift": pair_distance(cls, base_class_feats) if base_class_feats is not None else {k: 0.0 for k in FEATURES},
        "diversity": diversity(tok),
    }, cls


def run_quality(out: Path, spec: QualitySpec | None = None, log=print) -> dict:
    """Train, generate and score; writes quality.json, quality.md and quality_grid.png under `out`."""
    from ..base_models.load import load_base_model
    from ..data.sample_set import write_fabric_samples
    from ..files.atomic import atomic_save, atomic_write_text
    from ..pictures.grid import labelled_grid

    spec = spec or QualitySpec()
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    instance_dir = out / "instance_images"
    write_fabric_samples(instance_dir, size=512)
    class_dir = out / "class_images"
    refs = reference_features()

    def comps_factory():
        return load_base_model(spec.base_model)

    log("[quality] checking the features on unseen real images")
    check = feature_check()
    base = comps_factory()
    token_prompts_base = spec.token_prompts("lora")
    n_tok = len(token_prompts_base) * len(spec.sample_seeds)
    imgs = _generate(base, "base", None, spec, token_prompts_base)
    base_scores, base_class_feats = _score(imgs[:n_tok], imgs[n_tok:], None, refs)
    grid_rows = {"base": imgs[: n_tok : len(spec.sample_seeds)] + [imgs[n_tok]]}
    results: dict = {"base": [base_scores]}
    for method in spec.methods:
        results[method] = []
        for seed in spec.training_seeds:
            log(f"[quality] training {METHOD_LABELS[method]} (seed {seed})")
            weights = _train_one(spec, method, seed, instance_dir, class_dir, out, comps_factory)
            imgs = _generate(comps_factory(), method, weights, spec, spec.token_prompts(method))
            scores, _ = _score(imgs[:n_tok], imgs[n_tok:], base_class_feats, refs)
            results[method].append(scores)
            log(
                f"[quality]   fidelity {scores['fidelity']['combined']:.3f}  drift {scores['drift']['combined']:.3f}"
                f"  diversity {scores['diversity']['combined']:.3f}"
            )
            if seed == spec.training_seeds[0]:
                grid_rows[method] = imgs[: n_tok : len(spec.sample_seeds)] + [imgs[n_tok]]
    summary = summarise(results, spec)
    report = {
        "spec": asdict(spec),
        "feature_check": check,
        "runs": results,
        "summary": summary,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    atomic_write_text(out / "quality.json", json.dumps(report, indent=2))
    md = markdown_table(report)
    atomic_write_text(out / "quality.md", md)
    labels = []
    for row in grid_rows:
        labels += [f"{METHOD_LABELS[row]}: {c.format(s='token')}" for c in spec.contexts] + [
            f"{METHOD_LABELS[row]}: class prompt"
        ]
    images = [im for row in grid_rows.values() for im in row]
    grid = labelled_grid(
        images,
        labels,
        cols=len(spec.contexts) + 1,
        tile=128,
        title=f"{spec.base_model}: base / LoRA+prior / LoRA no prior / TI; seed {spec.sample_seeds[0]}",
    )
    atomic_save(out / "quality_grid.png", lambda tmp: grid.save(tmp, format="PNG"))
    log(md)
    log(
        f"[quality] wrote {out / 'quality.md'}, {out / 'quality.json'} and {out / 'quality_grid.png'} in "
        f"{report['wall_s']:.0f} s"
    )
    return report


def summarise(results: dict, spec: QualitySpec) -> dict:
    """Mean and std over training seeds; margins over the base in units of that seed-to-seed std; targets."""
    summary: dict = {}
    for method, runs in results.items():
        entry = {}
        for metric in ("fidelity", "drift", "diversity"):
            for k in FEATURES:
                vals = [r[metric][k] for r in runs]
                entry[f"{metric}_{k}"] = {
                    "mean": float(np.mean(vals)),
                    "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                }
        summary[method] = entry
    base_fid = summary["base"]["fidelity_combined"]["mean"]
    targets = {}
    for method in spec.methods:
        fid = summary[method]["fidelity_combined"]
        gain = fid["mean"] - base_fid
        summary[method]["fidelity_gain"] = gain
        summary[method]["fidelity_gain_in_seed_std"] = gain / fid["std"] if fid["std"] > 0 else None
        # "Clearly above": every training seed beats the base, and the mean gain exceeds both 3 seed-to-seed
        # std and MIN_GAIN (so one lucky seed, or a gain too small to see, does not count).
        worst = min(r["fidelity"]["combined"] for r in results[method])
        targets[f"{method}_fidelity_above_base"] = bool(worst > base_fid and gain > max(3 * fid["std"], MIN_GAIN))
    if {"lora_prior", "lora_no_prior"} <= set(spec.methods):
        d_prior = summary["lora_prior"]["drift_combined"]["mean"]
        d_none = summary["lora_no_prior"]["drift_combined"]["mean"]
        f_prior = summary["lora_prior"]["fidelity_combined"]["mean"]
        f_none = summary["lora_no_prior"]["fidelity_combined"]["mean"]
        reduction = 1 - d_prior / d_none if d_none > 0 else 0.0
        fid_gap = (f_none - f_prior) / f_none if f_none > 0 else 0.0
        summary["prior_preservation"] = {"drift_reduction": reduction, "fidelity_gap": fid_gap}
        targets["prior_drift_30pct_lower"] = bool(reduction >= 0.30)
        targets["prior_fidelity_within_10pct"] = bool(fid_gap <= 0.10)
    summary["targets"] = targets
    return summary


def markdown_table(report: dict) -> str:
    s, spec = report["summary"], report["spec"]
    lines = [
        f"## Quality on the held-out kente style ({spec['base_model']}, {len(spec['training_seeds'])} training seeds, "
        f"{len(spec['sample_seeds'])} sample seeds x {len(spec['contexts'])} token prompts, class prompt at "
        f"{len(spec['class_seeds'])} seeds; LoRA "
        f"{'UNet + text encoder' if spec['train_text_encoder'] else 'UNet only'})",
        "",
        "| model | fidelity (combined) | fidelity colour | fidelity texture | gain over base | prior drift | "
        "diversity |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in ["base"] + list(spec["methods"]):
        e = s[method]

        def ms(key, e=e, method=method):
            return f"{e[key]['mean']:.3f} ± {e[key]['std']:.3f}" if method != "base" else f"{e[key]['mean']:.3f}"

        gain = (
            ""
            if method == "base"
            else f"{e['fidelity_gain']:+.3f}"
            + (f" ({e['fidelity_gain_in_seed_std']:.1f} std)" if e.get("fidelity_gain_in_seed_std") is not None else "")
        )
        drift = "0 (reference)" if method == "base" else ms("drift_combined")
        lines.append(
            f"| {METHOD_LABELS[method]} | {ms('fidelity_combined')} | {ms('fidelity_colour')} | "
            f"{ms('fidelity_texture')} "
            f"| {gain} | {drift} | {ms('diversity_combined')} |"
        )
    lines.append("")
    if "prior_preservation" in s:
        pp = s["prior_preservation"]
        gap = pp["fidelity_gap"] * 100
        lines.append(
            f"Prior preservation: drift {pp['drift_reduction'] * 100:.0f}% lower than without it, at a fidelity "
            f"{abs(gap):.1f}% {'below' if gap >= 0 else 'above'} the no-prior run's."
        )
        lines.append("")
    lines.append("| target | met |")
    lines.append("|---|---|")
    for name, ok in s["targets"].items():
        lines.append(f"| {name} | {'yes' if ok else 'NO'} |")
    fc = report["feature_check"]
    lines += [
        "",
        "Feature check (unseen real images vs the 10 instance images; mean combined similarity):",
        "",
        "| family | " + " | ".join(fc["per_family"]["combined"]) + " |",
        "|---|" + "---|" * len(fc["per_family"]["combined"]),
        "| fidelity | " + " | ".join(f"{v:.3f}" for v in fc["per_family"]["combined"].values()) + " |",
        "",
        "AUC of held-out kente vs the other families: " + ", ".join(f"{k} {v:.3f}" for k, v in fc["auc"].items()),
        "",
    ]
    return "\n".join(lines)
