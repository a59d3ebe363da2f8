"""FLUX.1 dev / schnell (Black Forest Labs 2024): CLIP pooled + T5, FluxTransformer2DModel on packed latents.

Conventions of diffusers' FluxPipeline: CLIP's pooled output (max length 77) and T5's last hidden state
(max_sequence_length 512); the sampler sees ordinary (C, h, w) latents and the network packs 2x2 patches
into tokens (B, h/2 * w/2, 4C) with image ids (row, column) and zero text ids; the transformer predicts the
flow velocity at timestep = t (the pipeline's timestep / 1000); the time grid is linspace(1, 1/n, n) under
the exponential shift with mu linear in the number of tokens; FLUX-dev's distilled guidance is a
per-sample `guidance` input (`distilled_guidance`, default 3.5); true CFG with a negative prompt is our
guidance wrapper, as diffusers' `true_cfg_scale`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .common import LatentDenoiser, TextConditioner, check_components, load_component, load_tokenizer, read_model_index
from .common import vae_decoder as make_decoder
from .pipeline import LatentPipeline
from .schedule import map_schedule
from .sd3 import padded_ids

CLASSES = {
    "transformer": ("FluxTransformer2DModel",),
    "scheduler": ("FlowMatchEulerDiscreteScheduler",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "text_encoder_2": ("T5EncoderModel",),
    "tokenizer_2": ("T5Tokenizer", "T5TokenizerFast"),
    "image_encoder": ("CLIPVisionModelWithProjection",),
    "feature_extractor": ("CLIPImageProcessor",),
}
OPTIONAL = ("image_encoder", "feature_extractor")
MAX_T5 = 512
DEV_GUIDANCE = 3.5


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches as tokens (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """(h/2 * w/2, 3) positions (0, row, column) of the packed tokens."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def flux_encoder(clip, t5):
    def encode(tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            pooled = clip(tokens["ids_1"].to(clip.device), output_hidden_states=False).pooler_output
            hidden = t5(tokens["ids_2"].to(t5.device), output_hidden_states=False)[0]
        return {"encoder_hidden_states": hidden.float().cpu(), "pooled_projections": pooled.float().cpu()}
    return encode


def transformer_net(transformer):
    """The batchable FLUX call on packed tokens; unpacks the velocity back to (B, C, h, w)."""
    device, dtype = transformer.device, transformer.dtype

    def net(x_t, timestep, cond):
        h, w = x_t.shape[-2:]
        text = cond["encoder_hidden_states"]
        guidance = cond.get("guidance")
        with torch.inference_mode():
            out = transformer(hidden_states=pack(x_t).to(device, dtype), timestep=timestep.to(device, dtype),
                              guidance=None if guidance is None else guidance.to(device, torch.float32),
                              pooled_projections=cond["pooled_projections"].to(device, dtype),
                              encoder_hidden_states=text.to(device, dtype),
                              txt_ids=torch.zeros(text.shape[1], 3, device=device, dtype=dtype),
                              img_ids=image_ids(h, w).to(device, dtype)).sample
        return unpack(out.float().cpu(), h, w)
    return net


def load(directory: Path, model: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LatentPipeline:
    """Load a FluxPipeline directory (safetensors only, local files only)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    from ..diffusers_loader import load_scheduler_config

    index = read_model_index(directory)
    check_components(directory, index, CLASSES, model, ("transformer", "vae", "text_encoder", "text_encoder_2"),
                     OPTIONAL)
    schedule = map_schedule(load_scheduler_config(directory), model, flow_start="pipeline_linspace")
    transformer = load_component(FluxTransformer2DModel, directory, "transformer", dtype, device)
    clip = load_component(CLIPTextModel, directory, "text_encoder", dtype, device)
    t5 = load_component(T5EncoderModel, directory, "text_encoder_2", dtype, device)
    tok_1 = load_tokenizer(CLIPTokenizer, directory, "tokenizer")
    tok_2 = load_tokenizer(AutoTokenizer, directory, "tokenizer_2")
    vae = load_component(AutoencoderKL, directory, "vae", dtype, device)

    def tokenize(prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"ids_1": padded_ids(tok_1, prompts, tok_1.model_max_length),
                "ids_2": padded_ids(tok_2, prompts, MAX_T5)}

    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    channels = transformer.config.in_channels // 4
    distilled = bool(transformer.config.guidance_embeds)

    def latent_shape(height: int, width: int) -> tuple[int, ...]:
        return (channels, height // factor, width // factor)

    def extra_cond(height: int, width: int, n: int, extras: dict) -> dict:
        if not distilled:
            return {}
        g = extras.get("distilled_guidance")
        return {"guidance": torch.full((n,), DEV_GUIDANCE if g is None else float(g), dtype=torch.float32)}

    size = 1024
    denoiser = LatentDenoiser(transformer_net(transformer), schedule.process, "velocity", latent_shape, "flow", 1.0,
                              latent_shape(size, size))
    return LatentPipeline(model, "flux", TextConditioner(tokenize, flux_encoder(clip, t5)), denoiser,
                          make_decoder(vae, dtype), schedule, factor, (size, size),
                          default_steps=28 if distilled else 4, default_guidance=None, patch=2,
                          extra_cond=extra_cond, info={"distilled_guidance": distilled})
