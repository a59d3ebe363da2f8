"""Flow-map (average-velocity) checkpoints in diffusers' convention, served as images by our `meanflow` sampler.

diffusers 0.42's flow-map convention is AnyFlow's (Gu et al. 2026; `AnyFlowPipeline`,
`FlowMapEulerDiscreteScheduler`): on the linear path z_t = (1 - t) x + t eps the transformer is called with
`timestep = 1000 t` and `r_timestep = 1000 r` (its config's `deltatime_type` says whether it embeds r or
t - r: the checkpoint's business, both load) and returns u with z_r = z_t - (t - r) u; that is MeanFlow's
average velocity u(z_t, r, t) (Geng et al. 2025, eq. 12), so `meanflow` runs it unchanged.  The grid is the
scheduler's: times shift * s / (1 + (shift - 1) s) over s = linspace(1, 0, N + 1)[:-1], then 0.

The only such transformer class is `AnyFlowTransformer3DModel` (Wan2.1's video DiT with a second time
embedding), with UMT5 text and the 3-D `AutoencoderKLWan`.  We serve ONE frame (num_frames = 1: one latent
frame, (C, h, w) per sample), text-conditioned: prompts cleaned as the pipeline does (html unescape,
whitespace; ftfy when installed, as diffusers), UMT5 over `max_sequence_length` tokens with the positions past
each prompt zeroed, classifier-free guidance on u with the negative prompt ("" by default; the released
checkpoints fuse CFG, default guidance 1), latents denormalized by the VAE's latents_mean / latents_std.
Not served: videos (num_frames > 1), conditioning frames (`video`), AnyFlow-FAR (causal chunks), image
conditioning (`image_dim`), and samplers other than `meanflow` (`use_mean_velocity=False` would be flow).
"""

from __future__ import annotations

import html
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from samplers.calls import NetworkCall
from samplers.denoiser import cat_cond, guidance_halves
from samplers.processes import F64, RectifiedFlow

from ..diffusers_loader import UnsupportedConfig, load_scheduler_config
from .common import (
    NEG,
    TextConditioner,
    check_components,
    load_component,
    load_tokenizer,
    read_model_index,
    weight_variant,
)
from .pipeline import LatentPipeline

CLASSES = {
    "transformer": ("AnyFlowTransformer3DModel",),
    "text_encoder": ("UMT5EncoderModel",),
    "tokenizer": ("T5Tokenizer", "T5TokenizerFast", "AutoTokenizer"),
    "vae": ("AutoencoderKLWan",),
    "scheduler": ("FlowMapEulerDiscreteScheduler",),
}
MAX_TEXT = 512  # AnyFlowPipeline.__call__'s max_sequence_length
SCHEDULER_FIELDS = {"_class_name", "_diffusers_version", "num_train_timesteps", "shift"}


