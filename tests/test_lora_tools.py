"""Extract, merge and resize LoRAs (trainer/formats/lora_tools.py) on the tiny models written as single files."""

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trainer.errors import DreamLoomError
from trainer.formats.lora_tools import checkpoint_layout, extract_lora, merge_loras, resize_lora

SD15_META = {"ss_base_model_version": "sd_v1"}
SDXL_META = {"ss_base_model_version": "sdxl_base_v1-0"}


def _state(module) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """The tiny SD1.5 and tiny SDXL models as fp32 single-file checkpoints (original layout)."""
    from trainer.base_models.builtin import build_tiny, build_tiny_sdxl
    from trainer.formats.ldm_layout import write_ldm_checkpoint, write_sdxl_checkpoint

    folder = tmp_path_factory.mktemp("tiny_ckpt")
    sd15, sdxl = build_tiny(), build_tiny_sdxl()
    write_ldm_checkpoint(
        folder / "tiny.safetensors",
        _state(sd15.unet),
        _state(sd15.vae),
        _state(sd15.text_encoder),
        dict(sd15.unet.config),
        dict(sd15.vae.config),
    )
    write_sdxl_checkpoint(
        folder / "tiny_sdxl.safetensors",
        _state(sdxl.unet),
        _state(sdxl.vae),
        _state(sdxl.text_encoder),
        _state(sdxl.text_encoder_2),
        dict(sdxl.unet.config),
        dict(sdxl.vae.config),
    )
    return {"sd15": folder / "tiny.safetensors", "sdxl": folder / "tiny_sdxl.safetensors"}


def _rows(target):
    return slice(*target.rows) if target.rows else slice(None)


def _tuned_copy(base, out, deltas: dict) -> None:
    """`base` with deltas added to the layers named by kohya module name (SDXL's q/k/v into their rows)."""
    layout = checkpoint_layout(base)
    sd = load_file(str(base))
    for name, delta in deltas.items():
        target = layout.targets[name]
        sd[target.key][_rows(target)] += delta.reshape(target.shape).to(sd[target.key].dtype)
    save_file(sd, str(out))


