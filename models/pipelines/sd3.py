"""Stable Diffusion 3 / 3.5 (Esser et al. 2024): two CLIPs + optional T5, SD3Transformer2DModel, rectified flow.

Conventions of diffusers' StableDiffusion3Pipeline: both CLIPs are padded to the first tokenizer's max
length and give their penultimate hidden states (concatenated on the feature axis, zero-padded to T5's
width) and their projected pooled outputs (concatenated); T5 (max_sequence_length 256; zeros when the
pipeline has no T5) follows on the sequence axis.  The transformer predicts the flow velocity at
timestep = 1000 t; latents are 16-channel, decoded as latents / scaling_factor + shift_factor.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .common import LatentDenoiser, TextConditioner, check_components, load_component, load_tokenizer, read_model_index
from .common import vae_decoder as make_decoder
from .pipeline import LatentPipeline
from .schedule import map_schedule

CLASSES = {
    "transformer": ("SD3Transformer2DModel",),
    "scheduler": ("FlowMatchEulerDiscreteScheduler",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModelWithProjection",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "text_encoder_2": ("CLIPTextModelWithProjection",),
    "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "text_encoder_3": ("T5EncoderModel",),
    "tokenizer_3": ("T5Tokenizer", "T5TokenizerFast"),
    "image_encoder": ("SiglipVisionModel",),
    "feature_extractor": ("SiglipImageProcessor",),
}
OPTIONAL = ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
MAX_T5 = 256


def padded_ids(tokenizer, prompts: list[str], length: int) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids


def clip_penultimate(encoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states, projected pooled output) of a CLIPTextModelWithProjection."""
    out = encoder(ids.to(encoder.device), output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def sd3_encoder(clip_1, clip_2, t5, joint_dim: int):
    """Token ids of the three encoders -> encoder_hidden_states and pooled_projections, batched."""
    def encode(tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            h1, p1 = clip_penultimate(clip_1, tokens["ids_1"])
            h2, p2 = clip_penultimate(clip_2, tokens["ids_2"])
            n = h1.shape[0]
            if t5 is None:
                h3 = torch.zeros(n, MAX_T5, joint_dim, dtype=h1.dtype, device=h1.device)
            else:
                h3 = t5(tokens["ids_3"].to(t5.device))[0].to(h1.device)
            clip = torch.cat([h1, h2], dim=-1)
            clip = torch.nn.functional.pad(clip, (0, h3.shape[-1] - clip.shape[-1]))
            hidden = torch.cat([clip, h3.to(clip.dtype)], dim=-2)
        return {"encoder_hidden_states": hidden.float().cpu(),
                "pooled_projections": torch.cat([p1, p2], -1).float().cpu()}
    return encode


def transformer_net(transformer):
    """The batchable SD3 transformer call: velocity at timestep = 1000 t, per sample."""
    device, dtype = transformer.device, transformer.dtype

    def net(x_t, timestep, cond):
        with torch.inference_mode():
            out = transformer(hidden_states=x_t.to(device, dtype), timestep=timestep.to(device, dtype),
                              encoder_hidden_states=cond["encoder_hidden_states"].to(device, dtype),
                              pooled_projections=cond["pooled_projections"].to(device, dtype)).sample
        return out.float().cpu()
    return net


def load(directory: Path, model: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LatentPipeline:
    """Load a StableDiffusion3Pipeline directory (safetensors only, local files only)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

    from ..diffusers_loader import load_scheduler_config

    index = read_model_index(directory)
    found = check_components(directory, index, CLASSES, model,
                             ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"), OPTIONAL)
    schedule = map_schedule(load_scheduler_config(directory), model)
    parts = {"transformer": load_component(SD3Transformer2DModel, directory, "transformer", dtype, device),
             "text_encoder": load_component(CLIPTextModelWithProjection, directory, "text_encoder", dtype, device),
             "text_encoder_2": load_component(CLIPTextModelWithProjection, directory, "text_encoder_2", dtype, device),
             "tokenizer": load_tokenizer(CLIPTokenizer, directory, "tokenizer"),
             "tokenizer_2": load_tokenizer(CLIPTokenizer, directory, "tokenizer_2"),
             "vae": load_component(AutoencoderKL, directory, "vae", dtype, device)}
    if found["text_encoder_3"] is not None:
        parts["text_encoder_3"] = load_component(T5EncoderModel, directory, "text_encoder_3", dtype, device)
        parts["tokenizer_3"] = load_tokenizer(AutoTokenizer, directory, "tokenizer_3")
    return assemble(model, schedule, parts, dtype)


def assemble(model: str, schedule, parts: dict, dtype: torch.dtype = torch.float32) -> LatentPipeline:
    """The served pipeline over already-loaded components (`parts`: the pipeline's component names; T5 may be
    absent or None).  `bench families` uses it to share one in-memory copy with diffusers' pipeline."""
    transformer, vae = parts["transformer"], parts["vae"]
    tok_1, tok_2, tok_3 = parts["tokenizer"], parts["tokenizer_2"], parts.get("tokenizer_3")
    t5 = parts.get("text_encoder_3")
    length = tok_1.model_max_length

    def tokenize(prompts: list[str]) -> dict[str, torch.Tensor]:
        tokens = {"ids_1": padded_ids(tok_1, prompts, length), "ids_2": padded_ids(tok_2, prompts, length)}
        if t5 is not None:
            tokens["ids_3"] = padded_ids(tok_3, prompts, MAX_T5)
        return tokens

    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    channels, patch = transformer.config.in_channels, transformer.config.patch_size
    size = int(transformer.config.sample_size) * factor

    def latent_shape(height: int, width: int) -> tuple[int, ...]:
        return (channels, height // factor, width // factor)

    denoiser = LatentDenoiser(transformer_net(transformer), schedule.process, "velocity", latent_shape, "flow",
                              float(schedule.config.get("num_train_timesteps", 1000)), latent_shape(size, size))
    encoder = sd3_encoder(parts["text_encoder"], parts["text_encoder_2"], t5, transformer.config.joint_attention_dim)
    return LatentPipeline(model, "sd3", TextConditioner(tokenize, encoder), denoiser, make_decoder(vae, dtype),
                          schedule, factor, (size, size), default_steps=28, default_guidance=7.0, patch=patch)