def clean_prompt(text: str) -> str:
    """The Wan / AnyFlow prompt cleaning: ftfy's fix when installed, html unescaped twice, whitespace collapsed."""
    if importlib.util.find_spec("ftfy") is not None:
        import ftfy

        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def umt5_encoder(encoder):
    """UMT5's last hidden state with the positions past each prompt zeroed (the pipeline's trim and re-pad)."""
    def encode(tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = tokens["attention_mask"]
        with torch.inference_mode():
            hidden = encoder(tokens["input_ids"].to(encoder.device), mask.to(encoder.device)).last_hidden_state
        return {"encoder_hidden_states": (hidden.float().cpu() * mask[..., None]).float()}
    return encode


def transformer_net(transformer):
    """u over one frame: (N, C, h, w) as (N, F = 1, C, h, w), float64 timesteps as the pipeline passes them."""
    device, dtype = transformer.device, transformer.dtype

    def net(z, r_timestep, t_timestep, cond):
        with torch.inference_mode():
            out = transformer(hidden_states=z.unsqueeze(1).to(device, dtype), timestep=t_timestep[:, None].to(device),
                              r_timestep=r_timestep[:, None].to(device),
                              encoder_hidden_states=cond["encoder_hidden_states"].to(device, dtype)).sample
        return out[:, 0].float().cpu()
    return net


@dataclass(frozen=True, eq=False)
class FlowMapVelocity:
    """The average velocity u(z, r, t, cond) of a flow-map transformer (samplers/meanflow.py's contract)."""

    net: Callable
    latent_shape: Callable[[int, int], tuple[int, ...]]
    shape: tuple[int, ...] | None = None
    time_scale: float = 1000.0
    kind: str = "meanflow"
    num_classes: int | None = None
    sigma_min: float = 0.0  # the schedule is time t itself, in [0, 1]
    sigma_max: float = 1.0
    process: RectifiedFlow = field(default_factory=RectifiedFlow)
    data_clip: None = None

    def network_call(self, z, r, t, cond=None) -> NetworkCall:
        n = z.shape[0]
        r = torch.as_tensor(r, dtype=F64).expand(n) * self.time_scale
        t = torch.as_tensor(t, dtype=F64).expand(n) * self.time_scale
        own = {k: v for k, v in (cond or {}).items() if not k.startswith(NEG)}
        return NetworkCall(self.net, (z.to(torch.float32), r, t, own), lambda out: out.to(z.dtype))

    def guided(self, scale: float, rescale: float = 0.0) -> VelocityGuidance:
        return VelocityGuidance(self, scale)

    def __call__(self, z, r, t, cond=None):
        return self.network_call(z, r, t, cond).run()


@dataclass(frozen=True, eq=False)
class VelocityGuidance:
    """Classifier-free guidance on u (Ho & Salimans 2022, as AnyFlowPipeline combines its velocities):
    u_neg + w (u_cond - u_neg), both halves in one network call."""

    model: FlowMapVelocity
    scale: float

    def __getattr__(self, name):
        return getattr(self.model, name)

    def network_call(self, z, r, t, cond) -> NetworkCall:
        n = z.shape[0]
        r, t = torch.as_tensor(r, dtype=F64).expand(n), torch.as_tensor(t, dtype=F64).expand(n)
        both = cat_cond(*guidance_halves(cond))
        call = self.model.network_call(torch.cat([z, z]), torch.cat([r, r]), torch.cat([t, t]), both)
        return call.then(self._combine)

    def _combine(self, out):
        u_cond, u_neg = out.chunk(2)
        return u_neg + self.scale * (u_cond - u_neg)

    def __call__(self, z, r, t, cond=None):
        return self.network_call(z, r, t, cond).run()


@dataclass(frozen=True)
class FlowMapSchedule:
    """FlowMapEulerDiscreteScheduler's times for N steps (1 -> 0, shifted), the `meanflow` sampler's schedule."""

    model: str
    config: dict
    process: RectifiedFlow = field(default_factory=RectifiedFlow)
    kind: str = "meanflow"
    data_clip: None = None

    def grid(self, steps: int, sampler: str = "meanflow", image_seq_len: int | None = None) -> torch.Tensor:
        shift = float(self.config.get("shift", 1.0))
        s = torch.linspace(1.0, 0.0, steps + 1, dtype=F64)[:-1]
        if shift != 1.0:
            s = shift * s / (1 + (shift - 1) * s)
        return torch.cat([s, s.new_zeros(1)])


def map_flowmap_schedule(config: dict, model: str) -> FlowMapSchedule:
    unknown = sorted(set(config) - SCHEDULER_FIELDS)
    if unknown:
        raise UnsupportedConfig(f"model {model!r}: scheduler config field {unknown[0]!r} is not a "
                                "FlowMapEulerDiscreteScheduler field we map")
    shift = config.get("shift", 1.0)
    if isinstance(shift, bool) or not isinstance(shift, int | float) or not np.isfinite(shift) or shift <= 0:
        raise UnsupportedConfig(f"model {model!r}: scheduler config field 'shift' = {shift!r} must be positive")
    return FlowMapSchedule(model, dict(config))


@dataclass(frozen=True, eq=False)
class WanFrameDecoder:
    """latents (N, C, h, w) -> images (N, 3, H, W) in [-1, 1]: one frame of AutoencoderKLWan, denormalized
    as the pipeline does (latents / (1 / latents_std) + latents_mean)."""

    vae: torch.nn.Module
    dtype: torch.dtype = torch.float32

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        z = latents.to(self.dtype).unsqueeze(2)
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(z.dtype)
        inv_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(z.dtype)
        device = next(self.vae.parameters()).device
        with torch.inference_mode():
            video = self.vae.decode((z / inv_std + mean).to(device)).sample
        return video[:, :, 0].float().clamp(-1, 1).cpu()

    def decode_call(self, latents: torch.Tensor, size: tuple[int, int] | None = None) -> NetworkCall:
        if size is not None:
            raise ValueError("flow-map pipelines generate at the requested size (no resolution binning)")
        return NetworkCall(self, (latents.to(torch.float32),))


def load_transformer(cls, folder: Path, dtype: torch.dtype, device: str):
    """from_config + the safetensors state dict (strict), since from_pretrained needs `accelerate` for a class
    with `_keep_in_fp32_modules`; those modules stay float32 under a lower dtype, as diffusers keeps them."""
    from safetensors.torch import load_file

    variant = weight_variant(folder)
    files = sorted(p for p in Path(folder).glob("*.safetensors") if (variant is None) == (".fp16." not in p.name))
    state = {}
    for path in files:
        state.update(load_file(str(path)))
    module = cls.from_config(cls.load_config(folder))
    module.load_state_dict(state, strict=True)
    module = module.to(device=device, dtype=dtype)
    for name, sub in module.named_modules():
        if any(key in name.split(".") for key in cls._keep_in_fp32_modules or ()):
            sub.float()
    for name, param in module.named_parameters(recurse=True):
        if any(key in name.split(".") for key in cls._keep_in_fp32_modules or ()):
            param.data = param.data.float()
    return module.eval().requires_grad_(False)


def load(directory: Path, model: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LatentPipeline:
    """Load an AnyFlowPipeline directory as a one-frame text-to-image flow-map model (safetensors only)."""
    from diffusers import AnyFlowTransformer3DModel, AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    index = read_model_index(directory)
    check_components(directory, index, CLASSES, model, ("transformer", "text_encoder", "vae"))
    schedule = map_flowmap_schedule(load_scheduler_config(directory), model)
    config = AnyFlowTransformer3DModel.load_config(directory / "transformer")
    if config.get("image_dim") is not None:
        raise UnsupportedConfig(f"model {model!r}: transformer config field 'image_dim' = {config['image_dim']!r}: "
                                "image-conditioned flow maps are not served")
    if config.get("deltatime_type", "r") not in ("r", "t-r"):
        raise UnsupportedConfig(f"model {model!r}: transformer config field 'deltatime_type' = "
                                f"{config['deltatime_type']!r} is not 'r' or 't-r'")
    transformer = load_transformer(AnyFlowTransformer3DModel, directory / "transformer", dtype, device)
    encoder = load_component(UMT5EncoderModel, directory, "text_encoder", dtype, device)
    tokenizer = load_tokenizer(AutoTokenizer, directory, "tokenizer")
    vae = load_component(AutoencoderKLWan, directory, "vae", dtype, device)

    def tokenize(prompts: list[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=MAX_TEXT,
                        truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}

    factor = int(vae.config.scale_factor_spatial)
    patch = int(transformer.config.patch_size[1])
    channels = int(transformer.config.in_channels)

    def latent_shape(height: int, width: int) -> tuple[int, ...]:
        return (channels, height // factor, width // factor)

    max_side = int(transformer.config.rope_max_seq_len) * patch * factor  # its rotary table's reach, in pixels
    default = (480, 832) if max_side >= 832 else (max_side, max_side)  # AnyFlowPipeline's default size if it fits
    velocity = FlowMapVelocity(transformer_net(transformer), latent_shape, latent_shape(*default))
    return LatentPipeline(model, "flowmap", TextConditioner(tokenize, umt5_encoder(encoder)), velocity,
                          WanFrameDecoder(vae, dtype), schedule, factor, default, default_steps=4,
                          default_guidance=1.0, patch=patch, info={"max_side": max_side})
