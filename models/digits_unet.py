"""The U-Net shape shared by the digits zoo's diffusion, flow and MeanFlow models.

A diffusers ``UNet2DModel`` for 8x8x1 images: two resolution levels (8x8 -> 4x4) with 32 and 64
channels, one ResNet block per level, GroupNorm(8), no attention (the fused attention kernels have no
forward-mode AD, which MeanFlow training needs, and attention at 4x4 adds little), sinusoidal time
embedding. Class-conditional models add ``num_class_embeds=11``: labels 0..9 and 10 = null
(unconditional, used for classifier-free guidance).
"""

from __future__ import annotations

from typing import Any

from diffusers import UNet2DModel

NULL_CLASS = 10
NUM_CLASS_EMBEDS = 11

DIGITS_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "add_attention": False,
}


def build_digits_unet(class_conditional: bool = True, **overrides: Any) -> UNet2DModel:
    cfg = {**DIGITS_UNET_CONFIG, **overrides}
    if class_conditional:
        cfg["num_class_embeds"] = NUM_CLASS_EMBEDS
    return UNet2DModel(**cfg)
