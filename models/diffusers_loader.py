"""Load diffusers-format checkpoints from local disk and normalize them to the samplers' Denoiser.

A directory holds ``unet/`` (UNet2DModel config + safetensors) and ``scheduler/scheduler_config.json``.
The scheduler config decides the process and the parameterization; a field we cannot map is an error
naming the field, never a guess.  Nothing is downloaded and no checkpoint code is executed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from samplers.denoiser import NULL_LABEL, ClipData, Denoiser, DynamicThreshold
from samplers.processes import DiscreteVP, Process, RectifiedFlow, beta_table

from .safety import require_safetensors

VP_SCHEDULERS = {"DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                 "UniPCMultistepScheduler", "PNDMScheduler"}
FLOW_SCHEDULERS = {"FlowMatchEulerDiscreteScheduler"}
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# Flow-scheduler fields that change the math of a pixel model's sampling and have no mapping here
# (latent pipelines map most of them: models/pipelines/schedule.py).
FLOW_REFUSED = ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                "stochastic_sampling")
# VP-scheduler fields a pixel model's grid would ignore (its grid comes from the models config's `grid`).
VP_REFUSED = {"use_karras_sigmas": "set grid = \"karras\" in the models config instead",
              "use_exponential_sigmas": "exponential sigmas are not a pixel-model grid",
              "use_beta_sigmas": "beta-distributed sigmas are not supported",
              "use_lu_lambdas": "set grid = \"uniform_lambda\" in the models config instead",
              "use_flow_sigmas": "flow sigmas on a discrete scheduler are not supported",
              "invert_sigmas": "inverted sigmas are not supported"}
# Where diffusers' schedulers touch the data prediction x0_hat inside `step` (the model's own scheduler):
# DDPM / DDIM clip it (`clip_sample`, default true) unless they threshold it; these threshold it.
CLIP_CLASSES = {"DDPMScheduler", "DDIMScheduler"}
THRESHOLD_CLASSES = {"DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"}


class UnsupportedConfig(ValueError):
    """A checkpoint's config asks for something diffserve cannot map faithfully."""


@dataclass(frozen=True)
class SchedulerMapping:
    process: Process
    prediction: str
    kind: str
    time_scale: float  # network timestep = time_scale * t
    shift: float = 1.0
    data_clip: ClipData | DynamicThreshold | None = None


def _named(model: str | None) -> str:
    return "" if model is None else f"model {model!r}: "


def data_clip_of(config: dict, model: str | None = None) -> ClipData | DynamicThreshold | None:
    """The clip or dynamic threshold the model's own scheduler applies to x0_hat in every step, or None.

    `thresholding` (DDPM, DDIM, DPM-Solver++, UniPC with predict_x0) wins over `clip_sample` (DDPM and DDIM,
    whose default is true), as in their `step`.  A true value on a class that ignores it is refused: the
    checkpoint's intent is unclear (another scheduler would apply it)."""
    cls = config.get("_class_name")
    if config.get("thresholding"):
        applies = cls in THRESHOLD_CLASSES and config.get("algorithm_type", "dpmsolver++") in (
            "dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver") and config.get("predict_x0", True)
        if not applies:
            raise UnsupportedConfig(f"{_named(model)}scheduler config field 'thresholding' = true: {cls} does not "
                                    "apply it here, so its effect is ambiguous; set it to false")
        ratio, top = float(config.get("dynamic_thresholding_ratio", 0.995)), float(config.get("sample_max_value", 1.0))
        if not 0 < ratio <= 1 or not top >= 1:
            raise UnsupportedConfig(f"{_named(model)}scheduler config fields 'dynamic_thresholding_ratio' / "
                                    f"'sample_max_value' = {ratio} / {top}: need 0 < ratio <= 1 and max value >= 1")
        return DynamicThreshold(ratio, top)
    clip = config.get("clip_sample", cls in CLIP_CLASSES)
    if not clip:
        return None
    if cls not in CLIP_CLASSES:
        raise UnsupportedConfig(f"{_named(model)}scheduler config field 'clip_sample' = true: {cls} does not clip, "
                                "so its effect is ambiguous; set it to false")
    limit = float(config.get("clip_sample_range", 1.0))
    if not limit > 0:
        raise UnsupportedConfig(f"{_named(model)}scheduler config field 'clip_sample_range' = {limit}: must be "
                                "positive")
    return ClipData(limit)


def map_scheduler_config(config: dict, model: str | None = None) -> SchedulerMapping:
    """Map a diffusers scheduler config onto (process, prediction type, data clip); unknown values raise,
    naming the field (and `model` when given)."""
    try:
        return _map(config)
    except UnsupportedConfig as err:
        if model is None or str(err).startswith("model "):
            raise
        raise UnsupportedConfig(f"{_named(model)}{err}") from None


