"""A full DreamBooth fine-tune of a full-size SD1.5 (random weights), exported as one file, loads through ComfyUI's
core checkpoint loader (comfy.sd.load_checkpoint_guess_config, what Load Checkpoint runs) as SD1.5 with no missing or
unexpected keys, and its UNet computes what our loader's diffusers UNet computes (about 11 GB of memory). And the
shipped dreambooth_full_finetune workflow, made short, runs in a real ComfyUI: the checkpoint appears in the
checkpoints folder and samples. Runs ComfyUI's code in its own interpreter (COMFYUI_PATH, optional COMFYUI_PYTHON)."""

from __future__ import annotations

import gc
import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from .comfy_server import ComfyServer, comfyui_path, comfyui_python

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

SCRIPT = textwrap.dedent(
    """
    import json, logging, sys
    comfy_root, ckpt, probe = sys.argv[1:4]
    sys.path[:0] = [comfy_root]
    from comfy.cli_args import args
    args.cpu = True
    messages = []

    class Keep(logging.Handler):  # ComfyUI warns about missing or unexpected keys; what it expects is debug
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                messages.append(record.getMessage())

    logging.getLogger().addHandler(Keep())
    logging.getLogger().setLevel(logging.DEBUG)
    import comfy.sd, torch
    from safetensors.torch import load_file
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)[:3]
    p = load_file(probe)
    with torch.no_grad():
        unet = model.model.diffusion_model
        out = unet(p["x"].to(unet.dtype), timesteps=p["t"], context=p["ctx"].to(unet.dtype)).float()
    problems = [m for m in messages if any(w in m for w in (
        "unet missing", "unet unexpected", "clip missing", "clip unexpected", "Missing VAE", "not a checkpoint"))]
    print("RESULT " + json.dumps({
        "model_config": type(model.model.model_config).__name__,
        "problems": [m[:300] for m in problems],
        "unet": (out - p["ref"]).abs().max().item(),
        "scale": p["ref"].abs().max().item(),
        "clip": clip is not None, "vae": vae is not None,
    }))
    """
)


def test_core_checkpoint_loader_loads_the_full_fine_tune_with_every_key(sd15_checkpoint, tmp_path):
    comfy = comfyui_path()
    if comfy is None:
        pytest.skip("COMFYUI_PATH is not set to a ComfyUI checkout")
    from helpers.full_finetune import finetune_sd15
    from trainer.base_models.load import load_base_model

    path, tuned = finetune_sd15(sd15_checkpoint, tmp_path / "result")
    del tuned
    gc.collect()
    ours = load_base_model(str(path))  # the reference: our loader's diffusers UNet of the written file
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        ref = ours.unet(x, t, ctx).sample
    del ours
    gc.collect()
    probe = tmp_path / "probe.safetensors"
    save_file({"x": x, "t": t, "ctx": ctx, "ref": ref}, str(probe))
    r = subprocess.run(
        [comfyui_python(comfy), "-c", SCRIPT, str(comfy), str(path), str(probe)],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, r.stdout[-2000:] + r.stderr[-4000:]
    out = json.loads(line[len("RESULT ") :])
    assert out["model_config"] == "SD15" and out["clip"] and out["vae"], out
    assert out["problems"] == [], out["problems"]
    assert out["unet"] < 1e-4 * max(out["scale"], 1.0), out


def test_workflow_trains_publishes_and_samples_the_checkpoint(tmp_path):
    if comfyui_path() is None:
        pytest.skip("COMFYUI_PATH is not set to a ComfyUI checkout")
    from PIL import Image

    root = Path(__file__).resolve().parents[2]
    api = json.loads((root / "tests" / "workflows" / "dreambooth_full_finetune.api.json").read_text())
    for node in api.values():  # short: 2 class images, 2 steps, 2 sampling steps
        ct, i = node["class_type"], node["inputs"]
        if ct == "DreamLoomGenerateClassImages":
            i.update(count=2, steps=2)
        elif ct == "DreamLoomTrainFull":
            i.update(max_train_steps=2, num_class_images=2, sample_every=0, learning_rate=1e-4)
        elif ct == "KSampler":
            i["steps"] = 2
    server = ComfyServer(tmp_path / "comfy").start()
    try:
        checkpoints = server.base / "models" / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        (checkpoints / "sks_fabric_full.safetensors").write_bytes(b"not ours")  # never overwritten
        entry = server.wait(server.queue_prompt(api), timeout=1800)
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]
        (train_id,) = [k for k, n in api.items() if n["class_type"] == "DreamLoomTrainFull"]
        assert (checkpoints / "sks_fabric_full.safetensors").read_bytes() == b"not ours"
        assert (checkpoints / "sks_fabric_full_v2.safetensors").stat().st_size > 1_000_000
        listed = server.get("/object_info/CheckpointLoaderSimple")["CheckpointLoaderSimple"]["input"]["required"]
        assert "sks_fabric_full_v2.safetensors" in listed["ckpt_name"][0]  # in core Load Checkpoint's list
        (save_id,) = [k for k, n in api.items() if n["class_type"] == "SaveImage"]
        (image,) = entry["outputs"][save_id]["images"]
        with Image.open(server.base / "output" / image["subfolder"] / image["filename"]) as picture:
            assert picture.size == (128, 128)  # tiny-fabric's native size, sampled from the fine-tuned checkpoint
        assert train_id in entry["outputs"]  # the training node's previews reached the editor
    finally:
        server.stop()
