"""SDXL as a model family: the tiny-sdxl model trains LoRA and TI like SD1.5, with SDXL's conditioning
(two text encoders, pooled embedding, time ids), and its files load in diffusers."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from conftest import assert_same_tensors, run_whole_and_resumed, tiny_config
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.base_models.builtin import build_tiny_sdxl
from trainer.base_models.sdxl import SDXL
from trainer.errors import DreamLoomError
from trainer.training.loop import Trainer
from trainer.training.loss import diffusion_loss


def sdxl_config(fabric_dir, **overrides):
    return tiny_config(fabric_dir, base_model="tiny-sdxl", **overrides)


def _batch(comps, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn((n, 4, 8, 8), generator=g)
    noise = torch.randn((n, 4, 8, 8), generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    prompts = [f"a photo of pattern {i}" for i in range(n)]
    with torch.no_grad():
        embeddings = SDXL.encode_prompts(comps, prompts, "cpu")
    size_ids = torch.tensor([[96.0, 64.0, 0.0, 16.0, 64.0, 64.0]] * n)
    return latents, noise, t, embeddings, size_ids


def _fixed_batch_losses(comps, optimizer, prompt: str, steps: int, seed: int) -> list[float]:
    """The loss of `steps` optimizer steps on one fixed 2-row batch, `prompt` encoded each step (it may train)."""
    lat, noise, t, _, size_ids = _batch(comps, 2, seed=seed)
    sched, losses = comps.noise_scheduler(), []
    for _ in range(steps):
        emb = SDXL.encode_prompts(comps, [prompt] * 2, "cpu")
        hidden, kwargs = SDXL.unet_conditioning(emb, size_ids, torch.float32)
        loss = diffusion_loss(comps.unet, sched, lat, noise, t, hidden, 2, unet_kwargs=kwargs)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses


def test_prompt_conditioning_matches_diffusers_sdxl_pipeline():
    comps = build_tiny_sdxl()
    pipe = SDXL.pipeline(comps, comps.noise_scheduler())
    prompts = ["a sks fabric pattern", "a dress"]
    with torch.no_grad():
        ours = SDXL.encode_prompts(comps, prompts, "cpu")
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert ours["hidden"].shape == (2, 77, 64) and ours["pooled"].shape == (2, 32)
    assert torch.equal(ours["hidden"], hidden) and torch.equal(ours["pooled"], pooled)
    # The second tokenizer pads with "!" (OpenCLIP), the first with its end token, as in SDXL's own files.
    assert comps.tokenizer_2.pad_token == "!" and comps.tokenizer.pad_token == "<|endoftext|>"
    # time ids in diffusers' order: original size, crop top-left, target size
    time_ids = pipe._get_add_time_ids((96, 64), (0, 16), (64, 64), dtype=torch.float32, text_encoder_projection_dim=32)
    assert torch.equal(time_ids[0], torch.tensor([96.0, 64.0, 0.0, 16.0, 64.0, 64.0]))


def test_prior_preservation_concat_equals_two_pass_reference_with_sdxl_conditioning():
    import torch.nn.functional as F

    comps = build_tiny_sdxl()
    sched = comps.noise_scheduler()
    lat, noise, t, embeddings, size_ids = _batch(comps, 4)
    hidden, kwargs = SDXL.unet_conditioning(embeddings, size_ids, torch.float32)
    with torch.no_grad():
        loss, inst, prior = diffusion_loss(comps.unet, sched, lat, noise, t, hidden, 2, 0.7, unet_kwargs=kwargs)
        ref = []
        for rows in (slice(0, 2), slice(2, 4)):
            cond = {"text_embeds": embeddings["pooled"][rows], "time_ids": size_ids[rows]}
            noisy = sched.add_noise(lat[rows], noise[rows], t[rows])
            pred = comps.unet(noisy, t[rows], hidden[rows], added_cond_kwargs=cond).sample
            ref.append(F.mse_loss(pred, noise[rows]))
    assert torch.allclose(inst, ref[0], atol=1e-6) and torch.allclose(prior, ref[1], atol=1e-6)
    assert torch.allclose(loss, ref[0] + 0.7 * ref[1], atol=1e-6)
    # The time ids reach the UNet: other sizes, other prediction.
    with torch.no_grad():
        other = dict(kwargs["added_cond_kwargs"], time_ids=size_ids * 2)
        changed = diffusion_loss(
            comps.unet, sched, lat, noise, t, hidden, 2, 0.7, unet_kwargs={"added_cond_kwargs": other}
        )
    assert not torch.allclose(changed[0], loss)


def test_size_ids_are_the_true_original_size_and_crop(tmp_path):
    from trainer.data.caches import LatentSource

    comps = build_tiny_sdxl()
    wide = Image.new("RGB", (120, 60), (200, 30, 30))  # 2:1; resized to 64 x 128 before a 64 px square crop
    centred = LatentSource(comps.vae, [wide], 64, center_crop=True, use_flip=True, cache=False, device="cpu", seed=1)
    assert centred.size_ids([(0, False)], [0]).tolist() == [[60, 120, 0, 32, 64, 64]]
    assert centred.size_ids([(0, True)], [0]).tolist() == [
        [60, 120, 0, 32, 64, 64]
    ]  # a centred crop mirrors onto itself
    rand = LatentSource(comps.vae, [wide], 64, center_crop=False, use_flip=True, cache=False, device="cpu", seed=1)
    left = random.Random("crop:1:5").randint(0, 60)  # the crop the pixels get at position 5
    plain, flipped = rand.size_ids([(0, False), (0, True)], [5, 5]).tolist()
    assert plain == [60, 120, 0, round(left * 64 / 60), 64, 64]
    assert flipped[3] == 128 - plain[3] - 64


def _lora_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.method.trainable_state(trainer.comps).items()}


def test_tiny_sdxl_lora_trains_both_text_encoders_and_exports_kohya_ldm_names(fabric_dir, tmp_path):
    from trainer.formats.ldm_layout import kohya_ldm_unet_name

    base = build_tiny_sdxl()
    cfg = sdxl_config(fabric_dir, max_train_steps=12, train_text_encoder=True, num_class_images=2)
    trainer = Trainer(cfg, tmp_path / "run", comps=build_tiny_sdxl(), cache_root=tmp_path / "cache")
    result = trainer.run()
    comps = trainer.comps
    assert len(list((tmp_path / "cache").rglob("*.png"))) == 2  # class images made by the SDXL pipeline, cached
    # Only LoRA weights changed: every base weight of the UNet, both text encoders and the VAE is bit-identical.
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        before = getattr(base, name).state_dict()
        for key, value in getattr(comps, name).state_dict().items():
            if "lora_" not in key:
                assert torch.equal(value, before[key.replace(".base_layer", "")]), (name, key)
    state = _lora_state(trainer)
    assert any(k.startswith("text_encoder_2.") for k in state) and any(k.startswith("text_encoder.") for k in state)
    moved = [k for k, v in state.items() if "lora_B" in k and v.abs().max() > 0]
    assert any(k.startswith("text_encoder_2.") for k in moved) and any(k.startswith("unet.") for k in moved)

    kohya = load_file(result.outputs["lora"])
    modules = {k.rsplit(".", 2)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in kohya}
    config = dict(comps.unet.config)
    targeted = {
        n
        for n, m in base.unet.named_modules()
        if n.split(".")[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0")
    }
    unet_names = {kohya_ldm_unet_name(n, config) for n in targeted}
    assert {m for m in modules if m.startswith("lora_unet_")} == unet_names
    assert all(
        n.startswith("lora_unet_input_blocks_") or "_middle_block_" in n or "output_blocks" in n for n in unet_names
    )
    te1 = {m for m in modules if m.startswith("lora_te1_")}
    te2 = {m for m in modules if m.startswith("lora_te2_")}
    # q, k, v, out of each layer: CLIP-L's 2 but its last (SDXL takes its penultimate layer), OpenCLIP's 2
    assert len(te1) == 1 * 4 and len(te2) == 2 * 4
    assert not modules - unet_names - te1 - te2
    for module in modules:  # one down/up/alpha triple per module
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= kohya.keys()
    with safe_open(result.outputs["lora"], "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_diffusers_load_lora_weights_reproduces_the_trained_sdxl_unet_and_text_encoders(fabric_dir, tmp_path):
    cfg = sdxl_config(fabric_dir, max_train_steps=6, train_text_encoder=True, with_prior_preservation=False)
    trainer = Trainer(cfg, tmp_path / "run", comps=build_tiny_sdxl())
    result = trainer.run()
    trained = trainer.comps
    lat, noise, t, _, size_ids = _batch(trained, 2, seed=3)
    prompts = ["a sks fabric pattern", "a dress made of sks fabric"]

    def outputs(comps):
        with torch.no_grad():
            emb = SDXL.encode_prompts(comps, prompts, "cpu")
            hidden, kwargs = SDXL.unet_conditioning(emb, size_ids, torch.float32)
            return emb, comps.unet(lat, t, hidden, **kwargs).sample

    trained.unet.eval()
    want_emb, want = outputs(trained)
    for weights in (result.outputs["lora_diffusers"], result.outputs["lora"]):  # diffusers' file and kohya's
        fresh = build_tiny_sdxl()
        pipe = SDXL.pipeline(fresh, fresh.noise_scheduler())
        pipe.load_lora_weights(str(tmp_path / "run" / "result"), weight_name=weights.rsplit("/", 1)[1])
        got_emb, got = outputs(fresh)
        assert torch.allclose(got_emb["hidden"], want_emb["hidden"], atol=1e-5), weights
        assert torch.allclose(got_emb["pooled"], want_emb["pooled"], atol=1e-5), weights
        assert torch.allclose(got, want, atol=1e-4), weights


def test_sdxl_lora_files_import_to_the_same_layers_and_scales(fabric_dir, tmp_path):
    """Our kohya file (LDM-named UNet, lora_te1_/lora_te2_) and diffusers file (unet.*, text_encoder.*,
    text_encoder_2.*) import with every key mapped, onto the same layers with the same alpha/rank deltas."""
    from trainer.formats.kohya_names import kohya_module_name
    from trainer.formats.ldm_layout import kohya_ldm_unet_table
    from trainer.formats.lora_import import load_lora_file

    cfg = sdxl_config(fabric_dir, max_train_steps=2, train_text_encoder=True, with_prior_preservation=False)
    result = Trainer(cfg, tmp_path / "run", comps=build_tiny_sdxl()).run()
    comps = build_tiny_sdxl()
    modules = [n for n, m in comps.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    names = kohya_ldm_unet_table(modules, dict(comps.unet.config))
    names.update({kohya_module_name("lora_unet_", n): n for n in modules})
    for prefix, encoder in (
        ("lora_te_", "text_encoder"),
        ("lora_te1_", "text_encoder"),
        ("lora_te2_", "text_encoder_2"),
    ):
        for n, m in getattr(comps, encoder).named_modules():
            if isinstance(m, torch.nn.Linear):
                names[kohya_module_name(prefix, "text_model." + n.removeprefix("text_model."))] = f"{encoder}:{n}"

    def deltas(path):
        imported = load_lora_file(path)
        out = {}
        for module in imported.modules:
            t = imported.tensors
            down, up = t[f"{module}.lora_down.weight"], t[f"{module}.lora_up.weight"]
            out[names[module]] = float(t[f"{module}.alpha"]) / down.shape[0] * (up.float() @ down.float())
        return imported, out

    kohya, from_kohya = deltas(result.outputs["lora"])
    diffusers, from_diffusers = deltas(result.outputs["lora_diffusers"])
    assert kohya.source_format == "kohya" and diffusers.source_format == "diffusers"
    assert any(m.startswith("lora_te2_") for m in kohya.modules) and any(
        m.startswith("lora_te2_") for m in diffusers.modules
    )
    assert from_kohya.keys() == from_diffusers.keys() and len(from_kohya) == len(kohya.modules)
    for layer, delta in from_kohya.items():
        assert torch.allclose(delta, from_diffusers[layer], atol=1e-6), layer


def test_sdxl_resume_matches_uninterrupted_run(fabric_dir, tmp_path):
    cfg = sdxl_config(fabric_dir, max_train_steps=6, random_flip=True, num_class_images=2)

    def make_trainer(run_dir, **kwargs):
        return Trainer(cfg, run_dir, comps=build_tiny_sdxl(), cache_root=tmp_path / "cache", **kwargs)

    whole, resumed, _ = run_whole_and_resumed(make_trainer, tmp_path, 3)
    assert_same_tensors(_lora_state(resumed), _lora_state(whole))


def test_sdxl_textual_inversion_trains_a_token_in_both_encoders(fabric_dir, tmp_path):
    from trainer.formats.embeddings import load_embedding_into_pipeline

    base = build_tiny_sdxl()
    cfg = sdxl_config(
        fabric_dir, method="ti", placeholder_token="<sks>", num_vectors=2, learning_rate=5e-3, max_train_steps=20
    )
    trainer = Trainer(cfg, tmp_path / "run", comps=build_tiny_sdxl())
    result = trainer.run()
    saved = load_file(result.outputs["embedding"])
    assert set(saved) == {"clip_l", "clip_g"} and saved["clip_l"].shape == saved["clip_g"].shape == (2, 32)
    init_id = base.tokenizer.encode("pattern", add_special_tokens=False)[0]
    for key, name in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
        embedding = getattr(trainer.comps, name).get_input_embeddings()
        assert torch.equal(embedding.base.weight, getattr(base, name).get_input_embeddings().weight)
        init = getattr(base, name).get_input_embeddings().weight[init_id]
        assert all((saved[key][i] - init).abs().max() > 1e-4 for i in range(2)), key
        assert torch.equal(saved[key], embedding.new_rows.detach().float())
    assert set(load_file(result.outputs["embedding_diffusers_2"])) == {"<sks>"}

    # diffusers loads the file into both encoders and encodes the token as training did.
    fresh = build_tiny_sdxl()
    pipe = SDXL.pipeline(fresh, fresh.noise_scheduler())
    load_embedding_into_pipeline(pipe, result.outputs["embedding"], "<sks>")
    with torch.no_grad():
        want = SDXL.encode_prompts(trainer.comps, ["a pattern in the style of <sks> <sks>_1"], "cpu")
        hidden, _, pooled, _ = pipe.encode_prompt(
            "a pattern in the style of <sks>", device="cpu", do_classifier_free_guidance=False
        )
    assert torch.allclose(hidden, want["hidden"], atol=1e-5) and torch.allclose(pooled, want["pooled"], atol=1e-5)


def test_sdxl_ti_loss_falls_on_a_fixed_batch(fabric_dir):
    from trainer.training.methods.ti import TextualInversionMethod

    comps = build_tiny_sdxl()
    method = TextualInversionMethod(sdxl_config(fabric_dir, method="ti", placeholder_token="<sks>", num_vectors=2))
    method.setup(comps)
    optimizer = torch.optim.Adam(method.param_groups(comps)[0]["params"], lr=0.05)
    losses = _fixed_batch_losses(comps, optimizer, f"a pattern in the style of {method.phrase}", 15, seed=5)
    # A random-weight UNet listens to its text conditioning only a little, so the fall is small but steady.
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 5e-3, losses


def test_embedding_of_the_other_family_is_refused(tmp_path):
    from safetensors.torch import save_file

    from trainer.formats.embeddings import load_embedding_into_pipeline

    path = tmp_path / "sd15.safetensors"
    save_file({"emb_params": torch.zeros(1, 768)}, str(path))
    comps = build_tiny_sdxl()
    with pytest.raises(DreamLoomError, match="is an SD1.5 embedding; this model is SDXL"):
        load_embedding_into_pipeline(SDXL.pipeline(comps, comps.noise_scheduler()), str(path), "<t>")


def test_sdxl_diffusers_folder_loads_and_a_refiner_folder_is_refused(tmp_path):
    import json

    from trainer.base_models.load import family_of, load_base_model, model_fingerprint

    comps = build_tiny_sdxl()
    pipe = SDXL.pipeline(comps, comps.noise_scheduler())
    pipe.save_pretrained(tmp_path / "xl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_base_model(str(tmp_path / "xl"))
    assert not [w for w in caught if "torch_dtype" in str(w.message)]  # diffusers >= 0.40 takes `dtype`
    assert loaded.family is SDXL and family_of(str(tmp_path / "xl")) is SDXL and family_of("tiny-sdxl") is SDXL
    assert loaded.tokenizer_2.pad_token == "!" and loaded.text_encoder_2 is not None
    assert loaded.fingerprint == model_fingerprint(str(tmp_path / "xl"))
    for a, b in zip(comps.unet.state_dict().values(), loaded.unet.state_dict().values()):
        assert torch.equal(a, b)
    index = json.loads((tmp_path / "xl" / "model_index.json").read_text())
    (tmp_path / "xl" / "model_index.json").write_text(
        json.dumps({**index, "_class_name": "StableDiffusionXLImg2ImgPipeline"})
    )
    with pytest.raises(DreamLoomError, match="refiner"):
        load_base_model(str(tmp_path / "xl"))


@pytest.mark.parametrize("free_gib, out_of_memory", [(12.0, False), (0.1, False), (12.0, True)])
def test_large_images_decode_whole_where_the_gpu_has_room_else_in_tiles(monkeypatch, capsys, free_gib, out_of_memory):
    """On CUDA an image above TILE_PIXELS decodes whole where the free memory holds the decode (tiles can leave tone
    seams, and class images are trained on), in tiles where it does not (SDXL's fp32 VAE at 1024 px: 11.6 -> 8.6 GiB
    whole-run peak on an H100), and in tiles again when a whole decode runs out of memory anyway. A CPU and small
    images decode whole; the VAE's settings come back after. (Tiles of 128 px here, 512 in use: a CPU's sizes.)"""
    from trainer.inference import pipelines

    vae = build_tiny_sdxl().vae
    monkeypatch.setattr(pipelines, "TILE_PIXELS", 128)
    monkeypatch.setattr(pipelines, "free_cuda_bytes", lambda device: free_gib * 2**30)
    decoded_sizes = []
    forward = vae.decoder.forward

    def decoder(z, *args, **kwargs):
        if out_of_memory and z.shape[-1] > 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        decoded_sizes.append(z.shape[-1])
        return forward(z, *args, **kwargs)

    monkeypatch.setattr(vae.decoder, "forward", decoder)
    before = (vae.use_slicing, vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size)
    need_gib = 768 * 256**2 * 4 / 2**30  # activations of a whole 256 px fp32 decode, as _decoding estimates them
    tiled_up_front = free_gib < 1.25 * need_gib
    for device, resolution, tiles in (("cpu", 256, False), ("cuda", 128, False), ("cuda", 256, tiled_up_front)):
        decoded_sizes.clear()
        with pipelines._decoding(vae, resolution, device):
            assert vae.use_slicing and vae.use_tiling == tiles
            z = torch.randn(1, 4, resolution // 8, resolution // 8, generator=torch.Generator().manual_seed(0))
            if device == "cpu" and out_of_memory:
                with pytest.raises(torch.cuda.OutOfMemoryError):  # no tiles on a CPU: the error is the user's
                    vae.decode(z)
                continue
            with torch.no_grad():
                assert vae.decode(z).sample.shape == (1, 3, resolution, resolution)
            if device == "cpu" or resolution == 128 or not (tiled_up_front or out_of_memory):
                assert decoded_sizes == [resolution // 8]  # whole
            else:
                assert len(decoded_sizes) == 9 and max(decoded_sizes) == 16  # 3 x 3 overlapping 128 px tiles
                assert vae.use_tiling and (vae.tile_sample_min_size, vae.tile_latent_min_size) == (128, 16)
        assert (vae.use_slicing, vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size) == before
        assert "decode" not in vae.__dict__  # the class's decode again
    assert ("ran out of memory" in capsys.readouterr().err) == out_of_memory


@pytest.mark.slow
def test_full_size_sdxl_single_file_loads_offline_tensor_by_tensor(tmp_path):
    """A random-weight full-size SDXL base in the original single-file layout (6.9 GB, written here and deleted)
    loads through the offline path a user's sd_xl_base_1.0.safetensors takes, every tensor where it belongs."""
    from helpers.random_weights import same_bits
    from helpers.sdxl_layout import write_random_sdxl
    from trainer.base_models.components import match_text_model_level
    from trainer.base_models.load import load_base_model, model_fingerprint
    from trainer.base_models.native import native_resolution
    from trainer.formats import ldm_layout as L

    path = write_random_sdxl(tmp_path / "sd_xl_random.safetensors")
    try:
        comps = load_base_model(str(path), dtype=torch.float16)
        assert comps.family is SDXL and comps.native_resolution == 1024 == native_resolution(str(path))
        assert comps.fingerprint == model_fingerprint(str(path)) and comps.fingerprint.startswith("sdxl-")
        assert comps.tokenizer_2.pad_token == "!" and comps.vae.config.scaling_factor == 0.13025
        unet_config, vae_blocks = dict(comps.unet.config), len(comps.vae.config.block_out_channels)
        loaded = {
            "unet": comps.unet.state_dict(),
            "vae": comps.vae.state_dict(),
            "text": comps.text_encoder.state_dict(),
            "text_2": comps.text_encoder_2.state_dict(),
        }
        seen = {part: set() for part in loaded}
        with safe_open(str(path), "pt") as f:
            open_clip = {}
            for key in f.keys():
                if key.startswith(L.UNET_PREFIX):
                    part, name = "unet", L.ldm_key_to_unet(key[len(L.UNET_PREFIX) :], unet_config)
                    value = f.get_tensor(key)
                elif key.startswith(L.VAE_PREFIX):
                    name, conv = L.ldm_key_to_vae(key[len(L.VAE_PREFIX) :], vae_blocks)
                    part, value = "vae", f.get_tensor(key)
                    value = value[:, :, 0, 0] if conv else value
                elif key.startswith(L.SDXL_TEXT_PREFIX):
                    name = next(iter(match_text_model_level({key[len(L.SDXL_TEXT_PREFIX) :]: 0}, comps.text_encoder)))
                    part, value = "text", f.get_tensor(key)
                else:
                    assert key.startswith(L.SDXL_TEXT_2_PREFIX), key
                    open_clip[key[len(L.SDXL_TEXT_2_PREFIX) :]] = f.get_tensor(key)
                    continue
                assert same_bits(loaded[part][name], value), key
                seen[part].add(name)
        for name, value in L.hf_from_open_clip(open_clip).items():
            # text_projection sits beside text_model; the rest has the installed transformers' level
            name = next(n for n in (name, name.removeprefix("text_model.")) if n in loaded["text_2"])
            assert same_bits(loaded["text_2"][name], value), name
            seen["text_2"].add(name)
        for part, state in loaded.items():  # every weight of every module came from the file
            assert set(state) - seen[part] <= {k for k in state if k.endswith("position_ids")}, part
    finally:
        path.unlink(missing_ok=True)


