"""Node-contract tests with a stand-in for nodes/comfy.py (no ComfyUI needed)."""

import importlib
import os
import signal
import sys

import pytest
import torch
from conftest import FakeInterrupt, load_pack
from safetensors.torch import load_file

TINY = "tiny (built-in test model)"


def _node(name):
    return load_pack().NODE_CLASS_MAPPINGS[name]


def _errors():
    return sys.modules["dreamloom_pack.trainer.errors"]


def test_every_node_is_well_formed(fake_comfy):
    pack = fake_comfy.pack
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY.startswith("DreamLoom/"), node_id
        assert len(cls.DESCRIPTION) > 40, node_id
        assert callable(getattr(cls(), cls.FUNCTION)), node_id
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS), node_id
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                kind, opts = entry[0], entry[1] if len(entry) > 1 else {}
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
                if isinstance(kind, list):
                    assert kind, f"{node_id}.{name}: empty combo"
                    if "default" in opts:
                        assert opts["default"] in kind, f"{node_id}.{name}: default not in combo"
                elif kind in ("INT", "FLOAT"):
                    d = opts["default"]
                    assert opts.get("min", d) <= d <= opts.get("max", d), f"{node_id}.{name}: default out of range"
                    assert isinstance(d, int if kind == "INT" else (int, float))
                elif kind in ("STRING", "BOOLEAN"):
                    if "default" in opts:
                        assert isinstance(opts["default"], str if kind == "STRING" else bool)


def _dataset(fake, fabric_dir, resolution=64):
    ((ds, preview),) = [
        _node("DreamLoomLoadTrainingImages")().load(str(fabric_dir), resolution, "center", False, False)
    ]
    assert preview.shape[0] == 10 and preview.shape[-1] == 3
    return ds


def _train_lora(fake, ds, **kw):
    args = dict(
        ckpt_name=TINY,
        instance_images=ds,
        instance_prompt="a sks african fabric pattern",
        token="sks",
        class_prompt="a fabric pattern",
        prior_preservation=True,
        prior_loss_weight=1.0,
        num_class_images=2,
        rank=4,
        alpha=4.0,
        learning_rate=1e-3,
        max_train_steps=6,
        seed=1,
        sample_every=3,
        output_name="node_lora",
    )
    args.update(kw)
    settings = _node("DreamLoomTrainingSettings")().build(
        **{
            k: v[1].get("default", v[0][0] if isinstance(v[0], list) else None)
            for k, v in _node("DreamLoomTrainingSettings").INPUT_TYPES()["required"].items()
        }
    )[0]
    settings.update(checkpoint_every=2, class_steps=2, sample_steps=2)
    return _node("DreamLoomTrainLoRA")().train(settings=settings, unique_id="7", **args)


@pytest.mark.slow
def test_lora_node_end_to_end_progress_and_loadable_file(fake_comfy, fabric_dir):
    ds = _dataset(fake_comfy, fabric_dir)
    out = _train_lora(fake_comfy, ds)
    name, loss_plot, samples = out["result"]
    assert name == "node_lora.safetensors"
    path = fake_comfy.models / "loras" / name
    sd = load_file(str(path))
    assert any(k.endswith(".alpha") for k in sd) and all(k.startswith("lora_unet_") for k in sd)
    assert loss_plot.ndim == 4 and samples.shape[0] == 3  # steps 0, 3, 6
    assert fake_comfy.freed == 1
    training = [p for p in fake_comfy.progress if p[1] == 6]
    values = [v for v, _, _ in training]
    assert values == sorted(values) and values[-1] == 6
    # a preview goes with the update that brings a new grid (steps 0, 3, 6), not with every step's update
    assert sum(has_preview for _, _, has_preview in training) == 3
    assert out["ui"]["images"] and all(i["type"] == "output" for i in out["ui"]["images"])
    # The loader reads it back and maps every module (with ComfyUI's key map stood in by our own names).
    fake_comfy.key_map = {k.rsplit(".", 2)[0]: None for k in sd if k.endswith("lora_down.weight")}
    model, clip = _node("DreamLoomLoadLoRA")().load("m", "c", "(use lora_path input)", 0.8, 1.0, lora_path=name)
    assert (model, clip) == ("patched-model", "patched-clip")
    lora, sm, sc = fake_comfy.applied
    assert sm == 0.8 and set(lora) == set(sd)
    # Same inputs: reused, no retraining, same name.
    fake_comfy.progress.clear()
    again = _train_lora(fake_comfy, ds)
    assert again["result"][0] == name and fake_comfy.progress == []


