"""The shipped workflows validate against ComfyUI 0.3.64's recorded /object_info and our nodes, without ComfyUI."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from workflow_format import object_info, ui_to_api, validate_ui  # noqa: E402

NAMES = ["fabric_dreambooth_lora", "fabric_textual_inversion", "fabric_explore", "fabric_morph"]


@pytest.fixture(scope="module")
def info():
    return object_info()


def _ui(name):
    return json.loads((ROOT / "workflows" / f"{name}.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_workflow_is_valid(name, info):
    ui = _ui(name)
    assert validate_ui(ui, info) == []
    types = {n["type"] for n in ui["nodes"]}
    assert "Note" in types, "every workflow explains itself"
    ours = {t for t in types if t.startswith("DreamLoom")}
    core = types - ours - {"Note"}
    snapshot = json.loads((ROOT / "tests" / "data" / "object_info_comfyui_0.3.64.json").read_text())["nodes"]
    assert core <= set(snapshot)
    for node in ui["nodes"]:
        if node["type"] == "DreamLoomLoadTrainingImages":
            assert node["widgets_values"][0] == "dreamloom_fabric"  # the bundled sample set by default
        if node["type"] in (
            "CheckpointLoaderSimple",
            "DreamLoomGenerateClassImages",
            "DreamLoomTrainLoRA",
            "DreamLoomTrainTextualInversion",
        ):
            assert node["widgets_values"][0] == "v1-5-pruned-emaonly.safetensors"


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_is_in_sync(name, info):
    twin = json.loads((ROOT / "tests" / "workflows" / f"{name}.api.json").read_text())
    assert ui_to_api(_ui(name), info) == twin
    assert all("class_type" in n and "inputs" in n for n in twin.values())


def test_committed_files_match_the_builder():
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "build_workflows.py"), "--check"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_tutorial_settings_are_in_the_workflows():
    api = json.loads((ROOT / "tests" / "workflows" / "fabric_dreambooth_lora.api.json").read_text())
    train = next(n["inputs"] for n in api.values() if n["class_type"] == "DreamLoomTrainLoRA")
    assert (train["rank"], train["learning_rate"], train["max_train_steps"], train["prior_preservation"]) == (
        4,
        1e-4,
        800,
        True,
    )
    classes = next(n["inputs"] for n in api.values() if n["class_type"] == "DreamLoomGenerateClassImages")
    assert (classes["class_prompt"], classes["count"]) == ("a fabric pattern", 100)
    morph = json.loads((ROOT / "tests" / "workflows" / "fabric_morph.api.json").read_text())
    noise = next(n["inputs"] for n in morph.values() if n["class_type"] == "DreamLoomSlerpNoise")
    save = next(n["inputs"] for n in morph.values() if n["class_type"] == "DreamLoomSaveAnimation")
    assert (
        len(noise["seeds"].split(",")) * noise["frames_per_transition"] / save["fps"] == 15.0
        and save["format"] == "gif"
    )
    explore = json.loads((ROOT / "tests" / "workflows" / "fabric_explore.api.json").read_text())
    cfgs = sorted(
        n["inputs"]["cfg"] for n in explore.values() if n["class_type"] == "KSampler" and n["inputs"]["seed"] == 42
    )
    assert cfgs == [1.5, 3.0, 7.5, 12.0, 20.0]


def test_validator_catches_broken_workflows(info):
    ui = _ui("fabric_dreambooth_lora")
    ks = next(i for i, n in enumerate(ui["nodes"]) if n["type"] == "KSampler")

    def broken(mutate):
        bad = copy.deepcopy(ui)
        mutate(bad)
        return validate_ui(bad, info)

    assert any(
        "widget values" in p for p in broken(lambda u: u["nodes"][ks]["widgets_values"].pop(1))
    )  # the seed control value
    assert any(
        "not one of the choices" in p
        for p in broken(lambda u: u["nodes"][ks]["widgets_values"].__setitem__(4, "no_such_sampler"))
    )
    assert any(
        "above the maximum" in p for p in broken(lambda u: u["nodes"][ks]["widgets_values"].__setitem__(2, 10**6))
    )
    assert any("not an integer" in p for p in broken(lambda u: u["nodes"][ks]["widgets_values"].__setitem__(2, "30")))

    def cut_model(u):
        for inp in u["nodes"][ks]["inputs"]:
            if inp["name"] == "model":
                inp["link"] = None

    assert any("required input model is not connected" in p for p in broken(cut_model))

    def wrong_type(u):
        link = next(lk for lk in u["links"] if lk[5] == "CONDITIONING")
        link[5] = "LATENT"
        src = next(n for n in u["nodes"] if n["id"] == link[1])
        src["outputs"][link[2]]["type"] = "LATENT"
        dst = next(n for n in u["nodes"] if n["id"] == link[3])
        dst["inputs"][link[4]]["type"] = "IMAGE"

    assert any("takes IMAGE" in p for p in broken(wrong_type))
    assert any("unknown type" in p for p in broken(lambda u: u["nodes"][ks].__setitem__("type", "KSamplerTurbo")))
