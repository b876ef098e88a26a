"""ComfyUI IMAGE tensors ([batch, height, width, 3] floats in 0..1) to and from pictures and files.

The one place the nodes convert images; numpy, torch and Pillow are imported when a node runs, not when
the pack is imported.
"""

from __future__ import annotations


def batch_to_uint8(images):
    """IMAGE tensor -> uint8 array [batch, height, width, channels], rounded."""
    import numpy as np

    return (images.detach().cpu().float().clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)


def batch_to_pil(images) -> list:
    """IMAGE tensor -> RGB PIL images."""
    from PIL import Image

    return [
        Image.fromarray(a[..., :3] if a.shape[-1] >= 3 else a[..., 0]).convert("RGB") for a in batch_to_uint8(images)
    ]


def pil_to_batch(pictures: list):
    """PIL images of one size -> IMAGE tensor."""
    import numpy as np
    import torch

    return torch.from_numpy(np.stack([np.asarray(p.convert("RGB"), dtype=np.float32) / 255.0 for p in pictures]))


def files_to_batch(paths: list, square: int | None = None):
    """Image files -> IMAGE tensor: centre-cropped to `square` pixels, or all resized to the first one's size.

    No files gives one black 64 px image, so a node always has an IMAGE to return.
    """
    import torch
    from PIL import Image

    if not paths:
        return torch.zeros((1, 64, 64, 3))
    pictures = []
    for path in paths:
        with Image.open(path) as im:
            im = im.convert("RGB")
        if square is not None:
            from ..trainer.data.images import crop_resize

            im = crop_resize(im, square) if im.size != (square, square) else im
        elif pictures and im.size != pictures[0].size:
            im = im.resize(pictures[0].size)
        pictures.append(im)
    return pil_to_batch(pictures)
