import math

import pytest
import torch
from PIL import Image

from trainer.errors import DreamLoomError
from trainer.inference.slerp import (
    keyframe_schedule,
    morph_latents,
    morph_noise_from_seeds,
    parse_seeds,
    seed_noise,
    slerp,
)
from trainer.pictures.animation import gif_durations, write_animation, write_gif


def _unit(n, d, seed):
    v = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True)


def test_endpoints_are_exact_and_dtype_device_kept():
    a, b = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    assert torch.equal(slerp(a, b, 0.0), a)
    assert torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    half = slerp(a.half(), b.half(), 0.3)
    assert half.dtype == torch.float16 and half.shape == a.shape


def test_unit_vectors_stay_on_the_sphere_and_angle_grows_linearly():
    a, b = _unit(5, 64, 1), _unit(5, 64, 2)
    theta = torch.acos((a * b).sum(1))
    for t in torch.linspace(0, 1, 11):
        v = slerp(a, b, float(t))
        assert (v.norm(dim=1) - 1).abs().max() < 1e-5
        angle = torch.acos((v * a).sum(1).clamp(-1, 1))
        assert torch.allclose(angle, t * theta, atol=1e-6)


def test_lerp_fallback_near_parallel_and_no_nan_for_opposite():
    a = _unit(1, 16, 3)
    b = a + 1e-5 * _unit(1, 16, 4)
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid, (a + b) / 2, atol=1e-12)  # lerp branch
    opposite = slerp(a, -a, 0.5)
    assert not torch.isnan(opposite).any()
    zero = torch.zeros(1, 16, dtype=torch.float64)
    assert not torch.isnan(slerp(zero, a, 0.5)).any()


def test_per_sample_equals_a_loop_and_t_broadcasts():
    a, b = torch.randn(6, 4, 4, 4), torch.randn(6, 4, 4, 4)
    t = torch.linspace(0, 1, 6)
    batched = slerp(a, b, t)
    looped = torch.cat([slerp(a[i : i + 1], b[i : i + 1], float(t[i])) for i in range(6)])
    assert torch.allclose(batched, looped, atol=1e-6)
    with pytest.raises(ValueError):
        slerp(a, b, torch.rand(4))


def test_closed_loop_schedule_counts_and_seam():
    sched = keyframe_schedule(5, 90, "linear")
    assert len(sched) == 450
    assert (sched[0].key_a, sched[0].t) == (0, 0.0)
    assert not any(f.key_a == 0 and f.t == 0.0 for f in sched[1:])  # the seam does not repeat frame 0
    assert (sched[-1].key_a, sched[-1].key_b) == (4, 0) and sched[-1].t < 1.0
    assert len(keyframe_schedule(3, 4, hold_frames=2)) == 3 * 6
    open_path = keyframe_schedule(3, 4, loop=False)
    assert len(open_path) == 2 * 4 + 1 and (open_path[-1].key_a, open_path[-1].t) == (2, 0.0)


@pytest.mark.parametrize("easing", ["linear", "cosine", "smoothstep"])
def test_easing_keeps_frames_ordered(easing):
    sched = keyframe_schedule(2, 30, easing, loop=False)
    ts = [f.t for f in sched if f.key_a == 0]
    assert ts == sorted(ts) and ts[0] == 0.0 and len(set(ts)) == len(ts)


def test_schedule_errors():
    for kw in (
        dict(num_keys=1, frames_per_transition=3),
        dict(num_keys=3, frames_per_transition=0),
        dict(num_keys=3, frames_per_transition=3, easing="bounce"),
    ):
        with pytest.raises(DreamLoomError):
            keyframe_schedule(**kw)
    assert parse_seeds("1, 42;100\n256") == [1, 42, 100, 256]
    with pytest.raises(DreamLoomError, match="whole number"):
        parse_seeds("1, x")
    with pytest.raises(DreamLoomError, match="at least two"):
        parse_seeds("7")