def _random_lora(layout, names, rank, alpha, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in names:
        shape = layout.targets[name].shape
        down_shape = (rank, *shape[1:]) if len(shape) == 4 else (rank, shape[1])
        up_shape = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
        tensors[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=g) * 0.1
        tensors[f"{name}.lora_up.weight"] = torch.randn(up_shape, generator=g) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    return tensors


def _lora_deltas(path) -> dict:
    """{module: alpha / rank * up @ down as a [out, in*k*k] matrix} of a kohya file."""
    sd = load_file(str(path))
    out = {}
    for key in sd:
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            down, up = sd[key].float(), sd[f"{name}.lora_up.weight"].float()
            scale = float(sd[f"{name}.alpha"]) / down.shape[0]
            out[name] = scale * up.flatten(1) @ down.flatten(1)
    return out


def _metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_unet_layout_from_key_names_matches_the_configs():
    """The LDM numbering read from key names alone gives every UNet key the same diffusers name as the real
    config: tiny, tiny-sdxl, full-size SD1.5 and SDXL (built on the meta device)."""
    from diffusers import UNet2DConditionModel

    from trainer.base_models.builtin import TINY_SDXL_UNET, TINY_UNET
    from trainer.base_models.components import ASSETS
    from trainer.formats.ldm_layout import ldm_key_to_unet, ldm_unet_layout, unet_to_ldm

    configs = [UNet2DConditionModel.load_config(str(ASSETS / name / "unet")) for name in ("sd15", "sdxl")]
    for config in [TINY_UNET, TINY_SDXL_UNET, *configs]:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        config = dict(unet.config)
        ldm = unet_to_ldm(unet.state_dict(), config)
        found = ldm_unet_layout(ldm)
        assert {ldm_key_to_unet(k, found) for k in ldm} == set(unet.state_dict())


def test_full_size_layouts_name_every_lora_layer_as_kohya_and_comfyui_do():
    """Every Linear/Conv of full-size SD1.5's and SDXL's UNet and every text-encoder layer kohya trains has a
    layer in the single file (SDXL's q/k/v as row bands of OpenCLIP's in_proj), from headers built on meta."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from helpers.sd15_layout import sd15_kohya_unet_modules
    from helpers.sdxl_layout import sdxl_configs, sdxl_kohya_unet_modules, sdxl_meta_models
    from trainer.base_models.components import text_model_path
    from trainer.base_models.sd15 import SD15_CONFIG_DIR
    from trainer.formats.ldm_layout import to_ldm_state_dict, to_sdxl_ldm_state_dict

    def header(sd):
        return {k: {"shape": list(v.shape), "dtype": "F16", "data_offsets": [0, 0]} for k, v in sd.items()}

    def text_modules(prefix, model):
        return {
            prefix + text_model_path(n).replace(".", "_")
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n
        }

    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(SD15_CONFIG_DIR / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(SD15_CONFIG_DIR / "vae")))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(str(SD15_CONFIG_DIR / "text_encoder")))
    sd = to_ldm_state_dict(unet.state_dict(), vae.state_dict(), te.state_dict(), dict(unet.config), dict(vae.config))
    layout = checkpoint_layout("sd15.safetensors", header(sd))
    wanted = sd15_kohya_unet_modules() | text_modules("lora_te_", te)
    assert len(wanted) == 282 + 72 and wanted == set(layout.targets)
    assert sum(t.attention for t in layout.targets.values()) == 128 + 48

    cfg = sdxl_configs()
    models = sdxl_meta_models(cfg)
    parts = {name: models[name].state_dict() for name in ("unet", "vae", "text", "text_2")}
    sd = to_sdxl_ldm_state_dict(
        parts["unet"], parts["vae"], parts["text"], parts["text_2"], cfg["unet"], cfg["vae"], None
    )
    layout = checkpoint_layout("sdxl.safetensors", header(sd))
    wanted = (
        sdxl_kohya_unet_modules()
        | text_modules("lora_te1_", models["text"])
        | text_modules("lora_te2_", models["text_2"])
    )
    assert wanted == set(layout.targets)
    assert layout.targets["lora_te2_text_model_encoder_layers_3_self_attn_v_proj"].rows == (2560, 3840)
    assert sum(t.part == "UNet" and t.attention for t in layout.targets.values()) == 560  # ComfyUI's 722 = all


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_extraction_at_full_rank_reproduces_the_difference(tiny_files, tmp_path, family):
    base = tiny_files[family]
    layout = checkpoint_layout(base)
    g = torch.Generator().manual_seed(1)
    names = sorted(layout.targets)[::3]  # UNet convs (3x3 and 1x1), linears, text layers (SDXL: q/k/v bands)
    deltas = {n: torch.randn(layout.targets[n].shape, generator=g) * 0.01 for n in names}
    _tuned_copy(base, tmp_path / "tuned.safetensors", deltas)
    report = extract_lora(
        base, tmp_path / "tuned.safetensors", tmp_path / "full.safetensors", 4096, modules="all", precision="fp32"
    )
    got = _lora_deltas(tmp_path / "full.safetensors")
    assert set(got) == set(names) and len(report.skipped) == len(layout.targets) - len(names)
    for name, delta in deltas.items():
        torch.testing.assert_close(got[name], delta.flatten(1), atol=1e-4, rtol=0)
    assert report.kept == pytest.approx(1.0, abs=1e-6)
    assert any("keep their full rank" in note for note in report.notes)


def test_extraction_at_rank_r_keeps_the_share_it_reports(tiny_files, tmp_path):
    base = tiny_files["sd15"]
    layout = checkpoint_layout(base)
    g = torch.Generator().manual_seed(2)
    names = [n for n, t in layout.targets.items() if t.attention]
    deltas = {n: torch.randn(layout.targets[n].shape, generator=g) * 0.01 for n in names}
    _tuned_copy(base, tmp_path / "tuned.safetensors", deltas)
    out = tmp_path / "r4.safetensors"
    report = extract_lora(base, tmp_path / "tuned.safetensors", out, 4, precision="fp32")
    got = _lora_deltas(out)
    shares = {m.name: m.kept for m in report.modules}
    kept_total = total = 0.0
    for name, delta in deltas.items():
        matrix = delta.flatten(1).double()
        kept = got[name].double().square().sum() / matrix.square().sum()  # ||dW_r||^2 / ||dW||^2, from the file
        assert shares[name] == pytest.approx(float(kept), abs=1e-5)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)  # the best rank-4 approximation (Eckart-Young)
        torch.testing.assert_close(got[name].double(), (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5, rtol=0)
        kept_total += float(got[name].double().square().sum())
        total += float(matrix.square().sum())
    assert 0.1 < report.kept < 0.99 and report.kept == pytest.approx(kept_total / total, abs=1e-5)
    meta = _metadata(out)
    assert float(meta["dreamloom.kept_share"]) == pytest.approx(report.kept, abs=1e-5)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_dim"] == "4"
    assert report.coverage == pytest.approx(1.0)  # only attention layers changed


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_merge_then_extract_round_trips(tiny_files, tmp_path, family):
    """A rank-3 LoRA (alpha 1.5: scale 0.5) merged at strength 0.8 and extracted at rank 3 gives back its delta."""
    base = tiny_files[family]
    layout = checkpoint_layout(base)
    names = [n for n, t in layout.targets.items() if t.attention]
    assert any(n.startswith("lora_te2_") for n in names) == (family == "sdxl")
    lora = tmp_path / "lora.safetensors"
    save_file(_random_lora(layout, names, 3, 1.5), str(lora), SD15_META if family == "sd15" else SDXL_META)
    merged = tmp_path / "merged.safetensors"
    report = merge_loras(base, [(lora, 0.8)], merged)
    assert f"{len(names)} modules" in report.summary()
    extract_lora(base, merged, tmp_path / "back.safetensors", 3, precision="fp32")
    want, got = _lora_deltas(lora), _lora_deltas(tmp_path / "back.safetensors")
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], 0.8 * want[name], atol=1e-4, rtol=0)
    base_sd, merged_sd = load_file(str(base)), load_file(str(merged))
    assert set(base_sd) == set(merged_sd) and all(merged_sd[k].dtype == base_sd[k].dtype for k in base_sd)
    assert "lora.safetensors" in _metadata(merged)["dreamloom.merged_loras"]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_generate_fuses_loras_as_merge_loras_writes_them(tiny_files, tmp_path, family):
    """Two kohya files through `generate`'s loading path (--lora FILE:0.7 --lora FILE at --lora-scale 0.4) change the
    model's UNet and text encoders as merge_loras changes the checkpoint file, and only the layers they name. The
    first trains the text encoders' q/k/v but not out_proj, as many trainers do: diffusers' kohya loader refused such
    a file ("could not automatically infer state dict type")."""
    from trainer.base_models.components import match_text_model_level
    from trainer.cli import build_parser
    from trainer.cli.checks import check_adapter_args
    from trainer.cli.commands import pipeline_with_adapters
    from trainer.formats.ldm_layout import from_sdxl_ldm_state_dict, split_ldm_state_dict, unet_from_ldm

    base = tiny_files[family]
    layout = checkpoint_layout(base)
    names = [n for n, t in layout.targets.items() if t.attention and not n.endswith("out_proj")]
    assert any(n.startswith("lora_te") for n in names)
    meta = SD15_META if family == "sd15" else SDXL_META
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    save_file(_random_lora(layout, names, 2, 4.0, seed=5), str(first), meta)
    unet_half = [n for n in names if n.startswith("lora_unet_")][::2]  # the UNet only, half its layers
    save_file(_random_lora(layout, unet_half, 4, 2.0, seed=6), str(second), meta)
    merged = tmp_path / "merged.safetensors"
    merge_loras(base, [(first, 0.7), (second, 0.4)], merged)

    builtin = {"sd15": "tiny", "sdxl": "tiny-sdxl"}[family]
    argv = ["generate", "--base-model", builtin, "--lora", f"{first}:0.7", "--lora", str(second), "--lora-scale", "0.4"]
    args = build_parser().parse_args(argv)
    check_adapter_args(args)
    comps, _ = pipeline_with_adapters(args)
    if family == "sd15":
        parts = split_ldm_state_dict(load_file(str(merged)))
        want = {"unet": unet_from_ldm(parts["unet"], dict(comps.unet.config)), "text_encoder": parts["text"]}
        base_parts = split_ldm_state_dict(load_file(str(base)))
        before = {
            "unet": unet_from_ldm(base_parts["unet"], dict(comps.unet.config)),
            "text_encoder": base_parts["text"],
        }
    else:
        configs = dict(comps.unet.config), dict(comps.vae.config)
        parts, base_parts = (from_sdxl_ldm_state_dict(load_file(str(f)), *configs) for f in (merged, base))
        want = {"unet": parts["unet"], "text_encoder": parts["text"], "text_encoder_2": parts["text_2"]}
        before = {
            "unet": base_parts["unet"],
            "text_encoder": base_parts["text"],
            "text_encoder_2": base_parts["text_2"],
        }
    changed = 0
    for component, expected in want.items():
        model = getattr(comps, component)
        expected = match_text_model_level(expected, model) if component != "unet" else expected
        original = match_text_model_level(before[component], model) if component != "unet" else before[component]
        got = model.state_dict()
        for key, value in got.items():
            if key in expected:
                torch.testing.assert_close(value, expected[key].to(value.dtype), atol=1e-5, rtol=0)
                changed += not torch.equal(expected[key], original[key])
    assert changed == len(names)  # every module of the first file (the second's are a subset), nothing else


def test_fused_lora_equals_diffusers_load_lora_weights_and_fuse_lora(tiny_files, tmp_path):
    """Our fusing applies a kohya file (UNet and text encoder) at strength 0.6 as diffusers' own loader does."""
    from trainer.base_models.builtin import build_tiny
    from trainer.formats.lora_fuse import fuse_lora
    from trainer.inference.pipelines import make_pipeline

    layout = checkpoint_layout(tiny_files["sd15"])
    names = [n for n, t in layout.targets.items() if t.attention]
    lora = tmp_path / "style.safetensors"
    save_file(_random_lora(layout, names, 3, 1.5, seed=7), str(lora), SD15_META)
    ours = build_tiny()
    assert fuse_lora(ours, lora, 0.6) == len(names)
    pipe = make_pipeline(build_tiny())
    pipe.load_lora_weights(str(tmp_path), weight_name=lora.name, adapter_name="style")
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=0.6, adapter_names=["style"])
    pipe.unload_lora_weights()
    for component in ("unet", "text_encoder"):
        theirs = getattr(pipe, component).state_dict()
        for key, value in getattr(ours, component).state_dict().items():
            torch.testing.assert_close(value, theirs[key], atol=1e-5, rtol=0)


