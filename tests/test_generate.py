"""generate(): how the VAE decodes whatever precision the caller runs the pipeline in."""

import numpy as np
import pytest
import torch

from trainer.base_models.builtin import build_tiny, build_tiny_sdxl
from trainer.inference.pipelines import _decoding, generate, make_pipeline


def _conv_output_dtypes(module) -> tuple[set, list]:
    seen, handles = set(), []
    for layer in module.modules():
        if isinstance(layer, torch.nn.Conv2d):
            handles.append(layer.register_forward_hook(lambda m, args, out: seen.add(out.dtype)))
    return seen, handles


def test_the_training_samples_decode_in_the_vaes_fp32_under_fp16_autocast():
    """The trainer keeps SDXL's VAE in fp32 under fp16 (it overflows in fp16) and makes its sample grids under
    autocast; autocast ran the VAE's convolutions in fp16 anyway (black grids on a GPU). Now the UNet's run in fp16
    and the VAE's in fp32."""
    comps = build_tiny_sdxl()
    comps.unet.to(torch.float16)
    for te in comps.text_encoders().values():
        te.to(torch.float16)
    pipe = make_pipeline(comps, "ddim")
    vae_dtypes, vae_hooks = _conv_output_dtypes(comps.vae.decoder)
    unet_dtypes, unet_hooks = _conv_output_dtypes(comps.unet)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        images = generate(pipe, ["a fabric pattern"], [1], 2, 1.0, 64)
    for handle in vae_hooks + unet_hooks:
        handle.remove()
    assert unet_dtypes == {torch.float16} and vae_dtypes == {torch.float32}
    assert images[0].size == (64, 64)


def test_a_half_vae_that_overflows_decodes_again_in_fp32_and_is_given_back_in_half(capsys):
    """Some SD1.5 VAEs overflow in fp16 (black class images, saved and trained on as the prior); diffusers upcasts
    only SDXL's. A fp16/bf16 decode with non-finite pixels is done again in fp32, from then on in that call."""
    comps = build_tiny()
    pipe = make_pipeline(comps, "ddim")
    pipe.to(torch.bfloat16)
    calls = []

    def overflow_in_half(module, args, out):
        calls.append(module.weight.dtype)
        return out * float("inf") if module.weight.dtype == torch.bfloat16 else out

    handle = comps.vae.decoder.conv_out.register_forward_hook(overflow_in_half)
    try:
        images = generate(pipe, ["a fabric pattern"] * 2, [1, 2], 2, 1.0, 64, batch_size=1)
    finally:
        handle.remove()
    assert calls == [torch.bfloat16, torch.float32, torch.float32]  # the second image goes straight to fp32
    assert all(max(im.getextrema()[0]) > 0 for im in images)  # not black
    assert comps.vae.dtype == torch.bfloat16 and "decode" not in comps.vae.__dict__
    assert "the VAE overflowed in bfloat16; decoding in fp32 from here on" in capsys.readouterr().err


