"""DiT (Peebles & Xie 2023): class-conditional latent transformer with learned sigma, SD's VAE.

Conventions of diffusers' DiTPipeline: cond is a class label per sample; classifier-free guidance uses the
null class 1000 (the pipeline's constant); the network outputs 2C channels with learned sigma, of which the
first C are eps (the variance half only feeds DDPM's learned-variance step, which our samplers do not
use); initial latents are unit noise at the first timestep; images are decoded from latents /
scaling_factor at the transformer's native size only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..diffusers_loader import load_scheduler_config
from .common import LatentDenoiser, check_components, load_component, read_model_index
from .common import vae_decoder as make_decoder
from .pipeline import LatentPipeline
from .schedule import map_schedule

CLASSES = {
    "transformer": ("DiTTransformer2DModel", "Transformer2DModel"),
    "vae": ("AutoencoderKL",),
    "scheduler": ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                  "UniPCMultistepScheduler", "PNDMScheduler"),
}
NULL_CLASS = 1000  # DiTPipeline's class_null


def transformer_net(transformer, channels: int):
    """The batchable DiT call: eps = the first `channels` output channels (learned sigma dropped)."""
    device, dtype = transformer.device, transformer.dtype

    def net(x_t, timestep, cond):
        with torch.inference_mode():
            out = transformer(x_t.to(device, dtype), timestep=timestep.to(device),
                              class_labels=cond["class_labels"].to(device)).sample
        return out[:, :channels].float().cpu()
    return net


def load(directory: Path, model: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LatentPipeline:
    """Load a DiTPipeline directory (safetensors only, local files only)."""
    import diffusers
    from diffusers import AutoencoderKL

    index = read_model_index(directory)
    found = check_components(directory, index, CLASSES, model, ("transformer", "vae"))
    schedule = map_schedule(load_scheduler_config(directory), model)
    transformer = load_component(getattr(diffusers, found["transformer"]), directory, "transformer", dtype, device)
    vae = load_component(AutoencoderKL, directory, "vae", dtype, device)
    channels = transformer.config.in_channels
    size = int(transformer.config.sample_size)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    native = (size * factor, size * factor)
    num_classes = int(transformer.config.num_embeds_ada_norm)

    def latent_shape(height: int, width: int) -> tuple[int, ...]:
        return (channels, height // factor, width // factor)

    denoiser = LatentDenoiser(transformer_net(transformer, channels), schedule.process, schedule.prediction,
                              latent_shape, "diffusion", 1.0, latent_shape(*native), num_classes=num_classes)
    pipeline = LatentPipeline(model, "dit", None, denoiser, make_decoder(vae, dtype), schedule, factor, native,
                              default_steps=50, default_guidance=4.0, num_classes=num_classes,
                              info={"null_class": NULL_CLASS, "sizes": [native]})
    return pipeline