def _map(config: dict) -> SchedulerMapping:
    cls = config.get("_class_name")
    if cls in FLOW_SCHEDULERS:
        for key in FLOW_REFUSED:
            if config.get(key):
                raise UnsupportedConfig(f"scheduler config field {key!r}: {config[key]!r} changes the sampling "
                                        "math and is not supported for this model")
        if config.get("use_dynamic_shifting"):
            raise UnsupportedConfig("scheduler config field 'use_dynamic_shifting': resolution-dependent shift "
                                    "is not supported")
        shift = float(config.get("shift", 1.0))
        if shift <= 0:
            raise UnsupportedConfig(f"scheduler config field 'shift': must be positive, got {shift}")
        return SchedulerMapping(RectifiedFlow(), "velocity", "flow",
                                float(config.get("num_train_timesteps", 1000)), shift)
    if cls not in VP_SCHEDULERS:
        raise UnsupportedConfig(f"scheduler config field '_class_name': {cls!r} is not one of "
                                f"{sorted(VP_SCHEDULERS | FLOW_SCHEDULERS)}")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise UnsupportedConfig(f"scheduler config field 'prediction_type': {prediction!r} is not one of "
                                f"{sorted(PREDICTION_TYPES)}")
    steps = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        betas = [float(b) for b in config["trained_betas"]]
    else:
        schedule = config.get("beta_schedule", "linear")
        if schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise UnsupportedConfig(f"scheduler config field 'beta_schedule': {schedule!r} is not supported")
        betas = list(beta_table(schedule, steps, float(config.get("beta_start", 1e-4)),
                                float(config.get("beta_end", 0.02))))
    if config.get("rescale_betas_zero_snr"):
        raise UnsupportedConfig("scheduler config field 'rescale_betas_zero_snr': zero terminal SNR is not supported")
    variance = config.get("variance_type")
    if variance not in (None, "fixed_small", "fixed_small_log", "learned", "learned_range"):
        raise UnsupportedConfig(f"scheduler config field 'variance_type': {variance!r} is not supported (our "
                                "stochastic samplers draw the posterior variance, DDPM's fixed_small)")
    return SchedulerMapping(DiscreteVP(tuple(betas)), PREDICTION_TYPES[prediction], "diffusion", 1.0,
                            data_clip=data_clip_of(config))


def refuse_pixel_grid_fields(config: dict, model: str | None = None) -> None:
    """A pixel model's time grid is the models config's `grid`: scheduler fields that pick another are refused."""
    for key, why in VP_REFUSED.items():
        if config.get(key) and config.get("_class_name") not in FLOW_SCHEDULERS:
            raise UnsupportedConfig(f"{_named(model)}scheduler config field {key!r} = {config[key]!r}: {why}")


def load_scheduler_config(directory: Path) -> dict:
    path = Path(directory) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise UnsupportedConfig("scheduler config: scheduler/scheduler_config.json is missing")
    return json.loads(path.read_text())


def unet_network(unet, time_scale: float, null_class: int | None):
    """net(x_t, t, labels) over a diffusers UNet2DModel: per-sample timesteps, NULL_LABEL -> null class."""
    learned_variance = unet.config.out_channels == 2 * unet.config.in_channels
    dtype = unet.dtype
    device = unet.device

    def net(x_t, t, labels=None):
        timesteps = (torch.as_tensor(t, dtype=torch.float64) * time_scale).to(device=device, dtype=torch.float32)
        class_labels = None
        if unet.config.num_class_embeds is not None:
            if labels is None:
                if null_class is None:
                    raise ValueError("this model needs a class label per sample")
                labels = torch.full((x_t.shape[0],), NULL_LABEL)
            labels = torch.as_tensor(labels).to(device)
            class_labels = torch.where(labels == NULL_LABEL, torch.full_like(labels, null_class or 0), labels)
        with torch.inference_mode():
            out = unet(x_t.to(device=device, dtype=dtype), timesteps, class_labels=class_labels).sample
        if learned_variance:
            out = out[:, : unet.config.in_channels]
        return out.to(device=x_t.device, dtype=x_t.dtype)
    return net


def load_unet_denoiser(directory: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                       null_class: int | None = None, model: str | None = None) -> tuple[Denoiser, SchedulerMapping]:
    """Load ``directory/unet`` + ``directory/scheduler`` as a Denoiser (read-only, eval mode).

    For class-conditional UNets `null_class` is the embedding index trained as "no class" (used by
    classifier-free guidance); the served classes are then 0..num_class_embeds-1 without it.  The
    scheduler's `clip_sample` / `thresholding` become the Denoiser's data clip.  `model` names errors."""
    from diffusers import UNet2DModel

    directory = Path(directory)
    config = load_scheduler_config(directory)
    mapping = map_scheduler_config(config, model)
    refuse_pixel_grid_fields(config, model)
    require_safetensors(directory / "unet", "unet")
    unet = UNet2DModel.from_pretrained(directory / "unet", use_safetensors=True, local_files_only=True,
                                       torch_dtype=dtype)
    unet = unet.to(device).eval().requires_grad_(False)
    embeds = unet.config.num_class_embeds
    if null_class is not None and (embeds is None or null_class != embeds - 1):
        raise UnsupportedConfig(f"null_class: {null_class} must be the last class embedding of this model "
                                f"({None if embeds is None else embeds - 1})")
    num_classes = None if embeds is None else (embeds - 1 if null_class is not None else embeds)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    net = unet_network(unet, mapping.time_scale, null_class)
    return Denoiser(net, mapping.process, mapping.prediction, shape, num_classes, mapping.kind,
                    mapping.data_clip), mapping
