"""A pipeline's scheduler config -> process, parameterization and the time grid diffusers would use.

Every field that changes the math is mapped (spacing, offset, Karras / exponential sigmas, final sigma,
`set_alpha_to_one`, shift, dynamic shift from the resolution, terminal shift) or refused with an error that
names the field and the model.  The grid for a request follows the diffusers scheduler that implements
its sampler (Euler's spacing for `euler`, DDIM's for `ddim`, DPM-Solver's for the multistep solvers) on
the checkpoint's own config, which is what `XScheduler.from_config(pipe.scheduler.config)` gives a
diffusers user; any other sampler uses the rule of the checkpoint's own scheduler class.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from samplers import spacing
from samplers.errors import InvalidRequest
from samplers.processes import DiscreteVP, Process, RectifiedFlow

from ..diffusers_loader import (
    CLIP_CLASSES,
    FLOW_SCHEDULERS,
    PREDICTION_TYPES,
    VP_SCHEDULERS,
    UnsupportedConfig,
    data_clip_of,
)
from ..diffusers_loader import map_scheduler_config as _vp_process

SAMPLER_RULES = {"euler": "euler", "ddim": "ddim", "dpmpp_2m": "dpm", "dpmpp_3m": "dpm", "dpmpp_3m_exact": "dpm",
                 "unipc": "dpm"}
CLASS_RULES = {"EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler",
               "DDIMScheduler": "ddim", "DDPMScheduler": "ddim", "PNDMScheduler": "ddim",
               "DPMSolverMultistepScheduler": "dpm", "UniPCMultistepScheduler": "dpm"}
# A field missing from scheduler_config.json takes the default of the scheduler that runs the sampler, as
# diffusers' `from_config` gives it (keys the file lacks are not carried over).
RULE_DEFAULTS = {"euler": {"timestep_spacing": "linspace", "final_sigmas_type": "zero"},
                 "ddim": {"timestep_spacing": "leading", "set_alpha_to_one": True},
                 "dpm": {"timestep_spacing": "linspace", "final_sigmas_type": "zero"}}
VP_CLASSES = VP_SCHEDULERS | {"EulerAncestralDiscreteScheduler"}

# (field, value that is fine): anything else is refused, because the math would silently differ.
_FALSE_OR_DEFAULT = {
    "rescale_betas_zero_snr": False, "use_beta_sigmas": False,
    "use_lu_lambdas": False, "use_flow_sigmas": False, "invert_sigmas": False, "stochastic_sampling": False,
    "timestep_type": "discrete", "interpolation_type": "linear", "sigma_min": None, "sigma_max": None,
}
_WHY = {
    "rescale_betas_zero_snr": "zero terminal SNR is not supported",
    "use_beta_sigmas": "beta-distributed sigmas are not supported",
    "use_lu_lambdas": "Lu's lambda spacing is not supported (use our uniform_lambda grid)",
    "use_flow_sigmas": "flow sigmas on a discrete scheduler are not supported",
    "invert_sigmas": "inverted sigmas are not supported",
    "stochastic_sampling": "stochastic flow sampling is not supported (pick a stochastic sampler instead)",
    "timestep_type": "continuous timesteps are not supported",
    "interpolation_type": "log-linear sigma interpolation is not supported",
    "sigma_min": "a custom sigma range is not supported",
    "sigma_max": "a custom sigma range is not supported",
}


def _refuse_unmapped(config: dict, model: str) -> None:
    for key, fine in _FALSE_OR_DEFAULT.items():
        value = config.get(key, fine)
        if value == fine or (fine is False and value is None):
            continue
        raise UnsupportedConfig(f"model {model!r}: scheduler config field {key!r} = {value!r}: {_WHY[key]}")
    if config.get("lambda_min_clipped", -math.inf) not in (-math.inf, None) and \
            math.isfinite(float(config["lambda_min_clipped"])):
        raise UnsupportedConfig(f"model {model!r}: scheduler config field 'lambda_min_clipped' = "
                                f"{config['lambda_min_clipped']!r}: clipping lambda is not supported")
    if config.get("prediction_type", "epsilon") not in PREDICTION_TYPES and \
            config.get("_class_name") not in FLOW_SCHEDULERS:
        raise UnsupportedConfig(f"model {model!r}: scheduler config field 'prediction_type' = "
                                f"{config.get('prediction_type')!r} is not one of {sorted(PREDICTION_TYPES)}")
    variance = config.get("variance_type")
    if variance not in (None, "fixed_small", "fixed_small_log", "learned", "learned_range"):
        raise UnsupportedConfig(f"model {model!r}: scheduler config field 'variance_type' = {variance!r} is "
                                "not supported")


def _choice(config: dict, model: str, key: str, allowed: tuple, default):
    value = config.get(key, default)
    if value not in allowed:
        raise UnsupportedConfig(f"model {model!r}: scheduler config field {key!r} = {value!r} is not one of "
                                f"{list(allowed)}")
    return value


@dataclass(frozen=True)
class Schedule:
    """The time grid of one checkpoint: `grid(steps, sampler, image_seq_len)` -> decreasing kappas."""

    model: str
    process: Process
    prediction: str
    kind: str  # "diffusion" | "flow"
    config: dict
    sigmas: str = "default"  # default | karras | exponential
    flow_start: str = "scheduler"  # "scheduler" or "pipeline_linspace" (FLUX passes linspace(1, 1/n, n))
    data_clip: Callable | None = None  # the own scheduler's clip_sample / thresholding on x0_hat

    def rule(self, sampler: str) -> str:
        return SAMPLER_RULES.get(sampler, CLASS_RULES.get(self.config.get("_class_name"), "dpm"))

    def grid(self, steps: int, sampler: str = "euler", image_seq_len: int | None = None) -> torch.Tensor:
        if self.kind == "flow":
            return spacing.flow_kappas(self.flow_times(steps, image_seq_len))
        rule = self.rule(sampler)
        config = {**RULE_DEFAULTS[rule], **self.config}
        if rule == "ddim" and "clip_sample" not in config and config.get("_class_name") not in CLIP_CLASSES:
            raise InvalidRequest(f"model {self.model!r}: scheduler config field 'clip_sample' is missing, and "
                                 "diffusers' DDIM then clips the data prediction to [-1, 1], which this model's own "
                                 f"scheduler does not; sampler {sampler!r} is refused on this model (use euler)")
        table = self.process.kappa(torch.arange(len(self.process.betas), dtype=torch.float64)).numpy()
        if rule == "ddim":
            final = "zero" if config["set_alpha_to_one"] else "sigma_min"
            sig = "default"
        else:
            final = config["final_sigmas_type"] or "zero"
            sig = self.sigmas
        return spacing.discrete_vp_grid(table, steps, rule=rule, spacing=config["timestep_spacing"],
                                        offset=int(config.get("steps_offset") or 0), sigmas=sig, final=final)

    def flow_times(self, steps: int, image_seq_len: int | None = None) -> np.ndarray:
        c = self.config
        mu = None
        if c.get("use_dynamic_shifting"):
            if image_seq_len is None:
                raise InvalidRequest(f"model {self.model!r}: use_dynamic_shifting needs the image size")
            mu = spacing.flow_mu(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                 c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        start = np.linspace(1.0, 1.0 / steps, steps) if self.flow_start == "pipeline_linspace" else None
        return spacing.flow_times(steps, num_train=int(c.get("num_train_timesteps", 1000)),
                                  shift=float(c.get("shift", 1.0)), mu=mu,
                                  shift_kind=c.get("time_shift_type", "exponential"),
                                  shift_terminal=c.get("shift_terminal"), sigmas=self.sigmas, start=start)


def map_schedule(config: dict, model: str, flow_start: str = "scheduler") -> Schedule:
    """Map a pipeline's scheduler config, refusing every field whose math we would not reproduce."""
    cls = config.get("_class_name")
    if cls not in VP_CLASSES | FLOW_SCHEDULERS:
        raise UnsupportedConfig(f"model {model!r}: scheduler config field '_class_name' = {cls!r} is not one of "
                                f"{sorted(VP_CLASSES | FLOW_SCHEDULERS)}")
    _refuse_unmapped(config, model)
    clip = data_clip_of(config, model)
    karras, expo = bool(config.get("use_karras_sigmas")), bool(config.get("use_exponential_sigmas"))
    if karras and expo:
        raise UnsupportedConfig(f"model {model!r}: scheduler config fields 'use_karras_sigmas' and "
                                "'use_exponential_sigmas' are both set")
    sigmas = "karras" if karras else "exponential" if expo else "default"
    if cls in FLOW_SCHEDULERS:
        _choice(config, model, "time_shift_type", ("exponential", "linear"), "exponential")
        if float(config.get("shift", 1.0)) <= 0:
            raise UnsupportedConfig(f"model {model!r}: scheduler config field 'shift' must be positive")
        terminal = config.get("shift_terminal")
        if terminal is not None and not 0 < float(terminal) < 1:
            raise UnsupportedConfig(f"model {model!r}: scheduler config field 'shift_terminal' = {terminal!r} "
                                    "must lie in (0, 1)")
        # a wide time range: at hundreds of steps the second level of a shifted grid lies above t = 0.999
        return Schedule(model, RectifiedFlow(t_min=1e-6, t_max=1 - 1e-7), "velocity", "flow", dict(config), sigmas,
                        flow_start, clip)
    _choice(config, model, "timestep_spacing", spacing.SPACINGS, "leading")
    _choice(config, model, "final_sigmas_type", ("zero", "sigma_min", None), "zero")
    try:
        mapping = _vp_process(dict(config, _class_name="DDIMScheduler"))
    except UnsupportedConfig as err:
        raise UnsupportedConfig(f"model {model!r}: {err}") from None
    process = mapping.process
    if not isinstance(process, DiscreteVP):
        raise UnsupportedConfig(f"model {model!r}: scheduler config does not describe a discrete VP process")
    return Schedule(model, process, mapping.prediction, "diffusion", dict(config), sigmas, flow_start, clip)
