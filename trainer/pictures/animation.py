"""Write animations: GIF with exact timing, animated WebP, and MP4 (H.264 via PyAV). All atomic."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import DreamLoomError
from ..files.atomic import atomic_path

FORMATS = ("gif", "webp", "mp4")


def gif_durations(n_frames: int, fps: float) -> tuple[list[int], list[str]]:
    """Per-frame GIF delays in ms (multiples of 10, GIF's unit) whose running sum tracks the exact clock.

    Frame i ends at round(i+1 / fps, to 10 ms), so the rounding error never accumulates: the total is
    the requested length to within 5 ms. Notes list what cannot be honoured exactly.
    """
    if fps <= 0 or n_frames < 1:
        raise DreamLoomError(
            f"Cannot time {n_frames} frames at {fps} fps.", "Use at least one frame and a positive fps."
        )
    ends = [round((i + 1) * 100.0 / fps) for i in range(n_frames)]  # centiseconds
    cs = [ends[0]] + [ends[i] - ends[i - 1] for i in range(1, n_frames)]
    notes = []
    if 100.0 / fps != int(100.0 / fps):
        notes.append(
            f"{fps:g} fps is not a whole number of 10 ms ticks; frame delays alternate "
            f"({sorted(set(c * 10 for c in cs))} ms) so the total stays exact"
        )
    if min(cs) < 2:
        notes.append("delays under 20 ms are slowed to 100 ms by most browsers; use 50 fps or less for GIF")
        cs = [max(c, 1) for c in cs]
    return [c * 10 for c in cs], notes


def _global_palette(frames: Sequence, colors: int = 255):
    """One adaptive palette for the whole animation (no colour flicker between frames)."""
    from PIL import Image

    sample = frames[:: max(1, len(frames) // 16)][:16]
    w, h = sample[0].size
    scale = max(1, max(w, h) // 128)
    thumbs = [im.convert("RGB").resize((max(1, w // scale), max(1, h // scale))) for im in sample]
    strip = Image.new("RGB", (thumbs[0].width * len(thumbs), thumbs[0].height))
    for i, th in enumerate(thumbs):
        strip.paste(th, (i * thumbs[0].width, 0))
    return strip.quantize(colors=colors, method=Image.Quantize.MEDIANCUT)


def write_gif(frames: Sequence, path: str | Path, fps: float, loop: bool = True) -> list[str]:
    from PIL import Image

    if not frames:
        raise DreamLoomError("No frames to write.", "Connect a batch of images.")
    durations, notes = gif_durations(len(frames), fps)
    palette = _global_palette(frames)
    quantized = [im.convert("RGB").quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG) for im in frames]
    kwargs = dict(save_all=True, append_images=quantized[1:], duration=durations, disposal=1, optimize=False)
    if loop:
        kwargs["loop"] = 0
    with atomic_path(path) as tmp:
        quantized[0].save(tmp, format="GIF", **kwargs)
    return notes


def write_webp(
    frames: Sequence, path: str | Path, fps: float, loop: bool = True, quality: int = 90, lossless: bool = False
) -> list[str]:
    if not frames:
        raise DreamLoomError("No frames to write.", "Connect a batch of images.")
    ends = [round((i + 1) * 1000.0 / fps) for i in range(len(frames))]
    durations = [ends[0]] + [ends[i] - ends[i - 1] for i in range(1, len(frames))]
    rgb = [im.convert("RGB") for im in frames]
    with atomic_path(path) as tmp:
        rgb[0].save(
            tmp,
            format="WEBP",
            save_all=True,
            append_images=rgb[1:],
            duration=durations,
            loop=0 if loop else 1,
            quality=quality,
            lossless=lossless,
            method=4,
        )
    return []


def write_mp4(frames: Sequence, path: str | Path, fps: float, crf: int = 18) -> list[str]:
    try:
        import av
    except ImportError:
        raise DreamLoomError(
            "MP4 output needs PyAV, which is not installed.", "pip install av  (or save as gif or webp)."
        ) from None
    from fractions import Fraction

    import numpy as np

    if not frames:
        raise DreamLoomError("No frames to write.", "Connect a batch of images.")
    w, h = frames[0].size
    even_w, even_h = w - w % 2, h - h % 2  # yuv420p needs even sizes
    notes = [f"cropped to {even_w}x{even_h} (H.264 needs even sizes)"] if (even_w, even_h) != (w, h) else []
    rate = Fraction(fps).limit_denominator(1001)
    with atomic_path(path) as tmp:
        container = av.open(str(tmp), mode="w", format="mp4")
        try:
            stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "h264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = even_w, even_h, "yuv420p"
            stream.options = {"crf": str(crf)}
            for im in frames:
                arr = np.asarray(im.convert("RGB"))[:even_h, :even_w]
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        finally:
            container.close()
    return notes


def write_animation(
    frames: Sequence, path: str | Path, fps: float, fmt: str | None = None, loop: bool = True
) -> list[str]:
    fmt = (fmt or Path(path).suffix.lstrip(".")).lower()
    if fmt == "gif":
        return write_gif(frames, path, fps, loop)
    if fmt == "webp":
        return write_webp(frames, path, fps, loop)
    if fmt == "mp4":
        return write_mp4(frames, path, fps)
    raise DreamLoomError(f"Unknown animation format {fmt!r}.", f"Use one of: {', '.join(FORMATS)}.")