def _direct_images(pipe, prompts, seeds, steps, guidance, resolution, negative_prompt, batch_size):
    """What the pipeline makes when it is given the prompts as text, batch by batch (generate's way before it
    encoded them first)."""
    images = []
    scale, channels = pipe.vae_scale_factor, pipe.unet.config.in_channels
    for start in range(0, len(prompts), batch_size):
        p, s = prompts[start : start + batch_size], seeds[start : start + batch_size]
        init = torch.stack(
            [
                torch.randn(
                    (channels, resolution // scale, resolution // scale), generator=torch.Generator().manual_seed(x)
                )
                for x in s
            ]
        )
        with torch.no_grad(), _decoding(pipe.vae, resolution, "cpu"):  # one image at a time, as generate decodes
            out = pipe(
                prompt=p,
                negative_prompt=[negative_prompt] * len(p) if negative_prompt else None,
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=resolution,
                width=resolution,
                latents=init,
                generator=[torch.Generator().manual_seed(x) for x in s],
                output_type="pil",
            )
        images += out.images
    return images


@pytest.mark.parametrize("build", [build_tiny, build_tiny_sdxl], ids=["sd15", "sdxl"])
@pytest.mark.parametrize(("guidance", "negative"), [(4.0, "blurry, dull"), (4.0, ""), (1.0, "")])
def test_prompts_encoded_first_give_the_pipelines_own_pictures(build, guidance, negative):
    """generate() encodes every batch's prompts before the UNet runs (so that on a GPU the text encoders can wait
    on the CPU meanwhile); the pictures are the ones the pipeline makes from the text, to the bit."""
    pipe = make_pipeline(build(), "ddim")
    prompts, seeds = ["a fabric pattern", "a red fabric", "a fabric pattern"], [1, 2, 3]
    ours = generate(pipe, prompts, seeds, 2, guidance, 64, negative_prompt=negative, batch_size=2)
    direct = _direct_images(pipe, prompts, seeds, 2, guidance, 64, negative, 2)
    assert [np.asarray(a).tobytes() for a in ours] == [np.asarray(b).tobytes() for b in direct]


def test_a_batch_of_prompts_seen_before_is_encoded_once_and_each_batch_goes_to_on_batch():
    comps = build_tiny()
    pipe = make_pipeline(comps, "ddim")
    encodes = []
    comps.text_encoder.register_forward_pre_hook(lambda module, args: encodes.append(args[0].shape[0]))
    batches = []
    returned = generate(
        pipe,
        ["a fabric"] * 5,
        [1, 2, 3, 4, 5],
        2,
        4.0,
        64,
        batch_size=2,
        on_batch=lambda s, ims: batches.append((s, ims)),
    )
    # the batches [2, 2, 1]: two distinct prompt lists, each encoded with its empty negative prompt
    assert encodes == [2, 2, 1, 1]
    assert [(start, len(images)) for start, images in batches] == [(0, 2), (2, 2), (4, 1)]
    assert returned == []  # the images went to on_batch, not into a list
    alone = generate(pipe, ["a fabric"], [5], 2, 4.0, 64)
    assert np.array_equal(np.asarray(batches[2][1][0]), np.asarray(alone[0]))


def test_on_a_gpu_only_frozen_text_encoders_wait_on_the_cpu():
    from trainer.inference.pipelines import text_encoders_to_move

    comps = build_tiny_sdxl()
    pipe = make_pipeline(comps, "ddim")
    assert text_encoders_to_move(pipe, torch.device("cuda")) == [comps.text_encoder, comps.text_encoder_2]
    assert text_encoders_to_move(pipe, "cuda:1") == [comps.text_encoder, comps.text_encoder_2]
    assert text_encoders_to_move(pipe, "cpu") == []  # nowhere cheaper to keep them
    comps.text_encoder_2.get_input_embeddings().weight.requires_grad_(True)  # textual inversion trains it
    assert text_encoders_to_move(pipe, "cuda") == []


@pytest.mark.parametrize("pipeline_device", ["gpu", "cpu"])
def test_text_encoders_stay_on_the_gpu_where_the_pipeline_would_follow_them_to_the_cpu(monkeypatch, pipeline_device):
    """diffusers before 0.40 takes a pipeline's device from its first module by name, a text encoder: with the
    encoders parked on the CPU it would make the UNet's inputs there. A CPU stands in for the GPU here: the
    encoders' moves are recorded, and the pipeline's device is what that diffusers would report."""
    from trainer.inference import pipelines

    comps = build_tiny()
    pipe = make_pipeline(comps, "ddim")
    gpu = torch.device("cpu")  # the device generate() runs on
    moves = []
    record = lambda where: moves.append("gpu" if where is gpu else str(where)) or comps.text_encoder  # noqa: E731
    monkeypatch.setattr(comps.text_encoder, "to", record)
    monkeypatch.setattr(pipelines, "text_encoders_to_move", lambda pipe, device: [comps.text_encoder])
    reported = gpu if pipeline_device == "gpu" else torch.device("meta")  # meta: "not where the UNet is"
    monkeypatch.setattr(type(pipe), "_execution_device", property(lambda self: reported))
    with pipelines._prompts_encoded_first(pipe, [["a fabric"]], "", 4.0, gpu) as encoded:
        during = list(moves)
    assert encoded[0]["prompt_embeds"].shape[0] == 1
    if pipeline_device == "gpu":  # 0.40 and later: to encode, then waiting on the CPU; home (the CPU) at the end
        assert during == ["gpu", "cpu"] and moves == ["gpu", "cpu", "cpu"]
    else:  # before 0.40: back to the GPU before the UNet runs
        assert during == ["gpu", "cpu", "gpu"] and moves == ["gpu", "cpu", "gpu", "cpu"]