def test_a_lora_of_the_other_family_is_refused_naming_both(tmp_path):
    from safetensors.torch import save_file

    from trainer.cli.commands import check_lora_family
    from trainer.files.safetensors_header import read_safetensors_header
    from trainer.formats.lora_import import lora_family

    def lora(name, tensors, metadata=None):
        save_file(tensors, str(tmp_path / name), metadata=metadata)
        return str(tmp_path / name)

    down = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    sd15 = lora("sd15.safetensors", {down: torch.zeros(4, 768)}, {"ss_base_model_version": "sd_v1"})
    by_width = lora("unnamed.safetensors", {down: torch.zeros(4, 2048)})  # no metadata: the context width says SDXL
    te2 = lora("te2.safetensors", {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(4.0)})
    tiny = lora("toy.safetensors", {down: torch.zeros(4, 64)})
    assert [lora_family(read_safetensors_header(p)) for p in (sd15, by_width, te2, tiny)] == [
        "SD1.5",
        "SDXL",
        "SDXL",
        None,
    ]

    comps = build_tiny_sdxl()
    with pytest.raises(DreamLoomError, match="sd15.safetensors was trained on SD1.5; the base model tiny-sdxl is SDXL"):
        check_lora_family(sd15, comps)
    check_lora_family(by_width, comps)  # same family: no error
    check_lora_family(tiny, comps)  # nothing says: the loader's own checks decide


