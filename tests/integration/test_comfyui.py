"""Integration tests against a real ComfyUI (set COMFYUI_PATH to a ComfyUI checkout; optional COMFYUI_PYTHON).

They start ComfyUI with --cpu and this pack, and use a random-weight full-size SD1.5 checkpoint.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from safetensors.torch import load_file

from .comfy_server import comfyui_path
from .conftest import CKPT

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

if comfyui_path() is None:
    pytest.skip(
        "COMFYUI_PATH is not set to a ComfyUI checkout: ComfyUI integration tests skipped", allow_module_level=True
    )

OUR_NODES = [
    "DreamLoomLoadTrainingImages",
    "DreamLoomGenerateClassImages",
    "DreamLoomTrainingSettings",
    "DreamLoomTrainLoRA",
    "DreamLoomTrainTextualInversion",
    "DreamLoomAddConcept",
    "DreamLoomLoadLoRA",
]


def settings(**overrides):
    s = {
        "lr_scheduler": "constant",
        "lr_warmup_steps": 0,
        "train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "max_grad_norm": 1.0,
        "snr_gamma": 0.0,
        "noise_offset": 0.0,
        "mixed_precision": "no",
        "gradient_checkpointing": False,
        "use_8bit_adam": False,
        "train_text_encoder": False,
        "text_encoder_lr": 5e-5,
        "checkpoint_every": 0,
        "sample_steps": 1,
        "sample_guidance": 7.5,
        "class_sampler": "euler",
        "class_steps": 1,
        "num_vectors": 1,
        "ti_templates": "style",
        "clamp_norm": False,
        "caption_shuffle": False,
        "caption_keep_tokens": 0,
        "caption_dropout": 0.0,
        "validation_images": 0,
        "validation_every": 50,
    }
    s.update(overrides)
    return {"class_type": "DreamLoomTrainingSettings", "inputs": s}


def images_node(folder="dreamloom_fabric"):
    return {
        "class_type": "DreamLoomLoadTrainingImages",
        "inputs": {
            "folder": folder,
            "resolution": 64,
            "crop": "center",
            "flip": False,
            "use_captions": False,
            "aspect_buckets": True,
            "masked_loss": "off",
        },
    }


def lora_train_graph(output_name, steps, settings_node):
    return {
        "1": images_node(),
        "2": settings_node,
        "3": {
            "class_type": "DreamLoomTrainLoRA",
            "inputs": {
                "ckpt_name": CKPT,
                "instance_images": ["1", 0],
                "instance_prompt": "a sks african fabric pattern",
                "token": "sks",
                "class_prompt": "a fabric pattern",
                "prior_preservation": True,
                "prior_loss_weight": 1.0,
                "num_class_images": 2,
                "rank": 4,
                "alpha": 4.0,
                "learning_rate": 1e-2,
                "max_train_steps": steps,
                "seed": 1,
                "sample_every": 0,
                "output_name": output_name,
                "settings": ["2", 0],
            },
        },
    }


def sample_graph(prefix, text, lora=None, loader="LoraLoader"):
    g = {
        "10": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "12": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["11", 1] if lora else ["10", 1]}},
        "13": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["11", 1] if lora else ["10", 1]}},
        "14": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "15": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["11", 0] if lora else ["10", 0],
                "seed": 5,
                "steps": 1,
                "cfg": 7.5,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["12", 0],
                "negative": ["13", 0],
                "latent_image": ["14", 0],
                "denoise": 1.0,
            },
        },
        "16": {"class_type": "SaveLatent", "inputs": {"samples": ["15", 0], "filename_prefix": f"itest/{prefix}"}},
    }
    if lora:
        inputs = {"model": ["10", 0], "clip": ["10", 1], "lora_name": lora, "strength_model": 1.0, "strength_clip": 1.0}
        g["11"] = {"class_type": loader, "inputs": inputs}
    return g


def latent(server, prefix):
    files = sorted((server.base / "output" / "itest").glob(f"{prefix}_*.latent"))
    assert files, f"no latent saved for {prefix}"
    return load_file(str(files[-1]))["latent_tensor"]


def run_ok(server, graph, timeout=1200):
    entry = server.wait(server.queue_prompt(graph), timeout)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[-4000:]
    return entry


def test_pack_imports_and_lists_every_node(server):
    log = server.log_text()
    line = [ln for ln in log.splitlines() if "custom_nodes/dreamloom" in ln and "seconds" in ln]
    assert line and "IMPORT FAILED" not in line[0], log[-3000:]
    seconds = float(re.search(r"([\d.]+) seconds", line[0]).group(1))
    assert seconds < 0.1
    info = server.get("/object_info")
    assert set(OUR_NODES) <= set(info)
    assert info["DreamLoomTrainLoRA"]["category"].startswith("DreamLoom/")


def test_lora_training_graph_then_core_loraloader(server):
    entry = run_ok(server, lora_train_graph("itest_lora", 2, settings()))
    assert entry["outputs"]["3"]["images"], "training node shows its sample and loss plot"
    assert (server.base / "models" / "loras" / "itest_lora.safetensors").exists()
    before = server.log_text().count("lora key not loaded")
    run_ok(server, sample_graph("plain", "a sks african fabric pattern"))
    run_ok(server, sample_graph("with_lora", "a sks african fabric pattern", lora="itest_lora.safetensors"))
    assert server.log_text().count("lora key not loaded") == before == 0
    plain, with_lora = latent(server, "plain"), latent(server, "with_lora")
    assert not torch.equal(plain, with_lora)
    # Our own loader applies exactly the same patches as the core loader.
    run_ok(
        server,
        sample_graph("ours", "a sks african fabric pattern", lora="itest_lora.safetensors", loader="DreamLoomLoadLoRA"),
    )
    assert torch.allclose(latent(server, "ours"), with_lora, atol=1e-5)


def test_textual_inversion_embedding_changes_clip_encoding(server):
    graph = {
        "1": images_node(),
        "2": settings(),
        "3": {
            "class_type": "DreamLoomTrainTextualInversion",
            "inputs": {
                "ckpt_name": CKPT,
                "instance_images": ["1", 0],
                "placeholder_token": "<sks-fabric>",
                "initializer_token": "pattern",
                "learning_rate": 0.05,
                "max_train_steps": 2,
                "seed": 1,
                "sample_every": 0,
                "output_name": "itest_ti",
                "settings": ["2", 0],
            },
        },
    }
    run_ok(server, graph)
    assert (server.base / "models" / "embeddings" / "itest_ti.safetensors").exists()
    run_ok(server, sample_graph("ti", "a photo of embedding:itest_ti"))
    run_ok(server, sample_graph("init", "a photo of pattern"))
    run_ok(server, sample_graph("none", "a photo of"))
    assert "embedding:itest_ti does not exist" not in server.log_text()
    ti = latent(server, "ti")
    assert not torch.equal(ti, latent(server, "init")) and not torch.equal(ti, latent(server, "none"))


def test_interrupt_during_training(server):
    prompt_id = server.queue_prompt(lora_train_graph("itest_long", 400, settings(checkpoint_every=1)))
    runs = server.base / "output" / "dreamloom" / "runs"
    deadline = time.time() + 600
    while time.time() < deadline:
        run = next((p for p in runs.glob("itest_long-*")), None) if runs.exists() else None
        if run and (run / "events.jsonl").exists() and '"phase": "training"' in (run / "events.jsonl").read_text():
            break
        time.sleep(1)
    else:
        pytest.fail("training did not start")
    server.post("/interrupt")
    entry = server.wait(prompt_id, timeout=600)
    assert "execution_interrupted" in server.messages(entry)
    assert "execution_error" not in server.messages(entry)
    assert list((run / "checkpoints").glob("step_*")), "the interrupted run kept a checkpoint"
    assert server.get("/queue") is not None and "DreamLoomTrainLoRA" in server.get("/object_info")


def test_slerp_noise_with_sampler_custom_advanced_writes_looping_gif(server):
    from PIL import Image

    base = {
        "10": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "12": {"class_type": "CLIPTextEncode", "inputs": {"text": "a sks african fabric pattern", "clip": ["10", 1]}},
        "13": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["10", 1]}},
        "21": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "22": {
            "class_type": "BasicScheduler",
            "inputs": {"model": ["10", 0], "scheduler": "normal", "steps": 2, "denoise": 1.0},
        },
        "23": {
            "class_type": "CFGGuider",
            "inputs": {"model": ["10", 0], "positive": ["12", 0], "negative": ["13", 0], "cfg": 7.5},
        },
    }
    morph = dict(base)
    morph.update(
        {
            "20": {
                "class_type": "DreamLoomSlerpNoise",
                "inputs": {
                    "seeds": "1, 42, 100",
                    "frames_per_transition": 4,
                    "easing": "linear",
                    "hold_frames": 0,
                    "loop": True,
                    "width": 64,
                    "height": 64,
                },
            },
            "24": {
                "class_type": "SamplerCustomAdvanced",
                "inputs": {
                    "noise": ["20", 0],
                    "guider": ["23", 0],
                    "sampler": ["21", 0],
                    "sigmas": ["22", 0],
                    "latent_image": ["20", 1],
                },
            },
            "25": {"class_type": "VAEDecode", "inputs": {"samples": ["24", 0], "vae": ["10", 2]}},
            "26": {
                "class_type": "DreamLoomSaveAnimation",
                "inputs": {
                    "images": ["25", 0],
                    "fps": 12.0,
                    "format": "gif",
                    "loop": True,
                    "filename_prefix": "itest/morph",
                },
            },
            "27": {"class_type": "SaveLatent", "inputs": {"samples": ["24", 0], "filename_prefix": "itest/morphlat"}},
        }
    )
    entry = run_ok(server, morph)
    gif_info = entry["outputs"]["26"]["images"][0]
    gif = server.base / "output" / gif_info["subfolder"] / gif_info["filename"]
    with Image.open(gif) as im:
        assert im.n_frames == 12 and im.info["loop"] == 0
    single = dict(base)
    single.update(
        {
            "30": {"class_type": "RandomNoise", "inputs": {"noise_seed": 42}},
            "31": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "32": {
                "class_type": "SamplerCustomAdvanced",
                "inputs": {
                    "noise": ["30", 0],
                    "guider": ["23", 0],
                    "sampler": ["21", 0],
                    "sigmas": ["22", 0],
                    "latent_image": ["31", 0],
                },
            },
            "33": {"class_type": "SaveLatent", "inputs": {"samples": ["32", 0], "filename_prefix": "itest/single42"}},
        }
    )
    run_ok(server, single)
    render = dict(base)
    render.update(
        {
            "20": morph["20"],
            "40": {
                "class_type": "DreamLoomRenderMorph",
                "inputs": {
                    "model": ["10", 0],
                    "positive": ["12", 0],
                    "negative": ["13", 0],
                    "sampler": ["21", 0],
                    "sigmas": ["22", 0],
                    "cfg": 7.5,
                    "vae": ["10", 2],
                    "noise": ["20", 0],
                    "latent": ["20", 1],
                    "chunk_size": 5,
                },
            },
            "41": {
                "class_type": "DreamLoomSaveAnimation",
                "inputs": {
                    "images": ["40", 0],
                    "fps": 12.0,
                    "format": "webp",
                    "loop": True,
                    "filename_prefix": "itest/render",
                },
            },
        }
    )
    entry = run_ok(server, render)
    info = entry["outputs"]["41"]["images"][0]
    with Image.open(server.base / "output" / info["subfolder"] / info["filename"]) as im:
        # libwebp merges frames it sees as unchanged (random weights make near-identical frames) into
        # longer ones, so only animation is checked here; frame counts are checked in test_slerp.py.
        assert im.is_animated and im.n_frames >= 2
    # Frame 4 is keyframe 1 (seed 42): the same result as ComfyUI's own RandomNoise for seed 42.
    assert torch.allclose(latent(server, "morphlat")[4], latent(server, "single42")[0], atol=1e-4)


def concept_node(images, name, prompt, token, class_prompt, previous=None):
    inputs = {
        "images": [images, 0],
        "name": name,
        "instance_prompt": prompt,
        "token": token,
        "class_prompt": class_prompt,
        "num_class_images": 2,
        "repeats": 1,
        "prior_loss_weight": 1.0,
    }
    if previous:
        inputs["concepts"] = [previous, 0]
    return {"class_type": "DreamLoomAddConcept", "inputs": inputs}


def test_two_concepts_train_in_one_run(server):
    """Two Add Concept nodes (the fabric set and a landscape-shaped stripes set, each with its own token and class
    prompt) feed Train DreamBooth LoRA on the built-in tiny model; the run trains both, with their own class images."""
    import numpy as np
    from PIL import Image

    stripes = server.base / "input" / "itest_stripes"
    stripes.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        arr = np.full((64, 96, 3), 30, np.uint8)  # 3:2 landscape pictures: trained at their own bucket
        arr[(np.arange(64) // (3 + i)) % 2 == 0] = (200, 40, 40)
        Image.fromarray(arr).save(stripes / f"stripes_{i}.png")
    train = lora_train_graph("itest_concepts", 2, settings())["3"]
    inputs = {k: v for k, v in train["inputs"].items() if k != "instance_images"}
    inputs.update(ckpt_name="tiny (built-in test model)", concepts=["6", 0])
    graph = {
        "1": images_node(),
        "2": settings(),
        "4": images_node("itest_stripes"),
        "5": concept_node("1", "fabric", "a sks african fabric pattern", "sks", "a fabric pattern"),
        "6": concept_node("4", "stripes", "a zwx striped cloth", "zwx", "a striped cloth", previous="5"),
        "3": {"class_type": "DreamLoomTrainLoRA", "inputs": inputs},
    }
    run_ok(server, graph)
    assert (server.base / "models" / "loras" / "itest_concepts.safetensors").exists()
    run = next((server.base / "output" / "dreamloom" / "runs").glob("itest_concepts-*"))
    job = json.loads((run / "job.json").read_text())
    assert [c["token"] for c in job["config"]["concepts"]] == ["sks", "zwx"] and len(job["class_dirs"]) == 2
    log = (run / "events.jsonl").read_text()
    assert "concepts: 'fabric': 10 images x 1" in log and "'stripes': 3 images x 1" in log
    assert "80x48: 3 images" in log  # the 3:2 pictures keep (nearly) their shape: the 64 px model's 5:3 bucket
