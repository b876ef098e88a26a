"""Several concepts in one run: settings, loading, repeats, each concept's class rows, both concepts learn."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from trainer.config import TrainConfig
from trainer.data.concepts import epoch_entries, load_concept_images
from trainer.data.sample_set import write_fabric_samples
from trainer.errors import DreamLoomError
from trainer.training.loop import Trainer
from trainer.training.loss import diffusion_loss
from trainer.training.validation import ValidationLoss, hold_out, samples_from

ROOT = Path(__file__).resolve().parents[1]


def _stripes(folder: Path, count: int, colour) -> Path:
    """`count` 64 px images of horizontal stripes in one colour: a second subject unlike the fabric."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        arr = np.full((64, 64, 3), 20, np.uint8)
        arr[(np.arange(64) // (4 + i)) % 2 == 0] = colour
        Image.fromarray(arr).save(folder / f"stripes_{i}.png")
    return folder


@pytest.fixture(scope="module")
def two_subjects(tmp_path_factory):
    root = tmp_path_factory.mktemp("subjects")
    fabric = root / "fabric"
    write_fabric_samples(fabric, size=64, count=5)
    stripes = _stripes(root / "stripes", 4, (200, 40, 40))
    red, blue = _stripes(root / "red_class", 3, (255, 0, 0)), _stripes(root / "blue_class", 2, (0, 0, 255))
    return {"fabric": fabric, "stripes": stripes, "fabric_class": red, "stripes_class": blue}


def _concepts(subjects, **extra):
    return [
        {"name": "fabric", "instance_dir": str(subjects["fabric"]), "instance_prompt": "a sks fabric pattern",
         "token": "sks", "class_prompt": "a fabric pattern", "class_dir": str(subjects["fabric_class"]), **extra},
        {"name": "stripes", "instance_dir": str(subjects["stripes"]), "instance_prompt": "a zwx striped cloth",
         "token": "zwx", "class_prompt": "a striped cloth", "class_dir": str(subjects["stripes_class"]), "repeats": 2},
    ]  # fmt: skip


def _config(subjects, **overrides):
    base = dict(concepts=_concepts(subjects), learning_rate=2e-3, max_train_steps=4)
    return tiny_config("", **{**base, **overrides})


def test_concepts_resolve_from_toml_with_the_run_defaults(two_subjects, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        f"""
num_class_images = 7
prior_loss_weight = 0.5
[[concepts]]
instance_dir = '{two_subjects["fabric"]}'
instance_prompt = "a sks fabric pattern"
class_prompt = "a fabric pattern"
[[concepts]]
name = "stripes"
instance_dir = '{two_subjects["stripes"]}'
instance_prompt = "a zwx striped cloth"
token = "zwx"
class_prompt = "a striped cloth"
repeats = 3
prior_loss_weight = 2.0
"""
    )
    first, second = TrainConfig.from_toml(toml).validate().concept_list()
    assert (first.name, first.token, first.num_class_images, first.prior_loss_weight, first.repeats) == (
        "fabric", "sks", 7, 0.5, 1,
    )  # fmt: skip
    assert (second.name, second.token, second.repeats, second.prior_loss_weight) == ("stripes", "zwx", 3, 2.0)
    assert TrainConfig(instance_dir="x").concept_list()[0].instance_dir == "x"  # no concepts: the top-level one


@pytest.mark.parametrize(
    "change, message",
    [
        ({"instance_dir": "also"}, "Both instance_dir"),
        ({"concepts": [{"instance_dir": "a", "instance_prompt": "a sks x", "repeat": 2}]}, "did you mean 'repeats'"),
        ({"concepts": [{"instance_prompt": "a sks x"}]}, "concepts\\[0\\] has no instance_dir"),
        ({"concepts": [{"instance_dir": "a", "instance_prompt": "a dog", "token": "zwx"}]},
         "concepts\\[0\\].instance_prompt = 'a dog'"),
        ({"concepts": [{"instance_dir": "a", "instance_prompt": "a sks x", "repeats": 0}]}, "concepts\\[0\\].repeats"),
        ({"concepts": [{"instance_dir": "a", "instance_prompt": "a sks x", "class_prompt": "a sks thing"}]},
         "concepts\\[0\\].class_prompt = 'a sks thing': it contains the token"),
        ({"concepts": [{"instance_dir": "a/x", "instance_prompt": "a sks x"},
                       {"instance_dir": "b/x", "instance_prompt": "a sks y"}]}, "same name \\(x\\)"),
        ({"method": "ti", "concepts": [{"instance_dir": "a"}, {"instance_dir": "b"}]}, "learns one token"),
        ({"concepts": "dogs"}, "concepts"),
    ],
)  # fmt: skip
def test_bad_concepts_are_refused_naming_the_concept(change, message):
    data = {"instance_dir": "", "concepts": [{"instance_dir": "a", "instance_prompt": "a sks x"}], **change}
    with pytest.raises(DreamLoomError, match=message):
        TrainConfig.from_dict(data).validate()


def test_concept_images_are_tagged_and_repeated(two_subjects):
    cfg = _config(two_subjects).validate()
    images = load_concept_images(cfg)
    assert images.concept_of == [0] * 5 + [1] * 4
    entries = epoch_entries(images, cfg.concept_list())
    assert sorted(entries) == list(range(5)) + [i for i in range(5, 9) for _ in range(2)]
    train, held = hold_out(images, 1, seed=3, names=["fabric", "stripes"])
    assert sorted(held.concept_of) == [0, 1] and train.concept_of.count(1) == 3  # one held out of each concept
    with pytest.raises(DreamLoomError, match="concept 'stripes'"):
        hold_out(images, 4, seed=3, names=["fabric", "stripes"])
    bad = _config(two_subjects, concepts=[{"instance_dir": "/nowhere", "instance_prompt": "a sks x"}]).validate()
    with pytest.raises(DreamLoomError, match="Concept 'nowhere': Image folder not found"):
        load_concept_images(bad)


def test_per_row_prior_weights_weigh_each_class_row(tiny):
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn((4, 4, 8, 8), generator=g), torch.randn((4, 4, 8, 8), generator=g)
    t = torch.tensor([10, 300, 500, 900])
    enc = torch.randn((4, 77, tiny.unet.config.cross_attention_dim), generator=g)
    sched = tiny.noise_scheduler()
    with torch.no_grad():
        loss, inst, prior = diffusion_loss(tiny.unet, sched, latents, noise, t, enc, 2, torch.tensor([0.5, 3.0]))
        _, _, prior_a = diffusion_loss(tiny.unet, sched, latents[[0, 1, 2]], noise[[0, 1, 2]], t[[0, 1, 2]],
                                       enc[[0, 1, 2]], 2)  # fmt: skip
        _, _, prior_b = diffusion_loss(tiny.unet, sched, latents[[0, 1, 3]], noise[[0, 1, 3]], t[[0, 1, 3]],
                                       enc[[0, 1, 3]], 2)  # fmt: skip
    assert torch.allclose(loss, inst + (0.5 * prior_a + 3.0 * prior_b) / 2, atol=1e-6)
    assert torch.allclose(prior, (prior_a + prior_b) / 2, atol=1e-6)


class RecordingTrainer(Trainer):
    """Records, per micro-batch, the instance picks' concepts, the class picks and every row's prompt."""

    def build_caches(self):
        super().build_caches()
        self.seen = []
        latents, embed = self.class_latents.latents, self.prompt_embeddings.__call__
        last = {}

        def class_latents(picks, *args):
            last["class"] = list(picks)
            return latents(picks, *args)

        def prompt_embeddings(prompts, text_encoders=None):
            self.seen.append((last.pop("class"), list(prompts)))
            return embed(prompts, text_encoders)

        self.class_latents.latents = class_latents
        self.prompt_embeddings = prompt_embeddings
        self.prompt_embeddings.cached = True


def test_each_concepts_prior_rows_use_its_own_class_images(two_subjects, tmp_path):
    cfg = _config(two_subjects, train_batch_size=3, max_train_steps=6)
    trainer = RecordingTrainer(cfg, tmp_path / "run", cache_root=tmp_path / "cache")
    trainer.run()
    sets = trainer.class_sets
    assert sets.counts == [3, 2] and sets.prompts == ["a fabric pattern", "a striped cloth"]
    seen_concepts = set()
    for class_picks, prompts in trainer.seen:
        n = len(class_picks)
        for row, (class_index, _) in enumerate(class_picks):
            instance_prompt, class_prompt = prompts[row], prompts[n + row]
            concept = 0 if instance_prompt == "a sks fabric pattern" else 1
            assert instance_prompt == ("a sks fabric pattern", "a zwx striped cloth")[concept]
            assert class_prompt == sets.prompts[concept]
            assert sets.offsets[concept] <= class_index < sets.offsets[concept] + sets.counts[concept]
            seen_concepts.add(concept)
    assert seen_concepts == {0, 1} and len(trainer.seen) == 6
    job = json.loads((tmp_path / "run" / "job.json").read_text())
    assert job["class_dirs"] == [str(two_subjects["fabric_class"]), str(two_subjects["stripes_class"])]
    warnings = [e["message"] for e in map(json.loads, (tmp_path / "run" / "events.jsonl").read_text().splitlines())
                if e.get("level") == "warning" and "num_class_images" in e.get("message", "")]  # fmt: skip
    assert [w.split(" holds ")[1].split(",")[0] for w in warnings] == ["3 images", "2 images"]  # of 4 asked for


def _fixed_loss(trainer, folder, prompt):
    """The diffusion loss of a concept's images at fixed noise and timesteps (the validation measure)."""
    from trainer.data.caches import LatentSource
    from trainer.data.images import load_image_folder

    images = load_image_folder(folder, 64)
    comps = trainer.comps
    source = LatentSource(comps.vae, images.images, 64, True, False, True, "cpu", 0)
    measure = ValidationLoss(samples_from(source, [prompt] * len(images)), 1000, seed=0)

    def embed(prompts):
        return comps.family.encode_prompts(comps, prompts, "cpu")

    comps.unet.eval()
    return measure.measure(comps.unet, comps.noise_scheduler(), embed, comps.family, "cpu", torch.float32)


def test_two_concepts_with_their_own_tokens_both_learn(two_subjects, tmp_path):
    from trainer.base_models.builtin import build_tiny

    cfg = _config(
        two_subjects, max_train_steps=40, train_batch_size=2, with_prior_preservation=False, learning_rate=5e-3
    )
    before = Trainer(cfg, tmp_path / "before", comps=build_tiny(), cache_root=tmp_path / "cache")
    trainer = Trainer(cfg, tmp_path / "run", comps=build_tiny(), cache_root=tmp_path / "cache")
    trainer.run()
    before.comps = build_tiny()
    for folder, prompt in (
        (two_subjects["fabric"], "a sks fabric pattern"),
        (two_subjects["stripes"], "a zwx striped cloth"),
    ):
        start, end = _fixed_loss(before, folder, prompt), _fixed_loss(trainer, folder, prompt)
        assert end < 0.9 * start, (prompt, start, end)
    prompts = trainer.method.sample_prompts()
    assert prompts[:2] == ["a sks fabric pattern", "a zwx striped cloth"]


def test_cli_trains_two_concepts_from_a_toml_file(two_subjects, tmp_path):
    toml = tmp_path / "concepts.toml"
    concepts = _concepts(two_subjects)
    lines = [
        "base_model = 'tiny'",
        "resolution = 64",
        "max_train_steps = 2",
        "sample_every = 0",
        "checkpoint_every = 0",
    ]
    for concept in concepts:
        lines.append("[[concepts]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in concept.items()]
    toml.write_text("\n".join(lines) + "\n")
    run = subprocess.run(
        [sys.executable, "-m", "trainer", "train", "--config", str(toml), "--output-dir", str(tmp_path / "run"),
         "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    log = (tmp_path / "run" / "events.jsonl").read_text()
    assert "concepts: 'fabric': 5 images x 1" in log and "'stripes': 4 images x 2" in log
    assert json.loads(run.stdout)["lora"].endswith(".safetensors")
    again = subprocess.run(
        [sys.executable, "-m", "trainer", "train", "--config", str(toml), "--output-dir", str(tmp_path / "run"),
         "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert again.returncode == 0 and "already holds the finished result" in again.stderr


def _add_concept(dataset, name, prompt, token, class_prompt, previous=None, **extra):
    from conftest import pack_node

    args = {**dict(num_class_images=2, repeats=1, prior_loss_weight=1.0), **extra}
    (concepts,) = pack_node("DreamLoomAddConcept")().add(
        dataset, name, prompt, token, class_prompt, concepts=previous, **args
    )
    return concepts


def _node_datasets(subjects):
    from conftest import pack_node

    load = pack_node("DreamLoomLoadTrainingImages")().load
    return [load(str(subjects[key]), 64, "center", False, False)[0] for key in ("fabric", "stripes")]


def test_add_concept_nodes_give_the_training_node_a_concept_list(fake_comfy, two_subjects):
    from conftest import pack_error, pack_module, pack_node

    fabric, stripes = _node_datasets(two_subjects)
    concepts = _add_concept(fabric, "", "a sks fabric pattern", "sks", "a fabric pattern")
    concepts = _add_concept(stripes, "stripes", "a zwx striped cloth", "zwx", "a striped cloth", concepts, repeats=3)
    assert len(concepts) == 2
    runner, training = pack_module("nodes.runner"), pack_module("nodes.training")
    cfg = training._config("lora", runner.BUILTIN_TINY, None, None, None, concepts, max_train_steps=2)
    first, second = cfg.concept_list()
    assert cfg.instance_dir == "" and first.instance_dir == fabric.folder and first.name == "fabric"
    assert (second.name, second.token, second.repeats, second.num_class_images) == ("stripes", "zwx", 3, 2)
    assert training._data_fingerprint(None, concepts) != training._data_fingerprint(None, concepts[:1])
    clash = _add_concept(stripes, "stripes", "a dog", "zwx", "a dog photo", concepts[:1])
    with pytest.raises(pack_error(), match="concepts\\[1\\].instance_prompt = 'a dog'"):
        training._config("lora", runner.BUILTIN_TINY, None, None, None, clash)
    with pytest.raises(pack_error(), match="No training images connected"):
        training._config("lora", runner.BUILTIN_TINY, None, None, None, None)
    inputs = pack_node("DreamLoomTrainLoRA").INPUT_TYPES()
    assert inputs["optional"]["concepts"][0] == "DL_CONCEPTS" and "instance_images" in inputs["optional"]


@pytest.mark.slow
def test_lora_node_trains_two_concepts_end_to_end(fake_comfy, two_subjects):
    from conftest import pack_module, pack_node
    from safetensors.torch import load_file

    fabric, stripes = _node_datasets(two_subjects)
    concepts = _add_concept(fabric, "", "a sks fabric pattern", "sks", "a fabric pattern")
    concepts = _add_concept(stripes, "", "a zwx striped cloth", "zwx", "a striped cloth", concepts)
    out = pack_node("DreamLoomTrainLoRA")().train(
        ckpt_name=pack_module("nodes.runner").BUILTIN_TINY, instance_prompt="ignored", token="sks", class_prompt="a",
        prior_preservation=True, prior_loss_weight=1.0, num_class_images=2, rank=2, alpha=2.0, learning_rate=1e-3,
        max_train_steps=2, seed=1, sample_every=0, output_name="two_concepts", concepts=concepts, unique_id="3",
    )  # fmt: skip
    name = out["result"][0]
    assert load_file(str(fake_comfy.models / "loras" / name))
    run = next((fake_comfy.root / "output" / "dreamloom" / "runs").glob("two_concepts-*"))
    job = json.loads((run / "job.json").read_text())
    assert [c["token"] for c in job["config"]["concepts"]] == ["sks", "zwx"] and len(job["class_dirs"]) == 2
