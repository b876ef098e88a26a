"""SDXL in ComfyUI's own classes, in ComfyUI's own interpreter (COMFYUI_PATH, optional COMFYUI_PYTHON).

* tiny-sdxl as ComfyUI's MODEL (model_base.SDXL: the adm vector from the pooled text embedding and the size ids),
  CLIP (SDXLClipModel: both encoders, penultimate layer, pooled) and VAE computes what our diffusers modules
  compute; a tiny-sdxl LoRA our trainer exported maps onto distinct layers through ComfyUI's key map and the patched
  MODEL and CLIP compute what diffusers computes with the LoRA loaded; our SDXL embedding loads with no shape
  warning and encodes as diffusers encodes its token; a LoRA or embedding of the other family is refused with both
  families named, on ComfyUI's real classes.
* The full-size SDXL: every module of a kohya SDXL LoRA as our exporter names it (the UNet's attention blocks, both
  text encoders) is mapped by comfy.lora.model_lora_keys_unet / model_lora_keys_clip, onto distinct layers of the
  right shapes. ComfyUI's SDXL model and CLIP are built on the meta device: shapes only, no 2.6 B weights.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from .comfy_server import comfyui_path, comfyui_python

pytestmark = pytest.mark.comfyui

ROOT = Path(__file__).resolve().parents[2]

PRELUDE = textwrap.dedent(
    """
    import json, logging, sys
    comfy_root, pack_parent, pack_name, arg = sys.argv[1:5]
    arg = json.loads(arg)
    sys.path[:0] = [comfy_root, pack_parent]
    from comfy.cli_args import args
    args.cpu = True
    import importlib, torch

    class Warnings(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.lines = []
        def emit(self, record):
            self.lines.append(record.getMessage())

    warnings = Warnings()
    logging.getLogger().addHandler(warnings)
    mod = lambda name: importlib.import_module(pack_name + "." + name)
    pack = importlib.import_module(pack_name)
    out = {}
    """
)

TINY_SCRIPT = PRELUDE + textwrap.dedent(
    """
    import os, folder_paths
    folder_paths.add_model_folder_path("embeddings", arg["embeddings"], is_default=True)
    C, builtin, loader = mod("nodes.comfy"), mod("trainer.base_models.builtin"), mod("nodes.loader")
    SDXL = mod("trainer.base_models.sdxl").SDXL
    load_embedding_into_pipeline = mod("trainer.formats.embeddings").load_embedding_into_pipeline
    DreamLoomError = mod("trainer.errors").DreamLoomError
    comps = builtin.build_tiny_sdxl()
    model, clip, vae = C.load_builtin(comps)
    out["model_class"], out["family"] = type(model.model).__mro__[1].__name__, C.model_family(model)
    out["embedding_widths"] = C.clip_embedding_widths(clip)
    out["latent_geometry"] = list(C.vae_latent_geometry(vae))
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 64, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    # diffusers' time ids: original (h, w), crop (top, left), target (h, w); ComfyUI's the same, by name
    size = dict(height=96, width=64, crop_h=0, crop_w=16, target_height=64, target_width=64)
    ids = torch.tensor([[96.0, 64.0, 0.0, 16.0, 64.0, 64.0]] * 2)
    prompt = "a sks african fabric pattern"

    def unet_diff(patcher, unet):
        y = patcher.model.encode_adm(pooled_output=pooled, **size)  # what ComfyUI's samplers pass as y
        got = patcher.model.diffusion_model(x, timesteps=t, context=ctx, y=y)
        want = unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        return (got - want).abs().max().item(), (got - unet(x, t, ctx, added_cond_kwargs={
            "text_embeds": pooled, "time_ids": ids * 2}).sample).abs().max().item()

    def clip_diff(comfy_clip, text, pipe, text_for_pipe=None):
        cond, pool = comfy_clip.encode_from_tokens(comfy_clip.tokenize(text), return_pooled=True)
        hidden, _, want_pool, _ = pipe.encode_prompt(text_for_pipe or text, device="cpu",
                                                     do_classifier_free_guidance=False)
        return [(cond - hidden).abs().max().item(), (pool - want_pool).abs().max().item()], cond, pool

    with torch.no_grad():
        out["adm_shape"] = list(model.model.encode_adm(pooled_output=pooled, **size).shape)
        out["unet"], out["unet_other_sizes"] = unet_diff(model, comps.unet)
        pipe = SDXL.pipeline(comps, comps.noise_scheduler())
        out["clip"], cond, pool = clip_diff(clip, prompt, pipe)
        out["cond_shape"], out["pooled_shape"] = list(cond.shape), list(pool.shape)
        z = torch.randn(1, 4, 8, 8, generator=g)
        img = ((comps.vae.decode(z).sample + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
        decoded = vae.decode(z)
        out["vae_shape"], out["vae"] = list(decoded.shape), (decoded - img).abs().max().item()

        # our SDXL embedding: no shape warning, encodes as diffusers encodes the token it was trained as
        name = arg["embedding_name"]
        path = os.path.join(arg["embeddings"], name + ".safetensors")
        before = len(warnings.lines)
        loader.check_embeddings(clip, [f"embedding:{name}"])
        fresh = builtin.build_tiny_sdxl()
        pipe_ti = SDXL.pipeline(fresh, fresh.noise_scheduler())
        load_embedding_into_pipeline(pipe_ti, path, arg["token"])
        text = "a pattern in the style of embedding:" + name
        out["embedding"], with_emb, with_pool = clip_diff(clip, text, pipe_ti,
                                                          "a pattern in the style of " + arg["token"])
        plain, plain_pool = clip.encode_from_tokens(clip.tokenize("a pattern in the style of"), return_pooled=True)
        out["embedding_changes"] = [(with_emb - plain).abs().max().item(), (with_pool - plain_pool).abs().max().item()]
        out["embedding_warnings"] = warnings.lines[before:]

    # a LoRA or an embedding of the other family, on ComfyUI's real classes: untagged (family from the classes) and
    # from Load Checkpoint (DreamLoom) (tagged)
    checkpoint = mod("nodes.checkpoint")
    node = loader.LoadDreamLoomLoRA()
    fabric_model, fabric_clip, _ = C.load_builtin(builtin.build_tiny_fabric())
    errors = {}
    for key, m, c, lora in (("sd15_on_sdxl", model, clip, arg["sd15_lora"]),
                            ("sdxl_on_sd15", fabric_model, fabric_clip, arg["lora"])):
        try:
            node.load(m, c, loader.LINKED, 1.0, 1.0, lora_path=lora)
        except DreamLoomError as err:
            errors[key] = str(err)
    for key, c, emb in (("sd15_emb_on_sdxl", clip, arg["sd15_embedding_name"]),
                        ("sdxl_emb_on_sd15", fabric_clip, name)):
        try:
            loader.check_embeddings(c, [f"embedding:{emb}"])
        except DreamLoomError as err:
            errors[key] = str(err)
    checkpoint.tag_models(model, clip, vae, "tiny-sdxl (built-in 64 px SDXL test model)", "tiny-sdxl")
    try:
        node.load(model, clip, loader.LINKED, 1.0, 1.0, lora_path=arg["sd15_lora"])
    except DreamLoomError as err:
        errors["sd15_on_tagged_sdxl"] = str(err)
    out["errors"] = errors

    # the tiny-sdxl LoRA: ComfyUI's key map takes every module, onto distinct layers; the node applies it with core
    # patching, and the patched MODEL and CLIP compute what diffusers computes with the same file loaded
    import comfy.lora, comfy.model_management, comfy.utils
    lora_sd = comfy.utils.load_torch_file(arg["lora"], safe_load=True)
    modules = sorted({k.split(".")[0] for k in lora_sd})
    key_map = C.lora_key_map(model, clip)
    out["lora_modules"] = len(modules)
    out["lora_unmapped"] = [m for m in modules if m not in key_map]
    out["lora_layers"] = len({str(key_map[m]) for m in modules if m in key_map})
    out["lora_prefixes"] = sorted({m.split("_")[1] for m in modules})
    before = len(warnings.lines)
    patches = comfy.lora.load_lora(lora_sd, key_map)
    out["lora_patches"] = len(patches)
    model_l, clip_l = node.load(model, clip, loader.LINKED, 1.0, 1.0, lora_path=arg["lora"])
    with torch.no_grad():
        fresh = builtin.build_tiny_sdxl()
        pipe_l = SDXL.pipeline(fresh, fresh.noise_scheduler())
        pipe_l.load_lora_weights(os.path.dirname(arg["lora"]), weight_name=os.path.basename(arg["lora"]))
        comfy.model_management.load_models_gpu([model_l])
        out["lora_unet"], _ = unet_diff(model_l, fresh.unet)
        out["lora_unet_moved"] = unet_diff(model_l, comps.unet)[0]  # vs the model without the LoRA
        out["lora_clip"], _, _ = clip_diff(clip_l, prompt, pipe_l)
        out["lora_clip_moved"], _, _ = clip_diff(clip_l, prompt, pipe)
    out["lora_warnings"] = warnings.lines[before:]
    print("RESULT " + json.dumps(out))
    """
)

FULL_SIZE_SCRIPT = PRELUDE + textwrap.dedent(
    """
    import comfy.lora, comfy.model_detection, comfy.sdxl_clip
    from types import SimpleNamespace
    ldm, lora_export = mod("trainer.formats.ldm_layout"), mod("trainer.formats.lora_export")
    SDXL = mod("trainer.base_models.sdxl").SDXL
    ASSETS = mod("trainer.base_models.components").ASSETS / "sdxl"
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    unet_config = json.loads((ASSETS / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(ASSETS / "text_encoder")))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(ASSETS / "text_encoder_2")))
    # ComfyUI's SDXL, as core Load Checkpoint would build it, from our LDM layout of the UNet (meta tensors)
    sd = {ldm.UNET_PREFIX + k: v for k, v in ldm.unet_to_ldm(unet.state_dict(), dict(unet.config)).items()}
    model_config = comfy.model_detection.model_config_from_unet(sd, ldm.UNET_PREFIX)
    out["model_config"] = type(model_config).__name__
    model = model_config.get_model(sd, ldm.UNET_PREFIX, device="meta")
    out["model_class"] = type(model).__name__
    comfy_unet_keys = {k for k in model.state_dict() if k.startswith("diffusion_model.")}
    out["unet_keys_equal"] = comfy_unet_keys == {"diffusion_model." + k[len(ldm.UNET_PREFIX):] for k in sd}
    with torch.device("meta"):
        clip = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip, key_map)
    shapes = {**{k: tuple(v.shape) for k, v in model.state_dict().items()},
              **{k: tuple(v.shape) for k, v in clip.state_dict().items()}}

    # a kohya SDXL LoRA as our exporter names it: rank-1 factors of each layer's real fan-in / fan-out
    def peft(module, names):
        sd = {}
        for n in names:
            layer = module.get_submodule(n)
            sd[n + ".lora_A.weight"] = torch.zeros(1, layer.in_features)
            sd[n + ".lora_B.weight"] = torch.zeros(layer.out_features, 1)
        return sd

    attention = ("to_q", "to_k", "to_v", "to_out.0")
    blocks = attention + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")  # every linear of the transformers
    unet_names = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(blocks)]
    text_names = [n for n, m in text.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))]
    text_2_names = [n for n, m in text_2.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))]
    comps = SimpleNamespace(family=SDXL, unet=unet)
    prefixes = SDXL.text_encoder_kohya_prefix
    lora = lora_export.kohya_state_dict(
        peft(unet, unet_names),
        {prefixes["text_encoder"]: peft(text, text_names), prefixes["text_encoder_2"]: peft(text_2, text_2_names)},
        alpha=1.0,
        unet_name=lora_export.kohya_unet_namer(comps),
    )
    modules = sorted({k.split(".")[0] for k in lora})
    out["modules"] = len(modules)
    out["unet_modules"] = len([m for m in modules if m.startswith("lora_unet_")])
    out["attention_modules"] = len([m for m in modules if m.startswith("lora_unet_") and any(
        m.endswith("_" + a.replace(".", "_")) for a in attention)])
    out["te1_modules"] = len([m for m in modules if m.startswith("lora_te1_")])
    out["te2_modules"] = len([m for m in modules if m.startswith("lora_te2_")])
    out["examples"] = [m for m in modules if m.endswith(("input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                                                         "layers_31_self_attn_out_proj"))]
    out["unmapped"] = [m for m in modules if m not in key_map]
    targets = [key_map[m] for m in modules if m in key_map]
    out["targets"] = len(targets)
    out["distinct_targets"] = len(set(targets))
    out["target_prefixes"] = sorted({t.split(".")[0] for t in targets})
    wrong = []
    for m in modules:
        if m in key_map:
            want = (lora[m + ".lora_up.weight"].shape[0], lora[m + ".lora_down.weight"].shape[1])
            if shapes[key_map[m]][:2] != want:
                wrong.append(f"{m}: {want} vs {shapes[key_map[m]]}")
    out["wrong_shapes"] = wrong[:10]
    # ComfyUI's own loader takes every key (it logs "lora key not loaded" for any it cannot)
    before = len(warnings.lines)
    patches = comfy.lora.load_lora(lora, key_map)
    out["patches"] = len(patches)
    out["warnings"] = warnings.lines[before:][:10]
    print("RESULT " + json.dumps(out))
    """
)


def _run_in_comfyui(script: str, tmp_path: Path, arg: dict) -> dict:
    comfy = comfyui_path()
    if comfy is None:
        pytest.skip("COMFYUI_PATH is not set to a ComfyUI checkout")
    (tmp_path / "pk").mkdir(exist_ok=True)
    link = tmp_path / "pk" / "dreamloom_pack"
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    start = time.monotonic()
    r = subprocess.run(
        [comfyui_python(comfy), "-c", script, str(comfy), str(tmp_path / "pk"), "dreamloom_pack", json.dumps(arg)],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    print(f"\nComfyUI script: {time.monotonic() - start:.1f} s")
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, r.stdout[-2000:] + r.stderr[-4000:]
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fabric_dir):
    """What our trainer writes for tiny-sdxl (a LoRA with both text encoders, a 2-vector embedding) and, for the
    mismatch checks, an SD1.5-family LoRA and embedding (tiny)."""
    import shutil

    from conftest import tiny_config

    from trainer.training.loop import Trainer

    root = tmp_path_factory.mktemp("sdxl_trained")
    start = time.monotonic()

    def run(name, **cfg):
        return Trainer(tiny_config(fabric_dir, **cfg), root / name).run().outputs

    common = dict(max_train_steps=2, with_prior_preservation=False, learning_rate=5e-2)
    lora = run("lora", base_model="tiny-sdxl", train_text_encoder=True, **common)
    ti = run("ti", base_model="tiny-sdxl", method="ti", placeholder_token="<sks>", num_vectors=2, **common)
    sd15_lora = run("sd15_lora", base_model="tiny", **common)
    sd15_ti = run("sd15_ti", base_model="tiny", method="ti", placeholder_token="<t15>", **common)
    embeddings = root / "embeddings"
    embeddings.mkdir()
    shutil.copy(ti["embedding"], embeddings / "sks_xl.safetensors")
    shutil.copy(sd15_ti["embedding"], embeddings / "sks_15.safetensors")
    print(f"\ntraining the tiny-sdxl and tiny files: {time.monotonic() - start:.1f} s")
    return {
        "lora": lora["lora"],
        "sd15_lora": sd15_lora["lora"],
        "embeddings": str(embeddings),
        "embedding_name": "sks_xl",
        "sd15_embedding_name": "sks_15",
        "token": "<sks>",
    }


def test_tiny_sdxl_in_comfyuis_classes_matches_diffusers_with_lora_and_embedding(trained, tmp_path):
    out = _run_in_comfyui(TINY_SCRIPT, tmp_path, trained)
    # ComfyUI's SDXL classes
    assert out["model_class"] == "SDXL" and out["family"] == "SDXL", out
    assert out["embedding_widths"] == {"clip_l": 32, "clip_g": 32}  # SDXL's two keys, at tiny-sdxl's widths
    assert out["latent_geometry"] == [8, 4] and out["vae_shape"] == [1, 64, 64, 3]
    # adm: 32-wide pooled + 6 size ids x 8; the text: CLIP-L's and OpenCLIP-G's penultimate states side by side
    assert out["adm_shape"] == [2, 80] and out["cond_shape"] == [1, 77, 64] and out["pooled_shape"] == [1, 32]
    assert out["unet"] < 1e-4 and max(out["clip"]) < 1e-4 and out["vae"] < 1e-4, out
    assert out["unet_other_sizes"] > 1e-3, "the size ids must reach the UNet"
    # our embedding: no warning, the same conditioning as diffusers with the token, and not the plain prompt's
    assert out["embedding_warnings"] == [], out["embedding_warnings"]
    assert max(out["embedding"]) < 1e-4, out["embedding"]
    assert min(out["embedding_changes"]) > 1e-3, out["embedding_changes"]
    # our LoRA: every module mapped, each onto its own layer; both text encoders and the UNet
    assert out["lora_prefixes"] == ["te1", "te2", "unet"], out["lora_prefixes"]
    assert out["lora_unmapped"] == [] and out["lora_layers"] == out["lora_modules"] == out["lora_patches"], out
    assert out["lora_warnings"] == [], out["lora_warnings"]
    assert out["lora_unet"] < 1e-4 and max(out["lora_clip"]) < 1e-4, out
    assert out["lora_unet_moved"] > 1e-4 and max(out["lora_clip_moved"]) > 1e-4, out
    # the other family, refused naming both, whether the model comes from our loader or not
    errors = out["errors"]
    assert set(errors) == {"sd15_on_sdxl", "sdxl_on_sd15", "sd15_emb_on_sdxl", "sdxl_emb_on_sd15",
                           "sd15_on_tagged_sdxl"}, errors  # fmt: skip
    assert "trained on SD1.5 (tiny), applied to SDXL (the connected model)" in errors["sd15_on_sdxl"]
    assert "trained on SD1.5 (tiny), applied to SDXL (tiny-sdxl)" in errors["sd15_on_tagged_sdxl"]
    assert "trained on SDXL (tiny-sdxl), applied to SD1.5 (the connected model)" in errors["sdxl_on_sd15"]
    assert "embedding:sks_15 was trained on SD1.5 (tiny), applied to SDXL" in errors["sd15_emb_on_sdxl"]
    assert "embedding:sks_xl was trained on SDXL (tiny-sdxl), applied to SD1.5" in errors["sdxl_emb_on_sd15"]


def test_comfyui_maps_every_module_of_a_full_size_sdxl_lora(tmp_path):
    out = _run_in_comfyui(FULL_SIZE_SCRIPT, tmp_path, {})
    assert (out["model_config"], out["model_class"]) == ("SDXL", "SDXL") and out["unet_keys_equal"], out
    # SDXL base: 70 transformer blocks x (2 attentions x q/k/v/out + 2 feed-forward) + 11 x proj_in/out = 722;
    # CLIP-L 12 layers and OpenCLIP-G 32 layers x q/k/v/out
    assert (out["unet_modules"], out["attention_modules"]) == (722, 560), out
    assert (out["te1_modules"], out["te2_modules"]) == (48, 128), out
    assert out["modules"] == 722 + 48 + 128
    assert out["examples"] == [
        "lora_te2_text_model_encoder_layers_31_self_attn_out_proj",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    ]
    assert out["unmapped"] == [], out["unmapped"][:20]
    assert out["targets"] == out["distinct_targets"] == out["modules"] == out["patches"], out
    assert out["target_prefixes"] == ["clip_g", "clip_l", "diffusion_model"], out["target_prefixes"]
    assert out["wrong_shapes"] == [] and out["warnings"] == [], out
