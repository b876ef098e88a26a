"""The SDXL workflows run in a real ComfyUI on the built-in tiny-sdxl (the loader's default), in a fresh ComfyUI with
no checkpoint, LoRA or embedding files: train, load the result through our loader or `embedding:`, render the
nine-context grid with core KSampler and VAE Decode. Nothing in the log says a LoRA key or an embedding was skipped,
and nothing raised.

* small: the loader and the graph unchanged, only the step and image counts cut (a minute or two each);
* unchanged (slow): exactly as shipped; wall times go to build/workflow_times.json with the SD1.5 workflows'.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from .comfy_server import ComfyServer, comfyui_path

pytestmark = pytest.mark.comfyui

if comfyui_path() is None:
    pytest.skip("COMFYUI_PATH is not set to a ComfyUI checkout: SDXL workflow tests skipped", allow_module_level=True)

from .test_workflows_comfyui import _check_grid, _published, _run_timed, _saved  # noqa: E402

TWINS = Path(__file__).resolve().parents[1] / "workflows"
TINY_SDXL = "tiny-sdxl (built-in 64 px SDXL test model)"
GRIDS = {"sdxl_dreambooth_lora": "dreamloom/sdxl_contexts", "sdxl_textual_inversion": "dreamloom/sdxl_ti_contexts"}


@pytest.fixture
def bare_server(tmp_path):
    srv = ComfyServer(tmp_path / "comfy").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def times_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sdxl_workflow_times")


def small(api: dict) -> dict:
    """The workflow with its counts cut: a few training steps (with a preview grid on the way), 2 class images, 3
    sampling steps. The loader, the graph and every other widget stay as shipped."""
    api = json.loads(json.dumps(api))
    for node in api.values():
        ct, i = node["class_type"], node["inputs"]
        if ct == "DreamLoomGenerateClassImages":
            i.update(count=2, steps=2)
        elif ct == "DreamLoomTrainLoRA":
            i.update(max_train_steps=4, num_class_images=2, sample_every=2)
        elif ct == "DreamLoomTrainTextualInversion":
            i.update(max_train_steps=4, sample_every=2)
        elif ct == "KSampler":
            i["steps"] = 3
    return api


def _check(server, entry, api, name, class_images):
    saved = _saved(server, entry, "SaveImage", api)
    assert set(saved) == {GRIDS[name]}, saved
    _check_grid(saved[GRIDS[name]], 3, 3, tile=64)  # nine contexts at tiny-sdxl's native 64 px
    previews = _saved(server, entry, "PreviewImage", api)
    assert len(previews) >= 2 and all(p.exists() for p in previews.values())  # training images and loss
    samples = sorted((server.base / "output" / "dreamloom" / "runs").glob("*/samples/step_*.png"))
    assert len(samples) == 3, samples  # preview grids at the start, on the way and at the end
    if name == "sdxl_dreambooth_lora":
        path = _published(server, "loras", "sks_fabric_sdxl")
        with safe_open(str(path), "pt") as f:
            meta, keys = f.metadata(), list(f.keys())
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["dreamloom.base_model"] == "tiny-sdxl"
        assert any(k.startswith("lora_unet_input_blocks_") for k in keys)  # kohya's SDXL (LDM) names
        found = list((server.base / "output" / "dreamloom" / "class_images").rglob("*.png"))
        assert len(found) == class_images
    else:
        path = _published(server, "embeddings", "sks_fabric_sdxl_ti")
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert shapes == {"clip_l": (1, 32), "clip_g": (1, 32)}  # SDXL's two encoders, at tiny-sdxl's widths


def _shipped(name: str) -> dict:
    api = json.loads((TWINS / f"{name}.api.json").read_text())
    (loader,) = [n for n in api.values() if n["class_type"] == "DreamLoomLoadCheckpoint"]
    assert loader["inputs"]["ckpt_name"] == TINY_SDXL
    return api


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", sorted(GRIDS))
def test_sdxl_workflow_runs_on_tiny_sdxl_small(bare_server, times_dir, name):
    api = small(_shipped(name))
    entry = _run_timed(bare_server, api, f"{name} (small)", times_dir, "tiny-sdxl, counts cut")
    _check(bare_server, entry, api, name, class_images=2)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", sorted(GRIDS))
def test_sdxl_workflow_runs_unchanged_on_tiny_sdxl(bare_server, times_dir, name):
    api = _shipped(name)
    entry = _run_timed(bare_server, api, name, times_dir, "tiny-sdxl (unchanged workflow)")
    _check(bare_server, entry, api, name, class_images=50)