@pytest.mark.slow
def test_interrupt_keeps_checkpoint_and_resumes_to_same_weights(fake_comfy, fabric_dir, tmp_path):
    ds = _dataset(fake_comfy, fabric_dir)
    reference = load_file(
        str(fake_comfy.models / "loras" / _train_lora(fake_comfy, ds, output_name="ref")["result"][0])
    )
    fake_comfy.interrupt_at_step = 3
    with pytest.raises(FakeInterrupt):
        _train_lora(fake_comfy, ds, output_name="cut")
    runs = fake_comfy.root / "output" / "dreamloom" / "runs"
    cut_run = next(p for p in runs.iterdir() if p.name.startswith("cut-"))
    assert list((cut_run / "checkpoints").glob("step_*")), "a checkpoint is kept"
    assert not (fake_comfy.models / "loras" / "cut.safetensors").exists()
    out = _train_lora(fake_comfy, ds, output_name="cut")
    resumed = load_file(str(fake_comfy.models / "loras" / out["result"][0]))
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)
    events = (cut_run / "events.jsonl").read_text()
    assert "resumed from checkpoint" in events
    assert events.count('"event": "stopped"') == 1  # written once, by the trainer, with its checkpoint


@pytest.mark.slow
def test_killed_worker_gives_clear_node_error_then_resumes(fake_comfy, fabric_dir, monkeypatch):
    ds = _dataset(fake_comfy, fabric_dir)
    jobs = importlib.import_module("dreamloom_pack.trainer.jobs.parent")
    real_run_job = jobs.run_job

    def killing_run_job(run_dir, on_event=None, **kw):
        def hook(e):
            on_event(e)
            if e["event"] == "checkpoint" and e.get("step") == 4:
                os.kill(int((run_dir / "worker.pid").read_text()), signal.SIGKILL)

        return real_run_job(run_dir, on_event=hook, **kw)

    monkeypatch.setattr(jobs, "run_job", killing_run_job)
    with pytest.raises(_errors().DreamLoomError) as info:
        _train_lora(fake_comfy, ds, output_name="killed")
    assert "killed by signal 9" in str(info.value) and "log.txt" in info.value.hint
    monkeypatch.setattr(jobs, "run_job", real_run_job)
    out = _train_lora(fake_comfy, ds, output_name="killed")
    assert (fake_comfy.models / "loras" / out["result"][0]).exists()
    runs = fake_comfy.root / "output" / "dreamloom" / "runs"
    killed_run = next(p for p in runs.iterdir() if p.name.startswith("killed-"))
    assert "resumed from checkpoint at step 4" in (killed_run / "events.jsonl").read_text()


@pytest.mark.slow
def test_ti_node_publishes_embedding(fake_comfy, fabric_dir):
    ds = _dataset(fake_comfy, fabric_dir)
    out = _node("DreamLoomTrainTextualInversion")().train(
        TINY, ds, "<sks-fabric>", "pattern", 5e-3, 4, 1, 2, "fab_ti", unique_id="3"
    )
    name, prompt, loss, samples = out["result"]
    assert name == "fab_ti" and prompt == "embedding:fab_ti"
    sd = load_file(str(fake_comfy.models / "embeddings" / "fab_ti.safetensors"))
    assert list(sd) == ["emb_params"] and sd["emb_params"].shape == (1, 64)


