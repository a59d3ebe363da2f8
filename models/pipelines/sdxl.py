"""Stable Diffusion XL (Podell et al. 2023): two CLIPs, pooled text embeddings and size/crop time ids.

Conventions of diffusers' StableDiffusionXLPipeline: each CLIP pads to its own tokenizer's max length and
gives its penultimate hidden states (concatenated on the feature axis); the pooled, projected output of
the second encoder is `text_embeds`; `time_ids` = (original height, width, crop top, left, target height,
width) = (H, W, 0, 0, H, W) for both halves; with `force_zeros_for_empty_prompt` (model_index.json) a
request without a negative prompt gets zeros as its unconditional embeddings.  The VAE runs in float32
under float16 weights when its config says `force_upcast`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..diffusers_loader import UnsupportedConfig, load_scheduler_config
from .common import LatentDenoiser, TextConditioner, check_components, load_component, load_tokenizer, read_model_index
from .common import vae_decoder as make_decoder
from .pipeline import LatentPipeline
from .schedule import map_schedule
from .sd import CLASSES as SD_CLASSES
from .sd import unet_net
from .sd3 import clip_penultimate, padded_ids

CLASSES = {
    "unet": ("UNet2DConditionModel",),
    "scheduler": SD_CLASSES["scheduler"],
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "text_encoder_2": ("CLIPTextModelWithProjection",),
    "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "image_encoder": ("CLIPVisionModelWithProjection",),
    "feature_extractor": ("CLIPImageProcessor",),
}
OPTIONAL = ("image_encoder", "feature_extractor")


def sdxl_encoder(clip_1, clip_2):
    def encode(tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            h1, _ = clip_penultimate(clip_1, tokens["ids_1"])
            h2, pooled = clip_penultimate(clip_2, tokens["ids_2"])
        return {"encoder_hidden_states": torch.cat([h1, h2.to(h1.device)], -1).float().cpu(),
                "text_embeds": pooled.float().cpu()}
    return encode


def load(directory: Path, model: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LatentPipeline:
    """Load a StableDiffusionXLPipeline directory (safetensors only, local files only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    index = read_model_index(directory)
    check_components(directory, index, CLASSES, model, ("unet", "vae", "text_encoder", "text_encoder_2"), OPTIONAL)
    schedule = map_schedule(load_scheduler_config(directory), model)
    unet = load_component(UNet2DConditionModel, directory, "unet", dtype, device)
    clip_1 = load_component(CLIPTextModel, directory, "text_encoder", dtype, device)
    clip_2 = load_component(CLIPTextModelWithProjection, directory, "text_encoder_2", dtype, device)
    tok_1 = load_tokenizer(CLIPTokenizer, directory, "tokenizer")
    tok_2 = load_tokenizer(CLIPTokenizer, directory, "tokenizer_2")
    vae = load_component(AutoencoderKL, directory, "vae", dtype, device)
    if getattr(vae.config, "latents_mean", None) is not None:
        raise UnsupportedConfig(f"model {model!r}: vae config field 'latents_mean' (per-channel latent "
                                "normalization) is not supported")

    def tokenize(prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"ids_1": padded_ids(tok_1, prompts, tok_1.model_max_length),
                "ids_2": padded_ids(tok_2, prompts, tok_2.model_max_length)}

    def extra_cond(height: int, width: int, n: int, extras: dict) -> dict:
        ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)
        return {"time_ids": ids.expand(n, 6).clone()}

    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    channels = unet.config.in_channels
    size = int(unet.config.sample_size) * factor

    def latent_shape(height: int, width: int) -> tuple[int, ...]:
        return (channels, height // factor, width // factor)

    denoiser = LatentDenoiser(unet_net(unet), schedule.process, schedule.prediction, latent_shape, "diffusion",
                              1.0, latent_shape(size, size))
    return LatentPipeline(model, "sdxl", TextConditioner(tokenize, sdxl_encoder(clip_1, clip_2)), denoiser,
                          make_decoder(vae, dtype), schedule, factor, (size, size), default_steps=50,
                          default_guidance=5.0, extra_cond=extra_cond,
                          zero_negative=bool(index.get("force_zeros_for_empty_prompt", True)))
