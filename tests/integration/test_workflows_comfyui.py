"""Each shipped workflow's API twin runs in a real ComfyUI, turned down to a random-weight SD1.5 at 64 px."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from .comfy_server import comfyui_path
from .conftest import CKPT

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

if comfyui_path() is None:
    pytest.skip(
        "COMFYUI_PATH is not set to a ComfyUI checkout: ComfyUI workflow tests skipped", allow_module_level=True
    )

TWINS = Path(__file__).resolve().parents[1] / "workflows"


def turned_down(api: dict) -> dict:
    api = json.loads(json.dumps(api))
    for node in api.values():
        ct, i = node["class_type"], node["inputs"]
        if "ckpt_name" in i:
            i["ckpt_name"] = CKPT
        if ct == "DreamLoomLoadTrainingImages":
            i["resolution"] = 64
        elif ct == "DreamLoomGenerateClassImages":
            i.update(count=2, resolution=64, steps=1)
        elif ct == "DreamLoomTrainLoRA":
            i.update(max_train_steps=2, num_class_images=2, sample_every=0, learning_rate=1e-2)
        elif ct == "DreamLoomTrainTextualInversion":
            i.update(max_train_steps=2, sample_every=0, learning_rate=0.05)
        elif ct == "EmptyLatentImage":
            i.update(width=64, height=64)
        elif ct in ("KSampler", "BasicScheduler"):
            i["steps"] = 1
        elif ct == "DreamLoomSlerpNoise":
            i.update(width=64, height=64, frames_per_transition=min(i["frames_per_transition"], 2))
    return api


def _saved(server, entry, class_type, api):
    files = []
    for node_id, out in entry["outputs"].items():
        if api[node_id]["class_type"] == class_type:
            for img in out.get("images", []):
                files.append(server.base / "output" / img["subfolder"] / img["filename"])
    return files


@pytest.mark.parametrize(
    "name", ["fabric_dreambooth_lora", "fabric_textual_inversion", "fabric_explore", "fabric_morph"]
)
def test_workflow_runs(server, name):
    api = turned_down(json.loads((TWINS / f"{name}.api.json").read_text()))
    entry = server.wait(server.queue_prompt(api), timeout=1800)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]
    if name == "fabric_morph":
        (gif,) = _saved(server, entry, "DreamLoomSaveAnimation", api)
        with Image.open(gif) as im:
            assert im.info["loop"] == 0 and im.n_frames == 10  # 5 keyframes x 2 frames
    else:
        grids = _saved(server, entry, "SaveImage", api)
        assert len(grids) == (3 if name == "fabric_explore" else 1)
        for path in grids:
            with Image.open(path) as im:
                assert im.width >= 3 * 64