def comfy_prepare_noise(latent, seed):
    """ComfyUI's documented generator (comfy.sample.prepare_noise without batch_index)."""
    generator = torch.manual_seed(seed)
    return torch.randn(latent.size(), dtype=latent.dtype, layout=latent.layout, generator=generator, device="cpu")


def test_morph_lengths_that_leave_no_frame_to_morph_are_refused():
    from trainer.inference.morph import MorphSpec

    MorphSpec(seeds=[1, 2, 3, 4, 5], hold_frames=89).check()  # 90 frames per keyframe: one morph frame each
    for spec, needles in (
        (MorphSpec(seeds=[1, 2, 3, 4, 5], hold_frames=90), ["90 per keyframe", "--hold-frames 89 or less"]),
        (MorphSpec(seeds=[1, 2], seconds=0.05, fps=30, hold_frames=1), ["2 frames, 1 per keyframe", "Leave out"]),
        (MorphSpec(seeds=[1, 2, 3], seconds=0.05, fps=30), ["not one frame", "more --seconds"]),
        (MorphSpec(seeds=[7], loop=False), ["one keyframe has nothing to morph to"]),
    ):
        with pytest.raises(DreamLoomError) as refused:
            spec.check()
        for needle in needles:
            assert needle in str(refused.value), str(refused.value)


def test_keyframe_noise_equals_comfyui_noise():
    seeds = [1, 42, 100, 256, 512]
    sched = keyframe_schedule(len(seeds), 6, "cosine")
    noise = morph_noise_from_seeds(seeds, (4, 8, 8), sched)
    assert noise.shape == (30, 4, 8, 8) and noise.dtype == torch.float32
    for k, seed in enumerate(seeds):
        expected = comfy_prepare_noise(torch.zeros(1, 4, 8, 8), seed)
        assert torch.equal(noise[k * 6], expected[0])
        assert torch.equal(seed_noise(seed, (1, 4, 8, 8)), expected)
    # In between, the noise keeps a Gaussian's norm (slerp, unlike lerp, does not shrink it).
    norms = noise.flatten(1).norm(dim=1)
    assert norms.min() > 0.85 * math.sqrt(256)
    lat = morph_latents(torch.stack([torch.ones(2), -torch.ones(2) + 1e-3]), keyframe_schedule(2, 4))
    assert not torch.isnan(lat).any()


def _frames(n, size=32):
    frames = []
    for i in range(n):
        im = Image.new("RGB", (size, size), (40, 90, 160))
        for bit in range(10):  # the frame index as a row of black/white pixels: every frame differs
            im.putpixel((bit, 0), (255, 255, 255) if i >> bit & 1 else (0, 0, 0))
        frames.append(im)
    return frames


def test_gif_has_frame_count_loop_and_exact_total():
    durations, notes = gif_durations(450, 30)
    assert sum(durations) == 15000 and set(durations) == {30, 40} and notes
    assert gif_durations(50, 25) == ([40] * 50, [])
    assert abs(sum(gif_durations(7, 24)[0]) - 7000 / 24) <= 5


def test_gif_written_and_read_back(tmp_path):
    path = tmp_path / "morph.gif"
    write_gif(_frames(450), path, fps=30)
    with Image.open(path) as im:
        assert im.n_frames == 450 and im.info.get("loop") == 0
        total = 0
        for i in range(im.n_frames):
            im.seek(i)
            total += im.info["duration"]
    assert abs(total - 15000) <= 10
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("fmt", ["webp", "mp4"])
def test_webp_and_mp4_read_back(tmp_path, fmt):
    path = tmp_path / f"morph.{fmt}"
    write_animation(_frames(24, 64), path, fps=12)
    if fmt == "webp":
        with Image.open(path) as im:
            assert im.n_frames == 24 and im.is_animated
    else:
        av = pytest.importorskip("av", reason="PyAV is in requirements-dev.txt; MP4 needs it")
        with av.open(str(path)) as container:
            assert sum(1 for _ in container.decode(video=0)) == 24
    with pytest.raises(DreamLoomError, match="Unknown animation format"):
        write_animation(_frames(2), tmp_path / "x.avi", fps=12)
