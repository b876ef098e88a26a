"""SLERP morph nodes: SLERP Noise (a NOISE for SamplerCustomAdvanced), Render Morph, Save Animation and
SLERP Conditioning."""

from __future__ import annotations

import os

from ..trainer.errors import DreamLoomError
from . import comfy, runner
from .checkpoint import SIZE_TOOLTIP, latent_size
from .images import batch_to_pil
from .widgets import bool_widget, choice_widget, float_widget, int_widget, string_widget

CATEGORY = "DreamLoom/morph"


class SlerpNoiseSource:
    """ComfyUI's NOISE contract: `.seed` and `generate_noise(latent_dict)` -> noise of the latent's shape."""

    def __init__(self, seeds, frames_per_transition, easing, hold_frames, loop):
        self.seeds = list(seeds)
        self.seed = self.seeds[0]
        self.frames_per_transition, self.easing, self.hold_frames, self.loop = (
            frames_per_transition,
            easing,
            hold_frames,
            loop,
        )
        self._cache = {}

    def schedule(self):
        from ..trainer.inference.slerp import keyframe_schedule

        return keyframe_schedule(len(self.seeds), self.frames_per_transition, self.easing, self.hold_frames, self.loop)

    def num_frames(self) -> int:
        return len(self.schedule())

    def noise_for_shape(self, shape):
        from ..trainer.inference.slerp import morph_noise_from_seeds

        key = tuple(shape[1:])
        if key not in self._cache:
            self._cache[key] = morph_noise_from_seeds(self.seeds, key, self.schedule())
        return self._cache[key]

    def generate_noise(self, input_latent):
        samples = input_latent["samples"]
        noise = self.noise_for_shape(samples.shape)
        if samples.shape[0] != noise.shape[0]:
            raise DreamLoomError(
                f"SLERP Noise makes {noise.shape[0]} frames but the latent batch has {samples.shape[0]}.",
                "Use the LATENT output of the same SLERP Noise node as the sampler's latent_image.",
            )
        if "batch_index" in input_latent:
            noise = noise[[int(i) for i in input_latent["batch_index"]]]
        return noise.to(samples.dtype)


class SlerpNoise:
    DESCRIPTION = (
        "Initial noise for a seamless morph: SLERP between the noise of keyframe seeds, for every frame at once. "
        "At each keyframe it equals exactly ComfyUI's own noise for that seed. Feed NOISE and LATENT to "
        "SamplerCustomAdvanced (or Render Morph); use a deterministic sampler such as euler or dpmpp_2m."
    )
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("NOISE", "LATENT", "INT")
    RETURN_NAMES = ("noise", "latent", "frame_count")
    OUTPUT_TOOLTIPS = (
        "The SLERPed noise for all frames.",
        "An empty latent batch with one entry per frame.",
        "Number of frames.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        from ..trainer.inference.slerp import EASINGS

        return {
            "required": {
                "seeds": string_widget(
                    "1, 42, 100, 256, 512", "Keyframe seeds, comma separated (the tutorial uses 5 keyframes)."
                ),
                "frames_per_transition": int_widget(
                    90, 1, 10000, "Frames from one keyframe to the next (90 x 5 = 450 frames = 15 s at 30 fps)."
                ),
                "easing": choice_widget(
                    EASINGS,
                    "linear",
                    "How t moves within a transition: linear, cosine or smoothstep (slow in and out).",
                ),
                "hold_frames": int_widget(0, 0, 1000, "Extra frames resting on each keyframe."),
                "loop": bool_widget(
                    True, "Return to the first keyframe: a seamless loop with no duplicated frame at the seam."
                ),
                "width": int_widget(0, 0, 4096, SIZE_TOOLTIP.format("Frame width"), step=8),
                "height": int_widget(0, 0, 4096, SIZE_TOOLTIP.format("Frame height"), step=8),
            },
            "optional": {
                "vae": (
                    "VAE",
                    {
                        "tooltip": "The VAE that decodes the frames: sizes the latent (SD1.5 and SDXL 8x, tiny-fabric "
                        "4x) and, from Load Checkpoint (DreamLoom), sets the native size."
                    },
                ),
            },
        }

    def build(self, seeds, frames_per_transition, easing, hold_frames, loop, width, height, vae=None):
        import torch

        from ..trainer.inference.slerp import parse_seeds

        source = SlerpNoiseSource(parse_seeds(seeds), int(frames_per_transition), easing, int(hold_frames), bool(loop))
        n = source.num_frames()
        if vae is not None:
            channels, h, w, _ = latent_size(vae, width, height)
        else:  # without a VAE: 4 channels at 1/8 of the size (SD1.5 and SDXL), SD1.5's 512 px for 0
            size = runner.SD15_RESOLUTION
            channels, h, w = 4, (int(height) or size) // 8, (int(width) or size) // 8
        latent = torch.zeros((n, channels, h, w))
        return (source, {"samples": latent}, n)


class SlerpConditioning:
    DESCRIPTION = (
        "A prompt morph: SLERP between two conditionings for every frame of a SLERP Noise schedule (or N frames), "
        "giving a conditioning batch with one entry per frame. Use it with Render Morph."
    )
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("One conditioning entry per frame.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning_a": ("CONDITIONING", {"tooltip": "Start prompt."}),
                "conditioning_b": ("CONDITIONING", {"tooltip": "End prompt."}),
                "frames": int_widget(90, 2, 10000, "Frames (match the SLERP Noise frame_count)."),
                "loop": bool_widget(True, "Go A to B and back to A (seamless) instead of A to B."),
            }
        }

    def build(self, conditioning_a, conditioning_b, frames, loop):
        import math

        import torch

        from ..trainer.inference.slerp import slerp

        frames = int(frames)
        if loop:
            ts = [0.5 - 0.5 * math.cos(2 * math.pi * i / frames) for i in range(frames)]
        else:
            ts = [i / (frames - 1) for i in range(frames)]
        t = torch.tensor(ts)
        out = []
        for (ca, da), (cb, db) in zip(conditioning_a, conditioning_b):
            if ca.shape[1:] != cb.shape[1:]:
                raise DreamLoomError(
                    f"The two conditionings have different shapes {tuple(ca.shape)} and {tuple(cb.shape)}.",
                    "Encode both prompts with the same CLIP; long prompts must have the same number of 77-token "
                    "chunks.",
                )
            a, b = ca[:1].expand(frames, *ca.shape[1:]), cb[:1].expand(frames, *cb.shape[1:])
            meta = dict(da)
            if da.get("pooled_output") is not None and db.get("pooled_output") is not None:
                pa, pb = da["pooled_output"][:1].expand(frames, -1), db["pooled_output"][:1].expand(frames, -1)
                meta["pooled_output"] = slerp(pa.contiguous(), pb.contiguous(), t)
            out.append([slerp(a.contiguous(), b.contiguous(), t), meta])
        return (out,)


