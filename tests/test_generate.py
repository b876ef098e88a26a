"""generate(): how the VAE decodes whatever precision the caller runs the pipeline in."""

import torch

from trainer.base_models.builtin import build_tiny, build_tiny_sdxl
from trainer.inference.pipelines import generate, make_pipeline


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
