"""PixArt-Sigma (Chen et al. 2024): T5 with attention mask, PixArtTransformer2DModel, learned sigma.

Conventions of diffusers' PixArtSigmaPipeline: prompts lower-cased and stripped (its caption cleaning
needs bs4 + ftfy and is off without them; we never run it), T5 over 300 tokens with the attention mask
travelling per sample into the transformer's cross-attention; `added_cond_kwargs` resolution and aspect
ratio are None (Sigma); with learned sigma the first C output channels are eps.  Resolution binning (its
default): a request is generated at the nearest aspect-ratio bin of the transformer's sample size and the
decoded image resized (bilinear) and center-cropped back to the requested size. Binning applies to the sample
sizes diffusers has tables for (256 / 128 / 64 / 32); other sample sizes generate at the requested size.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..diffusers_loader import load_scheduler_config
from .common import LatentDenoiser, TextConditioner, check_components, load_component, load_tokenizer, read_model_index
from .common import vae_decoder as make_decoder
from .pipeline import LatentPipeline
from .schedule import map_schedule
from .sd import CLASSES as SD_CLASSES

CLASSES = {
    "transformer": ("PixArtTransformer2DModel",),
    "text_encoder": ("T5EncoderModel",),
    "tokenizer": ("T5Tokenizer", "T5TokenizerFast"),
    "vae": ("AutoencoderKL",),
    "scheduler": SD_CLASSES["scheduler"],
}
MAX_T5 = 300


def t5_masked_encoder(t5):
    def encode(tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = tokens["attention_mask"]
        with torch.inference_mode():
            hidden = t5(tokens["input_ids"].to(t5.device), attention_mask=mask.to(t5.device))[0]
        return {"encoder_hidden_states": hidden.float().cpu(), "encoder_attention_mask": mask.cpu()}
    return encode


def transformer_net(transformer, channels: int):
    device, dtype = transformer.device, transformer.dtype
    learned = transformer.config.out_channels // 2 == channels

    def net(x_t, timestep, cond):
        with torch.inference_mode():
            out = transformer(x_t.to(device, dtype),
                              encoder_hidden_states=cond["encoder_hidden_states"].to(device, dtype),
                              encoder_attention_mask=cond["encoder_attention_mask"].to(device),
                              timestep=timestep.to(device),
                              added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        return (out[:, :channels] if learned else out).float().cpu()
    return net


def load(directory: Path, model: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LatentPipeline:
    """Load a PixArtSigmaPipeline directory (safetensors only, local files only)."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5EncoderModel

    index = read_model_index(directory)
    check_components(directory, index, CLASSES, model, ("transformer", "text_encoder", "vae"))
    schedule = map_schedule(load_scheduler_config(directory), model)
    transformer = load_component(PixArtTransformer2DModel, directory, "transformer", dtype, device)
    t5 = load_component(T5EncoderModel, directory, "text_encoder", dtype, device)
    tokenizer = load_tokenizer(AutoTokenizer, directory, "tokenizer")
    vae = load_component(AutoencoderKL, directory, "vae", dtype, device)

    def tokenize(prompts: list[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer([p.lower().strip() for p in prompts], padding="max_length", max_length=MAX_T5,
                        truncation=True, add_special_tokens=True, return_tensors="pt")
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}

    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    channels = transformer.config.in_channels
    size = int(transformer.config.sample_size) * factor

    def latent_shape(height: int, width: int) -> tuple[int, ...]:
        return (channels, height // factor, width // factor)

    denoiser = LatentDenoiser(transformer_net(transformer, channels), schedule.process, schedule.prediction,
                              latent_shape, "diffusion", 1.0, latent_shape(size, size))
    bins = aspect_ratio_bins(int(transformer.config.sample_size))
    return LatentPipeline(model, "pixart", TextConditioner(tokenize, t5_masked_encoder(t5)), denoiser,
                          make_decoder(vae, dtype), schedule, factor, (size, size), default_steps=20,
                          default_guidance=4.5, patch=int(transformer.config.patch_size),
                          info={"bins": bins} if bins else {})


def aspect_ratio_bins(sample_size: int) -> dict | None:
    """PixArt's aspect-ratio -> (height, width) table for the transformer's sample size (the tables diffusers'
    PixArtSigmaPipeline picks with use_resolution_binning, read from the installed package), or None for a
    sample size without one (diffusers then refuses binning; we generate at the requested size)."""
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as alpha
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as sigma

    tables = {256: sigma.ASPECT_RATIO_2048_BIN, 128: alpha.ASPECT_RATIO_1024_BIN, 64: alpha.ASPECT_RATIO_512_BIN,
              32: alpha.ASPECT_RATIO_256_BIN}
    table = tables.get(sample_size)
    return None if table is None else {k: (int(v[0]), int(v[1])) for k, v in table.items()}
