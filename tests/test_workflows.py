"""The shipped workflows validate against ComfyUI 0.3.64's recorded /object_info and our nodes, without ComfyUI."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from workflow_format import input_specs, is_widget, object_info, ui_to_api, validate_ui  # noqa: E402

SD15_NAMES = [
    "fabric_dreambooth_lora",
    "fabric_textual_inversion",
    "fabric_explore",
    "fabric_morph",
    "dreambooth_full_finetune",
]
SDXL_NAMES = ["sdxl_dreambooth_lora", "sdxl_textual_inversion"]
NAMES = SD15_NAMES + SDXL_NAMES
TINY_FABRIC = "tiny-fabric (built-in 128 px fabric model)"
TINY_SDXL = "tiny-sdxl (built-in 64 px SDXL test model)"
BASE_MODEL_USERS = (
    "DreamLoomGenerateClassImages",
    "DreamLoomTrainLoRA",
    "DreamLoomTrainTextualInversion",
    "DreamLoomTrainFull",
)
# Training and class-image nodes draw their sample previews inside themselves (up to ~512 px tall) and grow.
GROWING = BASE_MODEL_USERS
GROWS_BELOW = 700
TITLE_HEIGHT = 30  # the editor draws a node's title bar above its pos


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


def _node(ui, node_id):
    return next(n for n in ui["nodes"] if n["id"] == node_id)


def _sources(ui, node, input_name):
    """(source node, output name) of what is linked to `input_name` of `node`, or None."""
    inp = next((i for i in node["inputs"] if i["name"] == input_name), None)
    if inp is None or inp["link"] is None:
        return None
    link = next(lk for lk in ui["links"] if lk[0] == inp["link"])
    src = _node(ui, link[1])
    return src, src["outputs"][link[2]]["name"]


def _widget(node, info, name):
    """The value of widget `name` of a UI node (widgets_values are in input order, seeds followed by a control)."""
    values = iter(node["widgets_values"])
    for spec_name, kind, opts, _ in input_specs(info[node["type"]]):
        if not is_widget(kind, opts):
            continue
        value = next(values)
        if opts.get("control_after_generate"):
            next(values)
        if spec_name == name:
            return value
    raise KeyError(name)


@pytest.mark.parametrize("name", NAMES)
def test_one_loader_chooses_the_model_of_the_whole_workflow(name, info):
    """Runs unchanged on the built-in tiny-fabric (SD1.5 workflows) or tiny-sdxl (SDXL workflows); an SD1.5 or SDXL
    checkpoint is one widget away (issue: the whole graph on any machine)."""
    ui = _ui(name)
    builtin = TINY_SDXL if name in SDXL_NAMES else TINY_FABRIC
    loaders = [n for n in ui["nodes"] if n["type"] == "DreamLoomLoadCheckpoint"]
    # a second loader only loads what the workflow trained: the full fine-tune's checkpoint, by the node's output
    trained = [n for n in loaders if _sources(ui, n, "ckpt_path") is not None]
    for node in trained:
        assert _sources(ui, node, "ckpt_path")[0]["type"] == "DreamLoomTrainFull"
        assert node["widgets_values"] == [builtin]
    (loader,) = [n for n in loaders if n not in trained]
    renderers = [loader] + trained  # a latent and a decode use the VAE of the model that renders
    assert loader["widgets_values"] == [builtin]
    assert builtin in info["DreamLoomLoadCheckpoint"]["input"]["required"]["ckpt_name"][0]
    assert not {"CheckpointLoaderSimple", "EmptyLatentImage"} & {n["type"] for n in ui["nodes"]}
    base_users = [n for n in ui["nodes"] if n["type"] in BASE_MODEL_USERS]
    assert base_users
    for node in base_users:
        assert _sources(ui, node, "base_model") == (loader, "base_model"), f"{node['type']}#{node['id']}"
        # the overridden widget still names a choice every machine has, so ComfyUI's validation passes anywhere
        assert _widget(node, info, "ckpt_name") == builtin
    # every latent is made at the model's native size, by the loader's VAE
    for node in ui["nodes"]:
        if node["type"] in ("DreamLoomEmptyLatent", "DreamLoomSlerpNoise"):
            assert (_widget(node, info, "width"), _widget(node, info, "height")) == (0, 0)
            assert _sources(ui, node, "vae") in [(r, "vae") for r in renderers]
        if node["type"] in ("DreamLoomLoadTrainingImages", "DreamLoomGenerateClassImages"):
            assert _widget(node, info, "resolution") == 0
        if node["type"] in ("VAEDecode", "DreamLoomRenderMorph"):
            assert _sources(ui, node, "vae") in [(r, "vae") for r in renderers]
        if node["type"] in ("DreamLoomLoadLoRA",):
            assert _sources(ui, node, "model") == (loader, "model") and _sources(ui, node, "clip") == (loader, "clip")
    # Prompt Batch's count still sets the batch of the latent its sampler renders
    for node in ui["nodes"]:
        if node["type"] == "DreamLoomEmptyLatent" and _sources(ui, node, "batch_size") is not None:
            assert _sources(ui, node, "batch_size")[0]["type"] == "DreamLoomPromptBatch"
    assert (
        sum(1 for n in ui["nodes"] if n["type"] == "DreamLoomEmptyLatent")
        == {
            "fabric_dreambooth_lora": 1,
            "fabric_textual_inversion": 1,
            "fabric_explore": 2,
            "fabric_morph": 0,
            "sdxl_dreambooth_lora": 1,
            "sdxl_textual_inversion": 1,
            "dreambooth_full_finetune": 1,
        }[name]
    )
    # the first note says so
    note = min((n for n in ui["nodes"] if n["type"] == "Note"), key=lambda n: n["id"])["widgets_values"][0]
    words = ["Load Checkpoint (DreamLoom)", "whole workflow", "any CPU", "0", "native"]
    if name in SDXL_NAMES:
        words += ["tiny-sdxl", "random weights", "noise", "SDXL checkpoint", "1024 px"]
    else:
        words += ["tiny-fabric", "SD1.5"]
    for word in words:
        assert word in note, word


def _boxes(ui):
    """(node, x0, y0, x1, y1) as the editor draws each node: its title bar above pos, and room below the nodes
    that grow as sample previews arrive."""
    for n in ui["nodes"]:
        (x, y), (w, h) = n["pos"], n["size"]
        grow = GROWS_BELOW if n["type"] in GROWING else 0
        yield n, x, y - TITLE_HEIGHT, x + w, y + h + grow


@pytest.mark.parametrize("name", NAMES)
def test_nodes_do_not_overlap(name):
    boxes = list(_boxes(_ui(name)))
    overlaps = []
    for i, (a, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for b, bx0, by0, bx1, by1 in boxes[i + 1 :]:
            if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
                overlaps.append(f"{a['type']}#{a['id']} and {b['type']}#{b['id']}")
    assert overlaps == []


def test_the_overlap_check_sees_a_preview_under_a_training_node():
    ui = copy.deepcopy(_ui("fabric_dreambooth_lora"))
    train = next(n for n in ui["nodes"] if n["type"] == "DreamLoomTrainLoRA")
    loss = _sources_of_output(ui, train, "loss_plot")
    loss["pos"] = [train["pos"][0], train["pos"][1] + train["size"][1] + GROWS_BELOW - 100]
    boxes = {n["id"]: box for n, *box in _boxes(ui)}
    (tx0, ty0, tx1, ty1), (lx0, ly0, lx1, ly1) = boxes[train["id"]], boxes[loss["id"]]
    assert tx0 < lx1 and lx0 < tx1 and ty0 < ly1 and ly0 < ty1


def _sources_of_output(ui, node, output_name):
    out = next(o for o in node["outputs"] if o["name"] == output_name)
    (link,) = [lk for lk in ui["links"] if lk[0] in out["links"]]
    return _node(ui, link[3])


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
    # explore trains its own LoRA at the tutorial's rank, rate and steps, without class images (README: times)
    train = next(n["inputs"] for n in explore.values() if n["class_type"] == "DreamLoomTrainLoRA")
    assert (train["rank"], train["learning_rate"], train["max_train_steps"], train["prior_preservation"]) == (
        4,
        1e-4,
        800,
        False,
    )
    assert "class_images" not in train and train["output_name"] == "sks_fabric_explore"
    assert not any(n["class_type"] == "DreamLoomGenerateClassImages" for n in explore.values())


def test_ti_workflow_trains_at_the_quality_benchmarks_setting():
    """The TI workflow's rate and steps are the ones `python -m trainer quality` measured (README's table)."""
    from trainer.lab.quality import QualitySpec

    api = json.loads((ROOT / "tests" / "workflows" / "fabric_textual_inversion.api.json").read_text())
    train = next(n["inputs"] for n in api.values() if n["class_type"] == "DreamLoomTrainTextualInversion")
    spec = QualitySpec()
    assert (train["learning_rate"], train["max_train_steps"]) == (spec.ti_lr, spec.ti_steps)
    assert train["initializer_token"] == "pattern"
    assert 0 < train["sample_every"] < train["max_train_steps"]


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


@pytest.mark.parametrize("name", NAMES)
def test_template_has_a_thumbnail(name):
    """ComfyUI serves workflows/ as templates; the editor asks for <name>.jpg next to each (404 without one)."""
    from PIL import Image

    with Image.open(ROOT / "workflows" / f"{name}.jpg") as thumb:
        assert thumb.format == "JPEG" and thumb.size[0] == thumb.size[1] >= 256
        assert thumb.convert("L").getextrema()[1] - thumb.convert("L").getextrema()[0] > 64  # a picture


def test_sdxl_workflows_train_for_sdxl_and_publish_their_own_names():
    """The SDXL workflows' settings are SDXL's (run unchanged on tiny-sdxl in minutes), and their files do not take
    the SD1.5 workflows' names, so both sets run in one ComfyUI side by side."""
    lora = json.loads((ROOT / "tests" / "workflows" / "sdxl_dreambooth_lora.api.json").read_text())
    train = next(n["inputs"] for n in lora.values() if n["class_type"] == "DreamLoomTrainLoRA")
    assert (train["rank"], train["learning_rate"], train["max_train_steps"], train["prior_preservation"]) == (
        4,
        1e-4,
        500,
        True,
    )
    assert train["output_name"] == "sks_fabric_sdxl" and train["num_class_images"] == 50
    classes = next(n["inputs"] for n in lora.values() if n["class_type"] == "DreamLoomGenerateClassImages")
    assert (classes["count"], classes["resolution"]) == (50, 0)
    ti = json.loads((ROOT / "tests" / "workflows" / "sdxl_textual_inversion.api.json").read_text())
    train = next(n["inputs"] for n in ti.values() if n["class_type"] == "DreamLoomTrainTextualInversion")
    assert train["output_name"] == "sks_fabric_sdxl_ti" and train["max_train_steps"] == 500
    batch = next(n["inputs"] for n in ti.values() if n["class_type"] == "DreamLoomPromptBatch")
    assert batch["subject"] == ["5", 1]  # the training node's prompt_token: embedding:<the published name>
    for api in (lora, ti):
        for node in api.values():
            if node["class_type"] == "KSampler":
                assert (node["inputs"]["steps"], node["inputs"]["cfg"]) == (30, 7.0)


