"""Shared fixtures: the tiny model, the fabric sample set, and a random-weight full-size SD1.5 checkpoint."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# `make test` runs two pytest-xdist workers on two cores: each worker, and every process a test starts (the CLI,
# training workers), computes on one thread. Two workers of two OpenMP threads each would spin-wait on each other
# and run several times slower. Set before torch is imported; children inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

# Tests that hold a full-size model (several GB each) run one after another on one worker (`--dist loadgroup`), so
# that two of them never share the machine's memory; the session's full-size fixtures are then made once.
FULL_SIZE_FIXTURES = {"sd15_parts", "sd15_checkpoint", "sd15_components"}


# tryfirst: xdist reads the group marks in its own collection hook, which would otherwise run before this one and
# leave the tests ungrouped.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if FULL_SIZE_FIXTURES & set(item.fixturenames) or "full_size" in item.name:
            item.add_marker(pytest.mark.xdist_group("full-size"))
        elif item.get_closest_marker("comfyui"):  # one ComfyUI server at a time
            item.add_marker(pytest.mark.xdist_group("comfyui"))


@pytest.fixture(scope="session")
def fabric_dir(tmp_path_factory) -> Path:
    from trainer.data.sample_set import write_fabric_samples

    folder = tmp_path_factory.mktemp("fabric")
    write_fabric_samples(folder, size=128)
    return folder


@pytest.fixture
def tiny():
    from trainer.base_models.builtin import build_tiny

    return build_tiny()


def tiny_config(instance_dir, **overrides):
    from trainer.config import TrainConfig

    base = dict(
        base_model="tiny",
        instance_dir=str(instance_dir),
        resolution=64,
        max_train_steps=10,
        num_class_images=4,
        class_steps=2,
        class_batch_size=4,
        sample_steps=2,
        sample_every=0,
        checkpoint_every=0,
        learning_rate=1e-3,
    )
    base.update(overrides)
    return TrainConfig(**base)


def stop_after(calls: int):
    """A Trainer `should_stop` that says stop at its `calls`-th call, so the run stops after that step."""
    count = {"n": 0}

    def should_stop() -> bool:
        count["n"] += 1
        return count["n"] == calls

    return should_stop


def run_whole_and_resumed(make_trainer, tmp_path: Path, stop_at: int):
    """The same run twice: whole in tmp_path/whole, and in tmp_path/resumed stopped (StopRequested) after step
    `stop_at`, leaving that step's checkpoint, then resumed from it to its end by a fresh trainer.
    `make_trainer(run_dir, **kwargs)` makes a Trainer (kwargs: should_stop). Returns (the whole run's trainer, the
    resumed run's trainer, the resumed run's result)."""
    from trainer.errors import StopRequested

    whole = make_trainer(tmp_path / "whole")
    whole.run()
    with pytest.raises(StopRequested) as stopped:
        make_trainer(tmp_path / "resumed", should_stop=stop_after(stop_at)).run()
    assert stopped.value.step == stop_at and (tmp_path / "resumed" / "checkpoints" / f"step_{stop_at:05d}").is_dir()
    resumed = make_trainer(tmp_path / "resumed")
    result = resumed.run()
    assert result.resumed_from == stop_at
    return whole, resumed, result


def assert_loss_falls(unet, scheduler, batch, optimizer, steps: int) -> None:
    """`steps` optimizer steps of the diffusion loss (2 instance rows) on one fixed batch (latents, noise, timesteps,
    encodings): the mean loss of the last 5 steps ends under 0.8x that of the first 5."""
    from trainer.training.loss import diffusion_loss

    losses = []
    for _ in range(steps):
        loss = diffusion_loss(unet, scheduler, *batch, 2)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def assert_same_tensors(got: dict, expected: dict) -> None:
    """The same keys, and every tensor equal to the bit."""
    import torch

    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


@pytest.fixture(scope="session")
def sd15_parts():
    """Random-weight full-size SD1.5 state dicts (fp16) in diffusers layout, plus the configs."""
    from helpers.sd15_layout import random_sd15_parts

    return random_sd15_parts()


@pytest.fixture(scope="session")
def sd15_checkpoint(sd15_parts, tmp_path_factory) -> Path:
    from trainer.formats.ldm_layout import write_ldm_checkpoint

    path = tmp_path_factory.mktemp("sd15") / "v1-5-random.safetensors"
    p = sd15_parts
    write_ldm_checkpoint(path, p["unet"], p["vae"], p["text"], p["unet_config"], p["vae_config"])
    return path


@pytest.fixture(scope="session")
def sd15_components(sd15_checkpoint):
    from trainer.base_models.load import load_base_model

    return load_base_model(str(sd15_checkpoint))


def load_pack():
    """Import the repository as ComfyUI does: a package loaded by path (relative imports work)."""
    import importlib.util

    name = "dreamloom_pack"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def pack_node(name):
    """A node class of the pack loaded as ComfyUI loads it."""
    return load_pack().NODE_CLASS_MAPPINGS[name]


def pack_module(name):
    """A module of the pack loaded as ComfyUI loads it, e.g. "nodes.runner"; imported now if no node has yet (a
    lazily imported module is loaded only by the test that first needs it, whatever the order tests run in)."""
    import importlib

    load_pack()
    return importlib.import_module(f"dreamloom_pack.{name}")


def pack_error():
    """The pack's own DreamLoomError class (not trainer.errors', which the tests import separately)."""
    return pack_module("trainer.errors").DreamLoomError


class FakeInterrupt(Exception):
    """Stands in for comfy.model_management.InterruptProcessingException."""


class FakeComfy:
    """A stand-in for nodes/comfy.py: folders under a temp dir, a recording progress bar, an interrupt flag."""

    def __init__(self, root: Path):
        self.root = root
        self.models = root / "models"
        for kind in ("checkpoints", "loras", "embeddings"):
            (self.models / kind).mkdir(parents=True, exist_ok=True)
        (root / "input").mkdir(exist_ok=True)
        (root / "output").mkdir(exist_ok=True)
        self.progress: list[tuple] = []
        self.interrupt_flag = False
        self.interrupt_at_step: int | None = None
        self.freed = 0
        self.applied = None
        self.key_map: dict = {}
        self.sample_calls: list = []

    # folder_paths
    def filename_list(self, kind):
        folder = self.models / kind
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    def full_path(self, kind, name):
        p = self.models / kind / name
        return str(p) if p.exists() else None

    def folder_paths_for(self, kind):
        return [str(self.models / kind)]

    def input_directory(self):
        return str(self.root / "input")

    def output_directory(self):
        return str(self.root / "output")

    # progress / interrupt
    def progress_bar(self, total, node_id=None):
        fake = self

        class Bar:
            def update_absolute(self, value, total=None, preview=None):
                fake.progress.append((value, total, preview is not None))
                if fake.interrupt_at_step is not None and value >= fake.interrupt_at_step:
                    fake.interrupt_at_step = None
                    raise FakeInterrupt()

        return Bar()

    def interrupt_requested(self):
        return self.interrupt_flag

    def raise_interrupt(self):
        self.interrupt_flag = False
        raise FakeInterrupt()

    def free_memory(self):
        self.freed += 1

    def save_path(self, prefix, width, height):
        folder = self.root / "output" / os.path.dirname(prefix)
        folder.mkdir(parents=True, exist_ok=True)
        n = len(list(folder.glob(os.path.basename(prefix) + "_*"))) + 1
        return str(folder), f"{os.path.basename(prefix)}_{n:05}_", os.path.dirname(prefix)

    def sample_with_noise(self, model, positive, negative, cfg, sampler, sigmas, noise, latent_samples, seed):
        self.sample_calls.append((noise.shape[0], positive[0][0].shape[0]))
        return noise * 0.5

    def vae_decode(self, vae, samples):
        import torch

        grey = torch.sigmoid(samples.mean(1)).repeat_interleave(8, 1).repeat_interleave(8, 2)  # [n, 8h, 8w]
        return grey[..., None].expand(*grey.shape, 3).contiguous()

    def lora_key_map(self, model, clip):
        return self.key_map

    def apply_lora(self, model, clip, lora, sm, sc):
        self.applied = (lora, sm, sc)
        return ("patched-model", "patched-clip")

    def weight_shapes(self, model, clip):
        shapes = {}
        for holder in (getattr(model, "model", None), getattr(clip, "cond_stage_model", None)):
            if holder is not None:  # older tests pass plain strings for MODEL and CLIP
                shapes.update({k: tuple(v.shape) for k, v in holder.state_dict().items()})
        return shapes

    # checkpoint loading: stand-ins that record what they were given (the real ones need ComfyUI)
    def load_builtin(self, comps):
        self.loaded = ("builtin", comps.source)
        return FakeModel(), FakeClip(int(comps.text_encoder.config.hidden_size)), FakeVAE(4)

    def load_checkpoint_file(self, path):
        self.loaded = ("file", path)
        return FakeModel(), FakeClip(768), FakeVAE(8)


class FakeModel:
    """Looks like a ComfyUI ModelPatcher to our nodes: .model holds the weights."""

    def __init__(self, shapes: dict | None = None):
        import torch

        self.model = torch.nn.Module()
        self.shapes = shapes or {}

        def state_dict():
            return {k: torch.empty(shape) for k, shape in self.shapes.items()}

        self.model.state_dict = state_dict


class FakeClip:
    """A CLIP whose SD1 tokenizer takes embeddings `width` wide; encodes any text to zeros."""

    def __init__(self, width: int):
        import torch

        self.width = width
        self.tokenizer = type("Tokenizers", (), {})()
        self.tokenizer.clip_l = type("SDTokenizer", (), {"embedding_size": width, "embedding_key": "clip_l"})()
        self.cond_stage_model = torch.nn.Module()

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens, return_pooled=False):
        import torch

        return torch.zeros(1, 77, self.width), torch.zeros(1, self.width)


class FakeVAE:
    def __init__(self, ratio: int):
        self.ratio, self.latent_channels = ratio, 4

    def spacial_compression_encode(self):
        return self.ratio


@pytest.fixture
def fake_comfy(tmp_path, monkeypatch):
    pack = load_pack()
    comfy_mod = sys.modules["dreamloom_pack.nodes.comfy"]
    fake = FakeComfy(tmp_path / "comfy")
    for name in (
        "filename_list",
        "full_path",
        "folder_paths_for",
        "input_directory",
        "output_directory",
        "progress_bar",
        "interrupt_requested",
        "raise_interrupt",
        "free_memory",
        "lora_key_map",
        "apply_lora",
        "weight_shapes",
        "load_builtin",
        "load_checkpoint_file",
        "save_path",
        "sample_with_noise",
        "vae_decode",
    ):
        monkeypatch.setattr(comfy_mod, name, getattr(fake, name))
    fake.pack = pack
    return fake