def _slice_conditioning(cond, start, end, n_frames):
    out = []
    for tensor, meta in cond:
        if tensor.shape[0] == n_frames:
            meta = dict(meta)
            if meta.get("pooled_output") is not None and meta["pooled_output"].shape[0] == n_frames:
                meta["pooled_output"] = meta["pooled_output"][start:end]
            tensor = tensor[start:end]
        out.append([tensor, meta])
    return out


class RenderMorph:
    DESCRIPTION = (
        "Samples and decodes all frames of a morph in chunks, so memory stays bounded for hundreds of frames, with "
        "progress and cancel per chunk. Takes the NOISE and LATENT of SLERP Noise."
    )
    CATEGORY = CATEGORY
    FUNCTION = "render"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("The decoded frames, in order.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model (with your LoRA applied)."}),
                "positive": ("CONDITIONING", {"tooltip": "Prompt (or a SLERP Conditioning batch)."}),
                "negative": ("CONDITIONING", {"tooltip": "Negative prompt."}),
                "sampler": (
                    "SAMPLER",
                    {"tooltip": "From KSamplerSelect; deterministic samplers (euler, dpmpp_2m) keep frames coherent."},
                ),
                "sigmas": ("SIGMAS", {"tooltip": "From BasicScheduler (denoise 1.0)."}),
                "cfg": float_widget(7.5, 0.0, 30.0, 0.1, "Classifier-free guidance."),
                "vae": ("VAE", {"tooltip": "The VAE to decode frames."}),
                "noise": ("NOISE", {"tooltip": "From SLERP Noise."}),
                "latent": ("LATENT", {"tooltip": "From SLERP Noise."}),
                "chunk_size": int_widget(
                    8, 1, 512, "Frames sampled at once: higher is faster, lower uses less memory."
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def render(self, model, positive, negative, sampler, sigmas, cfg, vae, noise, latent, chunk_size, unique_id=None):
        import torch

        samples = latent["samples"]
        n = samples.shape[0]
        all_noise = noise.generate_noise(latent)
        pbar = comfy.progress_bar(n, unique_id)
        frames = []
        for start in range(0, n, int(chunk_size)):
            if comfy.interrupt_requested():
                comfy.raise_interrupt()
            end = min(n, start + int(chunk_size))
            out = comfy.sample_with_noise(
                model,
                _slice_conditioning(positive, start, end, n),
                _slice_conditioning(negative, start, end, n),
                float(cfg),
                sampler,
                sigmas,
                all_noise[start:end],
                samples[start:end],
                getattr(noise, "seed", 0),
            )
            frames.append(comfy.vae_decode(vae, out).float().cpu())
            pbar.update_absolute(end, n)
        return (torch.cat(frames),)


class SaveAnimation:
    DESCRIPTION = (
        "Saves IMAGE frames as a looping GIF (exact per-frame timing), animated WebP or MP4 (H.264, needs PyAV) "
        "in ComfyUI's output folder and shows it in the UI."
    )
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Full path of the written file.",)

    @classmethod
    def INPUT_TYPES(cls):
        from ..trainer.pictures.animation import FORMATS

        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The frames, in order."}),
                "fps": float_widget(
                    30.0, 0.1, 120.0, 0.5, "Frames per second (GIF times frames in 10 ms steps; the total stays exact)."
                ),
                "format": choice_widget(FORMATS, "gif", "gif, webp or mp4."),
                "loop": bool_widget(True, "Loop forever (GIF/WebP)."),
                "filename_prefix": string_widget("dreamloom/morph", "File name prefix inside ComfyUI's output folder."),
            }
        }

    def save(self, images, fps, format, loop, filename_prefix):
        from ..trainer.pictures.animation import write_animation

        frames = batch_to_pil(images)
        folder, stem, subfolder = comfy.save_path(filename_prefix, frames[0].width, frames[0].height)
        name = f"{stem}.{format}"
        path = os.path.join(folder, name)
        notes = write_animation(frames, path, float(fps), format, bool(loop))
        # The editor shows an "animated" output whose name has neither webp nor png in it as a <video>, which
        # cannot play a GIF: a GIF goes out as a still image entry, which the browser's <img> animates anyway.
        animated = format != "gif"
        ui = {"images": [{"filename": name, "subfolder": subfolder, "type": "output"}], "animated": (animated,)}
        if notes:
            ui["text"] = notes
        return {"ui": ui, "result": (path,)}