def test_full_fine_tune_workflow_trains_as_the_paper_and_samples_the_result_with_core_nodes(info):
    api = json.loads((ROOT / "tests" / "workflows" / "dreambooth_full_finetune.api.json").read_text())
    (train_id,) = [k for k, n in api.items() if n["class_type"] == "DreamLoomTrainFull"]
    train = api[train_id]["inputs"]
    assert (train["learning_rate"], train["prior_loss_weight"], train["prior_preservation"]) == (5e-6, 1.0, True)
    assert train["output_name"] == "sks_fabric_full" and train["num_class_images"] == 100
    loaders = {k: n for k, n in api.items() if n["class_type"] == "DreamLoomLoadCheckpoint"}
    (tuned,) = [k for k, n in loaders.items() if "ckpt_path" in n["inputs"]]
    assert loaders[tuned]["inputs"]["ckpt_path"] == [train_id, 0]  # the published checkpoint's name
    sampler = next(n["inputs"] for n in api.values() if n["class_type"] == "KSampler")
    assert sampler["model"] == [tuned, 0]
    decode = next(n["inputs"] for n in api.values() if n["class_type"] == "VAEDecode")
    assert decode["vae"] == [tuned, 2]
    for node in api.values():
        if node["class_type"] == "CLIPTextEncode":
            assert node["inputs"]["clip"] == [tuned, 1]
    assert {"KSampler", "VAEDecode", "SaveImage", "CLIPTextEncode"} <= {n["class_type"] for n in api.values()}