def test_bad_inputs_give_clear_errors(fake_comfy, fabric_dir, tmp_path):
    Err = _errors().DreamLoomError
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Err, match="No images"):
        _node("DreamLoomLoadTrainingImages")().load(str(empty), 64, "center", False, False)
    ds = _dataset(fake_comfy, fabric_dir)
    with pytest.raises(Err, match="not found in ComfyUI's checkpoints"):
        _train_lora(fake_comfy, ds, ckpt_name="missing.safetensors")
    for bad in ("../../x", "/etc/passwd", "a\x00b", "CON"):
        with pytest.raises(Err, match="output_name"):
            _train_lora(fake_comfy, ds, output_name=bad)
    with pytest.raises(Err, match="No LoRA chosen"):
        _node("DreamLoomLoadLoRA")().load("m", "c", "(use lora_path input)", 1.0, 1.0)
    with pytest.raises(Err, match="not found"):
        _node("DreamLoomLoadLoRA")().load("m", "c", "(use lora_path input)", 1.0, 1.0, lora_path="nope.safetensors")


def test_sample_set_is_created_in_input_folder_and_batches_are_saved(fake_comfy):
    import numpy as np

    node = _node("DreamLoomLoadTrainingImages")()
    ds, preview = node.load("dreamloom_fabric", 64, "center", True, False)
    assert ds.count == 10 and ds.folder.endswith("dreamloom_fabric") and ds.random_flip
    first = node.IS_CHANGED("dreamloom_fabric")
    img = os.path.join(ds.folder, "fabric_01.png")
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(img)
    assert node.IS_CHANGED("dreamloom_fabric") != first  # edited images retrain
    batch = torch.from_numpy(np.random.rand(6, 48, 48, 3).astype(np.float32))
    ds2, _ = node.load("ignored", 64, "center", False, False, images=batch, captions="one\ntwo")
    files = sorted(os.listdir(ds2.folder))
    assert files.count("image_000.txt") == 1 and len([f for f in files if f.endswith(".png")]) == 6
    assert ds2.use_captions


def test_slerp_noise_node_matches_comfyui_noise_at_keyframes(fake_comfy):
    noise, latent, n = _node("DreamLoomSlerpNoise")().build("1, 42, 100", 4, "cosine", 0, True, 64, 64)
    assert n == 12 and latent["samples"].shape == (12, 4, 8, 8)
    out = noise.generate_noise(latent)
    for k, seed in enumerate((1, 42, 100)):
        expected = torch.randn((1, 4, 8, 8), generator=torch.manual_seed(seed))
        assert torch.equal(out[k * 4], expected[0])
    assert noise.seed == 1
    with pytest.raises(_errors().DreamLoomError, match="12 frames but the latent batch has 3"):
        noise.generate_noise({"samples": torch.zeros(3, 4, 8, 8)})


def test_render_morph_chunks_and_save_animation(fake_comfy, tmp_path):
    from PIL import Image

    noise, latent, n = _node("DreamLoomSlerpNoise")().build("1, 2, 3, 4, 5", 6, "linear", 0, True, 64, 64)
    pos = [[torch.randn(1, 77, 768), {"pooled_output": torch.randn(1, 768)}]]
    cond_b = [[torch.randn(1, 77, 768), {"pooled_output": torch.randn(1, 768)}]]
    (morph_cond,) = _node("DreamLoomSlerpConditioning")().build(pos, cond_b, n, True)
    assert morph_cond[0][0].shape[0] == n and torch.allclose(morph_cond[0][0][0], pos[0][0][0])
    (frames,) = _node("DreamLoomRenderMorph")().render(
        "model", morph_cond, pos, "sampler", "sigmas", 7.5, "vae", noise, latent, 8, unique_id="1"
    )
    assert frames.shape == (30, 64, 64, 3)
    assert fake_comfy.sample_calls == [(8, 8), (8, 8), (8, 8), (6, 6)]  # conditioning sliced with the frames
    assert [p[0] for p in fake_comfy.progress] == [8, 16, 24, 30]
    out = _node("DreamLoomSaveAnimation")().save(frames, 30.0, "gif", True, "dreamloom/morph")
    path = out["result"][0]
    with Image.open(path) as gif:
        assert gif.info["loop"] == 0 and gif.n_frames >= 2
    assert out["ui"]["animated"] == (False,) and out["ui"]["images"][0]["subfolder"] == "dreamloom"


