"""Stable Diffusion 1.x / 2.x (Rombach et al. 2022): CLIP text encoder, UNet2DConditionModel, AutoencoderKL.

Conventions of diffusers' StableDiffusionPipeline: prompts padded to the tokenizer's max length (77) and
encoded to CLIP's last hidden state (with an attention mask only when the encoder config asks for one);
the empty string is the default negative prompt; the UNet predicts eps or v on the scheduler's discrete
VP; latents have 4 channels at 1/8 of the image size and are divided by the VAE's scaling factor.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .common import (
    LatentDenoiser,
    TextConditioner,
    check_components,
    load_component,
    load_tokenizer,
    read_model_index,
    vae_decoder,
)
from .pipeline import LatentPipeline
from .schedule import map_schedule

CLASSES = {
    "unet": ("UNet2DConditionModel",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "vae": ("AutoencoderKL",),
    "scheduler": ("PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
                  "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                  ),
    "safety_checker": ("StableDiffusionSafetyChecker",),
    "feature_extractor": ("CLIPImageProcessor", "CLIPFeatureExtractor"),
    "image_encoder": ("CLIPVisionModelWithProjection",),
}
OPTIONAL = ("safety_checker", "feature_extractor", "image_encoder")
PIPELINES = ("StableDiffusionPipeline",)


def clip_tokenize(tokenizer, key: str = "input_ids"):
    """Prompts -> (N, max_length) token ids, padded and truncated to the tokenizer's max length."""
    def tokenize(prompts: list[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt")
        out = {key: enc.input_ids}
        out[key.replace("input_ids", "attention_mask")] = enc.attention_mask
        return out
    return tokenize


def clip_last_hidden(encoder):
    """CLIP's last hidden state (StableDiffusionPipeline.encode_prompt without clip_skip)."""
    use_mask = bool(getattr(encoder.config, "use_attention_mask", False))
    device = encoder.device

    def encode(tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = tokens["attention_mask"].to(device) if use_mask else None
        with torch.inference_mode():
            hidden = encoder(tokens["input_ids"].to(device), attention_mask=mask)[0]
        return {"encoder_hidden_states": hidden.float().cpu()}
    return encode


def unet_net(unet):
    """The batchable UNet call: per-sample timesteps, text embeddings (and SDXL's pooled text_embeds and
    time_ids), in the UNet's dtype and device."""
    device, dtype = unet.device, unet.dtype
    learned = unet.config.out_channels == 2 * unet.config.in_channels

    def net(x_t, timestep, cond):
        added = {k: cond[k].to(device, dtype) for k in ("text_embeds", "time_ids") if k in cond}  # SDXL
        with torch.inference_mode():
            out = unet(x_t.to(device, dtype), timestep.to(device),
                       encoder_hidden_states=cond["encoder_hidden_states"].to(device, dtype),
                       added_cond_kwargs=added or None).sample
        out = out[:, : unet.config.in_channels] if learned else out
        return out.float().cpu()
    return net


def load(directory: Path, model: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LatentPipeline:
    """Load a StableDiffusionPipeline directory (safetensors only, local files only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    index = read_model_index(directory)
    check_components(directory, index, CLASSES, model, ("unet", "text_encoder", "vae"), OPTIONAL)
    schedule = map_schedule(_scheduler_config(directory), model)
    unet = load_component(UNet2DConditionModel, directory, "unet", dtype, device)
    encoder = load_component(CLIPTextModel, directory, "text_encoder", dtype, device)
    vae = load_component(AutoencoderKL, directory, "vae", dtype, device)
    tokenizer = load_tokenizer(CLIPTokenizer, directory, "tokenizer")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    channels = unet.config.in_channels
    size = int(unet.config.sample_size) * factor

    def latent_shape(height: int, width: int) -> tuple[int, ...]:
        return (channels, height // factor, width // factor)

    denoiser = LatentDenoiser(unet_net(unet), schedule.process, schedule.prediction, latent_shape, "diffusion",
                              1.0, latent_shape(size, size))
    text = TextConditioner(clip_tokenize(tokenizer), clip_last_hidden(encoder))
    return LatentPipeline(model, "sd", text, denoiser, vae_decoder(vae, dtype), schedule, factor, (size, size),
                          default_steps=50, default_guidance=7.5)


def _scheduler_config(directory: Path) -> dict:
    """StableDiffusionPipeline.__init__ rewrites an outdated scheduler config: steps_offset -> 1 and
    clip_sample -> false (so its DDIM / DDPM never clip x0_hat); so do we."""
    from ..diffusers_loader import load_scheduler_config

    return dict(load_scheduler_config(directory), steps_offset=1, clip_sample=False)