@pytest.mark.parametrize("method", ["lora", "full"])
def test_every_trained_text_encoder_parameter_gets_a_gradient(fabric_dir, method):
    """SDXL conditions on CLIP-L's penultimate layer, so its last layer's adapters (or weights) got no gradient: on
    one GPU they trained nothing and were exported as they started; under multi-GPU (DDP) training the run ended at
    its second step ("parameters that were not used in producing loss")."""
    from trainer.training.methods import make_method

    comps = build_tiny_sdxl()
    cfg = sdxl_config(fabric_dir, method=method, train_text_encoder=True, with_prior_preservation=False)
    trainer_method = make_method(cfg)
    trainer_method.setup(comps)
    embeddings = SDXL.encode_prompts(comps, ["a sks fabric pattern"], "cpu")
    (embeddings["hidden"].square().mean() + embeddings["pooled"].square().mean()).backward()
    for name, encoder in comps.text_encoders().items():
        trained = [(k, p) for k, p in encoder.named_parameters() if p.requires_grad]
        assert trained, name
        assert [k for k, p in trained if p.grad is None] == [], name
    last = comps.text_encoder.config.num_hidden_layers - 1
    assert not any(f"layers.{last}." in k for k, p in comps.text_encoder.named_parameters() if p.requires_grad)
    assert any(f"layers.{last}." in k for k, p in comps.text_encoder_2.named_parameters() if p.requires_grad)