@pytest.mark.slow
def test_class_images_node_interrupt_keeps_images_and_resumes(fake_comfy):
    node = _node("DreamLoomGenerateClassImages")()
    args = (TINY, "a fabric pattern", "", 6, 64, 2, 7.5, "euler", 3, 2)
    fake_comfy.interrupt_at_step = 2  # after the first batch of 2
    with pytest.raises(FakeInterrupt):
        node.generate(*args, unique_id="5")
    assert fake_comfy.progress[-1][2]  # the progress bar shows the newest class image while the set is made
    cache = fake_comfy.root / "output" / "dreamloom" / "class_images"
    folder = next(cache.iterdir())
    kept = sorted(p.name for p in folder.glob("class_*.png"))
    assert kept and len(kept) < 6
    first = (folder / kept[0]).read_bytes()
    dataset, preview = node.generate(*args, unique_id="5")
    assert dataset.count == 6 and preview.shape[0] == 6 and dataset.folder == str(folder)
    assert (folder / kept[0]).read_bytes() == first  # kept and reused, not regenerated
    fake_comfy.progress.clear()
    assert node.generate(*args, unique_id="5")[0] == dataset and fake_comfy.progress == []  # finished set reused


@pytest.mark.slow
def test_training_writes_only_inside_comfyui_folders(fake_comfy, fabric_dir, tmp_path, monkeypatch):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    home, tmpdir = tmp_path / "home", tmp_path / "tmpdir"
    home.mkdir()
    tmpdir.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.delenv("MPLCONFIGDIR", raising=False)

    def snapshot(*roots):
        files = set()
        for r in roots:
            for p in Path(r).rglob("*"):
                if (
                    p.is_file()
                    and "__pycache__" not in p.parts
                    and ".venv" not in p.parts
                    and ".git" not in p.parts
                    and ".pytest_cache" not in p.parts
                    and ".hypothesis" not in p.parts
                ):
                    files.add(p)
        return files

    outside_before = snapshot(home, tmpdir, root, fabric_dir)
    comfy_before = snapshot(fake_comfy.root)
    ds = _dataset(fake_comfy, fabric_dir)
    _train_lora(fake_comfy, ds, output_name="walk")
    assert snapshot(home, tmpdir, root, fabric_dir) == outside_before
    new = snapshot(fake_comfy.root) - comfy_before
    allowed = (fake_comfy.root / "output" / "dreamloom", fake_comfy.models / "loras")
    stray = [p for p in new if not any(str(p).startswith(str(a)) for a in allowed)]
    assert stray == [] and (fake_comfy.models / "loras" / "walk.safetensors") in new


def test_builtin_tiny_fabric_is_offered_and_generates_class_images(fake_comfy):
    runner = sys.modules["dreamloom_pack.nodes.runner"]
    choices = runner.checkpoint_choices()
    assert (
        runner.BUILTIN_TINY_FABRIC in choices and runner.resolve_checkpoint(runner.BUILTIN_TINY_FABRIC) == "tiny-fabric"
    )
    node = _node("DreamLoomGenerateClassImages")()
    dataset, preview = node.generate(
        runner.BUILTIN_TINY_FABRIC, "a fabric pattern", "", 2, 128, 3, 7.5, "euler", 3, 2, unique_id="9"
    )
    assert dataset.count == 2 and preview.shape[1:] == (128, 128, 3)
    assert float(preview.std()) > 0.02  # a picture, not a flat field