def test_generate_refuses_a_lora_with_layers_the_model_lacks_and_changes_nothing(tiny_files, tmp_path):
    """A module name the model has no layer for is named (never dropped), before any LoRA is fused."""
    from trainer.base_models.builtin import build_tiny
    from trainer.formats.lora_fuse import fuse_lora

    layout = checkpoint_layout(tiny_files["sd15"])
    names = [n for n, t in layout.targets.items() if t.attention][:3]
    tensors = _random_lora(layout, names, 2, 2.0)
    odd = "lora_unet_down_blocks_9_attentions_0_proj_in"  # the tiny UNet has 2 down blocks
    tensors.update({k.replace(names[0], odd): v.clone() for k, v in tensors.items() if k.startswith(names[0])})
    lora = tmp_path / "odd.safetensors"
    save_file(tensors, str(lora), SD15_META)
    comps = build_tiny()
    before = {k: v.clone() for k, v in comps.unet.state_dict().items()}
    with pytest.raises(DreamLoomError, match=r"odd.safetensors does not fit the base model tiny: 1 of its 4 modules"):
        fuse_lora(comps, lora, 1.0)
    assert all(torch.equal(v, before[k]) for k, v in comps.unet.state_dict().items())


def test_resize_keeps_the_share_it_reports_and_the_scale(tiny_files, tmp_path):
    layout = checkpoint_layout(tiny_files["sd15"])
    names = [n for n, t in layout.targets.items() if t.attention][:12]
    lora = tmp_path / "r8.safetensors"
    save_file(_random_lora(layout, names, 8, 4.0, seed=3), str(lora), SD15_META)
    want = _lora_deltas(lora)

    same = resize_lora(lora, tmp_path / "same.safetensors", 8)
    for name, delta in _lora_deltas(tmp_path / "same.safetensors").items():
        torch.testing.assert_close(delta, want[name], atol=1e-5, rtol=0)
    assert same.kept == pytest.approx(1.0, abs=1e-6)

    report = resize_lora(lora, tmp_path / "r3.safetensors", 3)
    sd = load_file(str(tmp_path / "r3.safetensors"))
    got = _lora_deltas(tmp_path / "r3.safetensors")
    for m in report.modules:
        w = want[m.name].double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        torch.testing.assert_close(got[m.name].double(), (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5, rtol=0)
        assert m.kept == pytest.approx(float(got[m.name].double().square().sum() / w.square().sum()), abs=1e-5)
        assert float(sd[f"{m.name}.alpha"]) / 3 == pytest.approx(4.0 / 8)  # the scale alpha/rank is kept
    assert 0.2 < report.kept < 0.99
    assert _metadata(tmp_path / "r3.safetensors")["ss_network_dim"] == "3"

    dynamic = resize_lora(lora, tmp_path / "dyn.safetensors", 8, keep_share=0.8)
    for m in dynamic.modules:  # the lowest rank that keeps 80%: one less would not
        energy = torch.linalg.svdvals(want[m.name].double()).square()
        shares = energy.cumsum(0) / energy.sum()
        assert m.kept >= 0.8 - 1e-9 and (m.rank == 1 or shares[m.rank - 2] < 0.8)
    assert (
        len({m.rank for m in dynamic.modules}) > 1
        and _metadata(tmp_path / "dyn.safetensors")["ss_network_dim"] == "Dynamic"
    )


def test_wrong_family_unmapped_and_misfit_loras_are_refused(tiny_files, tmp_path):
    sd15, sdxl = tiny_files["sd15"], tiny_files["sdxl"]
    layout = checkpoint_layout(sd15)
    names = [n for n, t in layout.targets.items() if t.attention][:4]
    lora = tmp_path / "sd15_lora.safetensors"
    save_file(_random_lora(layout, names, 2, 2.0), str(lora), SD15_META)
    with pytest.raises(DreamLoomError, match=r"made for SD1\.5; the checkpoint tiny_sdxl\.safetensors is .*SDXL"):
        merge_loras(sdxl, [(lora, 1.0)], tmp_path / "x.safetensors")

    extra = _random_lora(layout, names, 2, 2.0)
    extra["lora_unet_no_such_block_to_q.lora_down.weight"] = torch.zeros(2, 64)
    extra["lora_unet_no_such_block_to_q.lora_up.weight"] = torch.zeros(64, 2)
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(DreamLoomError, match=r"1 of 5 modules .* no layer .*lora_unet_no_such_block_to_q"):
        merge_loras(sd15, [(tmp_path / "extra.safetensors", 1.0)], tmp_path / "x.safetensors")

    wide = _random_lora(layout, names, 2, 2.0)
    wide[f"{names[0]}.lora_down.weight"] = torch.zeros(2, 99)
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(DreamLoomError, match=r"do not fit.*LoRA 99->"):
        merge_loras(sd15, [(tmp_path / "wide.safetensors", 1.0)], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()

    with pytest.raises(DreamLoomError, match=r"The base tiny\.safetensors is .*, the fine-tune tiny_sdxl"):
        extract_lora(sd15, sdxl, tmp_path / "x.safetensors", 4)
    with pytest.raises(DreamLoomError, match="does not differ"):
        extract_lora(sd15, sd15, tmp_path / "x.safetensors", 4)
    with pytest.raises(DreamLoomError, match="already exists"):
        resize_lora(lora, lora.with_name("wide.safetensors"), 1)
    with pytest.raises(DreamLoomError, match="Invalid rank"):
        resize_lora(lora, tmp_path / "y.safetensors", 0)
    save_file({"model.diffusion_model.x.weight": torch.zeros(1)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(DreamLoomError, match="LoRA tools read SD1.5 and SDXL"):
        merge_loras(tmp_path / "odd.safetensors", [(lora, 1.0)], tmp_path / "x.safetensors")


def test_cli_extract_merge_resize_end_to_end(tiny_files, tmp_path, capsys):
    from trainer.cli import main

    base = tiny_files["sd15"]
    layout = checkpoint_layout(base)
    names = [n for n, t in layout.targets.items() if t.attention]
    lora = tmp_path / "lora.safetensors"
    save_file(_random_lora(layout, names, 4, 4.0, seed=7), str(lora), SD15_META)
    merged, back, small = (tmp_path / f"{n}.safetensors" for n in ("merged", "back", "small"))

    assert main(["merge-lora", "--checkpoint", str(base), "--lora", f"{lora}:0.5", "--out", str(merged)]) == 0
    assert "at strength 0.5" in capsys.readouterr().out
    argv = ["extract-lora", "--base", str(base), "--tuned", str(merged), "--rank", "4", "--out", str(back)]
    assert main([*argv, "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert f"{len(names)} modules at rank 4; kept 100.00%" in out
    for name, delta in _lora_deltas(back).items():
        torch.testing.assert_close(delta, 0.5 * _lora_deltas(lora)[name], atol=1e-4, rtol=0)
    assert main(["resize-lora", "--lora", str(back), "--rank", "2", "--out", str(small)]) == 0
    out = capsys.readouterr().out
    assert "at rank 2; kept" in out and "per module:" in out
    assert math.isclose(
        float(_metadata(small)["dreamloom.kept_share"]), float(out.split("kept ")[1][:5]) / 100, abs_tol=1e-3
    )

    bad = [
        (["resize-lora", "--lora", str(back), "--rank", "0", "--out", str(tmp_path / "z.safetensors")], "--rank 0"),
        (["resize-lora", "--lora", str(back), "--rank", "2", "--out", str(small)], "already exists"),
        (
            ["resize-lora", "--lora", str(tmp_path / "none.safetensors"), "--rank", "2", "--out", "z.safetensors"],
            "not found",
        ),
        (
            [
                "merge-lora",
                "--checkpoint",
                str(tiny_files["sdxl"]),
                "--lora",
                str(lora),
                "--out",
                str(tmp_path / "z.safetensors"),
            ],
            "made for SD1.5",
        ),
        (argv[:-1] + [str(base)], "also an input"),
    ]
    for args, message in bad:
        assert main(args) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "z.safetensors").exists()
    assert main(["resize-lora", "--lora", str(back), "--rank", "1", "--out", str(small), "--overwrite"]) == 0
    assert "at rank 1" in capsys.readouterr().out


@pytest.mark.parametrize("lora_spec", ["a.safetensors:0.5", r"C:\loras\a.safetensors", "a.safetensors"])
def test_lora_strength_parsing(lora_spec):
    from trainer.cli.checks import parse_lora_strength

    path, strength = parse_lora_strength(lora_spec)
    assert path.endswith("a.safetensors") and strength == (0.5 if lora_spec.endswith("0.5") else 1.0)


def test_nodes_extract_merge_resize_publish_and_refuse(tiny_files, fake_comfy):
    import shutil

    from conftest import FakeInterrupt, pack_error, pack_node

    checkpoints, loras = fake_comfy.models / "checkpoints", fake_comfy.models / "loras"
    shutil.copy(tiny_files["sd15"], checkpoints / "base.safetensors")
    shutil.copy(tiny_files["sdxl"], checkpoints / "xl.safetensors")
    layout = checkpoint_layout(tiny_files["sd15"])
    names = [n for n, t in layout.targets.items() if t.attention]
    save_file(_random_lora(layout, names, 4, 4.0, seed=9), str(loras / "style.safetensors"), SD15_META)
    assert "style.safetensors" in pack_node("DreamLoomMergeLoRA").INPUT_TYPES()["required"]["lora_name"][0]

    name, report = pack_node("DreamLoomMergeLoRA")().merge("base.safetensors", "style.safetensors", 0.5, "tuned")
    assert name == "tuned.safetensors" and (checkpoints / name).exists() and "at strength 0.5" in report
    name, report = pack_node("DreamLoomExtractLoRA")().extract(
        "base.safetensors", "tuned.safetensors", 4, "attention", True, "back"
    )
    assert name == "back.safetensors" and f"{len(names)} modules at rank 4" in report and "back.safetensors" in report
    for module, delta in _lora_deltas(loras / name).items():  # stored in fp16
        torch.testing.assert_close(delta, 0.5 * _lora_deltas(loras / "style.safetensors")[module], atol=1e-3, rtol=0)
    assert fake_comfy.progress and fake_comfy.progress[-1][0] == fake_comfy.progress[-1][1]

    name, report = pack_node("DreamLoomResizeLoRA")().resize("back.safetensors", 2, 0.0, "back")
    assert name == "back_v2.safetensors" and "at rank 2; kept" in report  # never over the existing back
    assert load_file(str(loras / name))[f"{names[0]}.lora_down.weight"].shape[0] == 2

    error = pack_error()
    with pytest.raises(error, match=r"made for SD1\.5; the checkpoint xl\.safetensors"):
        pack_node("DreamLoomMergeLoRA")().merge("xl.safetensors", "style.safetensors", 1.0, "bad")
    with pytest.raises(error, match="not in the loras folder"):
        pack_node("DreamLoomResizeLoRA")().resize("gone.safetensors", 2, 0.0, "x")
    fake_comfy.interrupt_flag = True
    with pytest.raises(FakeInterrupt):  # Cancel: nothing published, the scratch file removed
        pack_node("DreamLoomResizeLoRA")().resize("style.safetensors", 2, 0.0, "stopped")
    assert sorted(p.name for p in loras.iterdir()) == ["back.safetensors", "back_v2.safetensors", "style.safetensors"]
    assert not any(checkpoints.glob("bad*")) and not list((fake_comfy.root / "output" / "dreamloom").iterdir())


@pytest.mark.slow
def test_full_size_sd15_merge_and_extract_load_offline(sd15_checkpoint, tmp_path):
    """On a random full-size SD1.5 file: a LoRA on every attention layer (UNet and text encoder) and on a 3x3 and a
    1x1 conv merges into real keys, extracts back at its rank, and the merged file loads through our offline
    loader with the change in its UNet."""
    from trainer.base_models.load import load_base_model

    layout = checkpoint_layout(sd15_checkpoint)
    names = [n for n, t in layout.targets.items() if t.attention]
    names += ["lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_attentions_0_proj_in"]
    lora = tmp_path / "lora.safetensors"
    save_file(_random_lora(layout, names, 2, 2.0, seed=11), str(lora), SD15_META)
    merged = tmp_path / "merged.safetensors"
    merge_loras(sd15_checkpoint, [(lora, 1.0)], merged)
    report = extract_lora(sd15_checkpoint, merged, tmp_path / "back.safetensors", 2, modules="all", precision="fp32")
    assert {m.name for m in report.modules} == set(names) and len(names) == 128 + 48 + 2
    assert all(m.kept > 0.999 for m in report.modules)  # fp16 rounding of the merged weights is the only loss
    want, got = _lora_deltas(lora), _lora_deltas(tmp_path / "back.safetensors")
    for name in names:
        torch.testing.assert_close(got[name], want[name], atol=2e-3, rtol=0)

    comps = load_base_model(str(merged))
    weight = comps.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.float()
    to_q = layout.targets["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    with safe_open(str(sd15_checkpoint), "pt") as f:
        base = f.get_tensor(to_q.key).float()
    delta = want["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    torch.testing.assert_close(weight - base, delta, atol=2e-3, rtol=0)


def test_a_built_in_models_fine_tune_is_named_as_such(tmp_path):
    """Its family reads as SD1.5 (from the metadata), but it is kept in diffusers' layout: say that, not 'SD1.5'."""
    from trainer.base_models.detect import BUILTIN_BASE_KEY, BUILTIN_FINETUNE_FORMAT

    tuned = tmp_path / "sks_fabric.safetensors"
    meta = {"format": BUILTIN_FINETUNE_FORMAT, BUILTIN_BASE_KEY: "tiny"}
    save_file({"unet.conv_in.weight": torch.zeros(8, 4, 3, 3), "text_encoder.x": torch.zeros(2)}, str(tuned), meta)
    with pytest.raises(DreamLoomError, match=r"fine-tune of DreamLoom's built-in test model 'tiny'") as refused:
        checkpoint_layout(tuned)
    assert "looks like SD1.5" not in refused.value.message