def test_pipelines_take_at_most_2_images_at_a_time_at_1024_px_on_a_gpu():
    from trainer.inference.pipelines import gpu_batch_for

    assert gpu_batch_for(4, 512, "cuda") == 4  # SD1.5's measured 2.67 GiB setting is unchanged
    assert gpu_batch_for(8, 512, "cuda") == 8  # morph's 8 frames a call at 512 px
    assert gpu_batch_for(4, 1024, "cuda") == 2 and gpu_batch_for(4, 2048, "cuda") == 1
    assert gpu_batch_for(8, 1024, "cpu") == 8  # RAM, not a 12 GB card, is the limit there


def test_every_way_of_making_class_images_gets_the_gpu_cap(monkeypatch, tmp_path):
    """The Generate Class Images node's job and `class-images` passed the batch size as asked (the node's default 4:
    about 11.2 GiB at SDXL's 1024 px, a whole 12 GB card); only training capped it. The cap now lives where they all
    go through."""
    import trainer.data.class_images as class_images
    from trainer.events import Events

    batches = []
    monkeypatch.setattr(
        class_images, "_generate_missing", lambda comps, spec, missing, folder, batch, *a: batches.append(batch)
    )
    comps = build_tiny_sdxl()
    spec = class_images.ClassImageSpec(comps.fingerprint, "a fabric pattern", "", "ddim", 2, 5.0, 1024, 0)
    events = Events(tmp_path)
    class_images.generate_class_images(comps, spec, 4, tmp_path / "c", 4, device="cuda", events=events)
    assert batches == [2]
    log = (tmp_path / "events.jsonl").read_text()
    assert "class images are made 2 at a time at 1024 px (batch size 4)" in log


