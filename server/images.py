"""Turn samples into pictures: PNGs at native resolution, optionally upscaled (nearest neighbour) for people."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image


def to_uint8(samples: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((samples.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid_png(samples: torch.Tensor, scale: int = 1, pad: int = 1) -> bytes:
    """A PNG of all samples in a near-square grid, each upscaled by `scale` (nearest neighbour; 1: native)."""
    images = to_uint8(samples)
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cell_h, cell_w = h * scale + pad, w * scale + pad
    canvas = np.full((rows * cell_h + pad, cols * cell_w + pad, c), 255, dtype=np.uint8)
    for k, img in enumerate(images):
        r, q = divmod(k, cols)
        big = img.repeat(scale, axis=0).repeat(scale, axis=1)
        canvas[pad + r * cell_h: pad + r * cell_h + h * scale, pad + q * cell_w: pad + q * cell_w + w * scale] = big
    mode = "L" if c == 1 else "RGB"
    buf = io.BytesIO()
    Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode=mode).save(buf, format="PNG")
    return buf.getvalue()
