"""A full DreamBooth fine-tune of a full-size SD1.5 (random weights), exported as one file, loads through ComfyUI's
core checkpoint loader (comfy.sd.load_checkpoint_guess_config, what Load Checkpoint runs) as SD1.5 with no missing or
unexpected keys, and its UNet computes what our loader's diffusers UNet computes. Runs ComfyUI's code in its own
interpreter (COMFYUI_PATH, optional COMFYUI_PYTHON); needs about 11 GB of memory."""

from __future__ import annotations

import gc
import json
import subprocess
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from .comfy_server import comfyui_path, comfyui_python

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