def test_cli_trains_tiny_sdxl_then_generates_and_refuses_its_lora_on_sd15(fabric_dir, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def cli(*args):
        cmd = [sys.executable, "-m", "trainer", *args]
        return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)

    common = ["--base-model", "tiny-sdxl", "--instance-dir", str(fabric_dir), "--max-train-steps", "2"]
    r = cli("train", "--output-dir", str(tmp_path / "run"), *common, "--num-class-images", "2", "--class-steps", "2",
            "--sample-steps", "2", "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    outputs = json.loads(r.stdout)
    job = json.loads((tmp_path / "run" / "job.json").read_text())
    assert job["config"]["resolution"] == 64  # tiny-sdxl's native size
    r = cli(
        "generate",
        "--base-model",
        "tiny-sdxl",
        "--lora",
        outputs["lora"],
        "--steps",
        "2",
        "--out",
        str(tmp_path / "g.png"),
    )
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "g.png").width > 3 * 64
    r = cli(
        "generate", "--base-model", "tiny", "--lora", outputs["lora"], "--steps", "2", "--out", str(tmp_path / "x.png")
    )
    assert r.returncode == 2 and "was trained on SDXL" in r.stderr and "is SD1.5" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x.png").exists()


def test_sdxl_lora_loss_falls_on_a_fixed_batch_and_the_settings_say_where_the_vae_runs(fabric_dir, tmp_path):
    from trainer.training.methods.lora import LoRAMethod

    comps = build_tiny_sdxl()
    method = LoRAMethod(sdxl_config(fabric_dir, train_text_encoder=True))
    torch.manual_seed(0)
    method.setup(comps)
    params = [p for group in method.param_groups(comps) for p in group["params"]]
    losses = _fixed_batch_losses(comps, torch.optim.AdamW(params, lr=1e-2), "a sks fabric pattern", 12, seed=7)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses

    cfg = sdxl_config(fabric_dir, max_train_steps=1, mixed_precision="bf16")
    trainer = Trainer(cfg, tmp_path / "r", comps=build_tiny_sdxl())
    trainer.set_up()
    assert trainer.settings["vae"] == "bfloat16"  # fp16 would say fp32: the VAE overflows in fp16