@pytest.mark.parametrize(
    "widget, expected", [("auto", None), ("on", True), ("off", False), (True, True), (False, False)]
)
def test_training_settings_node_keeps_gradient_checkpointing_auto(fake_comfy, fabric_dir, widget, expected):
    """A connected Training Settings node left at its defaults chooses checkpointing by the GPU's free memory, as
    an unconnected one does (it was a boolean that turned it off); True/False from workflows saved then still
    validate and mean on/off, as ComfyUI checks them through VALIDATE_INPUTS."""
    from conftest import pack_module, pack_node

    node = pack_node("DreamLoomTrainingSettings")
    spec = node.INPUT_TYPES()["required"]
    defaults = {k: v[1].get("default", v[0][0] if isinstance(v[0], list) else None) for k, v in spec.items()}
    assert defaults["gradient_checkpointing"] == "auto" and list(spec["gradient_checkpointing"][0]) == [
        "auto",
        "on",
        "off",
    ]
    assert node.VALIDATE_INPUTS(gradient_checkpointing=widget) is True
    settings = node().build(**{**defaults, "gradient_checkpointing": widget})[0]
    ((dataset, _),) = [pack_node("DreamLoomLoadTrainingImages")().load(str(fabric_dir), 64, "center", False, False)]
    runner, training = pack_module("nodes.runner"), pack_module("nodes.training")
    cfg = training._config("lora", runner.BUILTIN_TINY_FABRIC, dataset, settings)
    assert cfg.gradient_checkpointing is expected


def test_training_settings_node_refuses_an_unknown_checkpointing_value():
    from conftest import pack_node

    message = pack_node("DreamLoomTrainingSettings").VALIDATE_INPUTS(gradient_checkpointing="sometimes")
    assert "auto, on, off" in message and "'sometimes'" in message


def _fake_model_management(monkeypatch, high_vram: bool):
    """comfy.model_management as free_memory uses it: unloading and the VRAM state ComfyUI was started in."""
    import enum
    import types

    mm = types.ModuleType("comfy.model_management")
    mm.VRAMState = enum.Enum("VRAMState", "NORMAL_VRAM HIGH_VRAM")
    mm.vram_state = mm.VRAMState.HIGH_VRAM if high_vram else mm.VRAMState.NORMAL_VRAM
    mm.calls = []
    mm.unload_all_models = lambda: mm.calls.append("unload")
    mm.soft_empty_cache = lambda: mm.calls.append("empty")
    package = types.ModuleType("comfy")
    package.model_management = mm
    monkeypatch.setitem(sys.modules, "comfy", package)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    return mm


@pytest.mark.parametrize("high_vram", [False, True])
def test_freeing_vram_says_when_comfyui_keeps_its_models_on_the_gpu(monkeypatch, high_vram):
    """With --highvram or --gpu-only ComfyUI's "unload" keeps the weights in VRAM: the user is told, not left
    wondering why training chose gradient checkpointing or ran out of memory."""
    load_pack()
    comfy_mod = sys.modules["dreamloom_pack.nodes.comfy"]
    mm = _fake_model_management(monkeypatch, high_vram)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 5 * 2**30)
    note = comfy_mod.free_memory()
    assert mm.calls == ["unload", "empty"]
    if high_vram:
        assert "--highvram" in note and "5.0 GiB" in note
    else:
        assert note is None


def test_the_runner_logs_the_vram_note_to_comfyuis_console(fake_comfy, monkeypatch, tmp_path, caplog):
    jobs = importlib.import_module("dreamloom_pack.trainer.jobs.parent")
    runner = sys.modules["dreamloom_pack.nodes.runner"]
    monkeypatch.setattr(jobs, "finished_outputs", lambda run_dir: None)
    monkeypatch.setattr(jobs, "run_job", lambda run_dir, **kw: {"result": "done"})
    monkeypatch.setattr(sys.modules["dreamloom_pack.nodes.comfy"], "free_memory", lambda: "models stay on the GPU")
    with caplog.at_level("WARNING", logger="DreamLoom"):
        assert runner.run_with_progress(tmp_path, 4) == {"result": "done"}
    assert "[DreamLoom] models stay on the GPU" in caplog.text
