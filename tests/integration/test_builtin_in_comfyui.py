"""The built-in tiny-fabric (and tiny) as ComfyUI's own MODEL, CLIP and VAE (nodes/comfy.py:load_builtin) computes
what our diffusers modules compute, and core LoRA patching maps every module of a tiny-fabric LoRA. Runs ComfyUI's
code in its own interpreter (COMFYUI_PATH, optional COMFYUI_PYTHON). tiny-sdxl: test_sdxl_in_comfyui.py."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from .comfy_server import comfyui_path, comfyui_python

pytestmark = pytest.mark.comfyui

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    comfy_root, pack_parent, pack_name = sys.argv[1:4]
    sys.path[:0] = [comfy_root, pack_parent]
    from comfy.cli_args import args
    args.cpu = True
    import importlib, torch
    pack = importlib.import_module(pack_name)
    C = importlib.import_module(pack_name + ".nodes.comfy")
    builtin = importlib.import_module(pack_name + ".trainer.base_models.builtin")
    comps = builtin.build_tiny_fabric()
    model, clip, vae = C.load_builtin(comps)
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 32, 32, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 64, generator=g)
    out = {}
    with torch.no_grad():
        ref = comps.unet(x, t, ctx).sample
        out["unet"] = (model.model.diffusion_model(x, timesteps=t, context=ctx) - ref).abs().max().item()
        text = "a sks african fabric pattern"
        cond = clip.encode_from_tokens(clip.tokenize(text))
        out["clip"] = (cond - comps.family.encode_prompts(comps, [text], "cpu")["hidden"]).abs().max().item()
        z = torch.randn(1, 4, 32, 32, generator=g)
        img = ((comps.vae.decode(z).sample + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
        decoded = vae.decode(z)
        out["vae_shape"] = list(decoded.shape)
        out["vae"] = (decoded - img).abs().max().item()
    out["latent_geometry"] = list(C.vae_latent_geometry(vae))
    out["embedding_widths"] = C.clip_embedding_widths(clip)
    # a kohya-named LoRA covering every attention and resnet projection of tiny-fabric's UNet and CLIP
    key_map = C.lora_key_map(model, clip)
    unet_keys = [k for k in key_map if k.startswith("lora_unet_")]
    out["unet_modules"] = len(set(key_map[k] for k in unet_keys))
    out["to_q_layers"] = sorted(set(str(key_map[k]) for k in unet_keys if k.endswith("attn1_to_q")))
    out["to_q_names"] = sorted(k for k in unet_keys if k.endswith("attn1_to_q"))
    # one of our embedding files, used in a prompt as embedding:<name>, encodes in ComfyUI exactly as the trainer's
    # own pipeline encodes its token (the TI workflow's grid is made the way its training samples were)
    import os, tempfile
    from safetensors.torch import save_file
    pipelines = importlib.import_module(pack_name + ".trainer.inference.pipelines")
    embeddings = importlib.import_module(pack_name + ".trainer.formats.embeddings")
    emb_dir = tempfile.mkdtemp()
    emb_path = os.path.join(emb_dir, "itest_emb.safetensors")
    save_file({"emb_params": torch.randn(1, 64, generator=g)}, emb_path)
    clip.tokenizer.clip_l.embedding_directory = emb_dir
    embeddings.load_embedding_into_pipeline(pipelines.make_pipeline(comps), emb_path, "<itest-emb>")
    with torch.no_grad():
        for context in ("a photo of {}", "a dress made of {} fabric"):
            theirs = clip.encode_from_tokens(clip.tokenize(context.format("embedding:itest_emb")))
            ours = comps.family.encode_prompts(comps, [context.format("<itest-emb>")], "cpu")["hidden"]
            plain = comps.family.encode_prompts(comps, [context.format("pattern")], "cpu")["hidden"]
            gaps = [(theirs - ours).abs().max().item(), (ours - plain).abs().max().item()]
            out.setdefault("embedding", []).append(gaps)
    # tiny: its VAE's first level has 16 channels, fewer than the 32 groups ComfyUI's VAE class builds by default
    tiny = builtin.build_tiny()
    t_model, t_clip, t_vae = C.load_builtin(tiny)
    with torch.no_grad():
        x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)
        ref = tiny.unet(x, t, ctx).sample
        out["tiny_unet"] = (t_model.model.diffusion_model(x, timesteps=t, context=ctx) - ref).abs().max().item()
        cond = t_clip.encode_from_tokens(t_clip.tokenize(text))
        out["tiny_clip"] = (cond - tiny.family.encode_prompts(tiny, [text], "cpu")["hidden"]).abs().max().item()
        z = torch.randn(1, 4, 8, 8, generator=g)
        img = ((tiny.vae.decode(z).sample + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
        decoded = t_vae.decode(z)
        out["tiny_vae_shape"] = list(decoded.shape)
        out["tiny_vae"] = (decoded - img).abs().max().item()
    print("RESULT " + json.dumps(out))
    """
)


def test_tiny_fabric_in_comfyuis_classes_matches_diffusers(tmp_path):
    comfy = comfyui_path()
    if comfy is None:
        pytest.skip("COMFYUI_PATH is not set to a ComfyUI checkout")
    (tmp_path / "pk").mkdir()
    (tmp_path / "pk" / "dreamloom_pack").symlink_to(ROOT, target_is_directory=True)
    r = subprocess.run(
        [comfyui_python(comfy), "-c", SCRIPT, str(comfy), str(tmp_path / "pk"), "dreamloom_pack"],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, r.stdout[-2000:] + r.stderr[-4000:]
    out = json.loads(line[len("RESULT ") :])
    assert out["unet"] < 1e-4 and out["clip"] < 1e-4 and out["vae"] < 1e-4, out
    assert out["vae_shape"] == [1, 128, 128, 3] and out["latent_geometry"] == [4, 4]
    assert out["embedding_widths"] == {"clip_l": 64}  # a tiny-fabric embedding is accepted, an SD1.5 one refused
    assert all(same < 1e-4 and moved > 0.1 for same, moved in out["embedding"]), out["embedding"]
    # tiny-fabric has attention at its 2 lower levels of 3 and in the middle: 2 down + 1 mid + 2 x 2 up = 7 blocks
    assert len(out["to_q_layers"]) == 7, out["to_q_layers"]
    # kohya's diffusers-style names (what our exporter writes) map for every one of them
    assert len([n for n in out["to_q_names"] if n.startswith(("lora_unet_down_blocks", "lora_unet_mid_block",
                                                               "lora_unet_up_blocks"))]) == 7  # fmt: skip
    assert out["tiny_unet"] < 1e-4 and out["tiny_clip"] < 1e-4 and out["tiny_vae"] < 1e-4, out
    assert out["tiny_vae_shape"] == [1, 64, 64, 3]  # 8x: 64 px, tiny's native size
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
