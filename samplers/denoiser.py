"""The one model contract the samplers see, and the adapters that produce it.

A `Denoiser` is called as ``model(x, sigma, cond) -> x0_hat`` in VE coordinates: ``x = x_t / alpha(t)``
and ``sigma = sigma(t) / alpha(t)`` (one value per sample).  Every checkpoint is wrapped once, at load
time, by the adapter for its parameterization (eps, v, x0 or flow velocity), the way DPM-Solver's
``model_wrapper`` and EDM's preconditioners normalize models before any solver sees them.

``cond`` is a LongTensor of class labels, one per sample, with ``NULL_LABEL`` (-1) meaning
unconditional, or None for an unconditional call; latent pipelines (models/pipelines) pass a dict of
per-sample tensors instead, whose ``neg.*`` entries are the unconditional (negative-prompt) half.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .calls import NetworkCall, evaluate
from .errors import InvalidRequest
from .processes import Process, RectifiedFlow

NULL_LABEL = -1
NEG = "neg."  # prefix of the unconditional (negative-prompt) entries of a dict cond

# net(x_t, t, labels) -> raw prediction, all in the model's own coordinates; t has one entry per sample.
Network = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def eps_to_x0(x_t, out, alpha, sigma, process):
    return (x_t - sigma * out) / alpha


def v_to_x0(x_t, out, alpha, sigma, process):
    # v = alpha eps - sigma x0 (Salimans & Ho 2022), valid for variance-preserving processes.
    return alpha * x_t - sigma * out


def x0_to_x0(x_t, out, alpha, sigma, process):
    return out


def velocity_to_x0(x_t, out, alpha, sigma, process):
    # Flow matching velocity v = eps - x0 on alpha = 1 - t, sigma = t, so x0 = x_t - t v.
    if not isinstance(process, RectifiedFlow):
        raise ValueError("flow-velocity prediction needs the rectified-flow process")
    return x_t - sigma * out


PREDICTIONS = {"eps": eps_to_x0, "v": v_to_x0, "x0": x0_to_x0, "velocity": velocity_to_x0}


@dataclass(frozen=True)
class ClipData:
    """Clip the data prediction to [-limit, limit] (DDPM / DDIM schedulers' `clip_sample`)."""

    limit: float = 1.0

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.clamp(-self.limit, self.limit)


@dataclass(frozen=True)
class DynamicThreshold:
    """Dynamic thresholding (Saharia et al. 2022, Imagen sec. 2.3): per sample, s = the `ratio` quantile of
    |x0|, kept in [1, max_value]; x0 is clipped to [-s, s] and divided by s."""

    ratio: float = 0.995
    max_value: float = 1.0

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        s = torch.quantile(x0.reshape(x0.shape[0], -1).abs(), self.ratio, dim=1).clamp(1.0, self.max_value)
        s = _bcast(s, x0)
        return torch.minimum(torch.maximum(x0, -s), s) / s


class Unclipped:
    """A model's data prediction before its data clip: guidance combines these and clips the result, as
    diffusers' schedulers clip the guided prediction.  Wrappers that count calls define `prediction_call`."""

    def __init__(self, model):
        self.model = model

    def network_call(self, x, sigma, cond=None) -> NetworkCall:
        split = getattr(type(self.model), "prediction_call", None)
        if split is None:
            raise TypeError(f"{type(self.model).__name__} has a data clip but no prediction_call")
        return split(self.model, x, sigma, cond)


@dataclass(frozen=True)
class Denoiser:
    """Data-prediction denoiser in VE coordinates over a network in its own parameterization.

    ``num_classes`` is None for unconditional models; ``shape`` is one sample's shape.
    """

    net: Network
    process: Process
    prediction: str
    shape: tuple[int, ...]
    num_classes: int | None = None
    kind: str = "diffusion"
    data_clip: Callable[[torch.Tensor], torch.Tensor] | None = None  # ClipData | DynamicThreshold, on x0_hat

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {self.prediction!r}; expected one of {list(PREDICTIONS)}")

    @property
    def sigma_min(self) -> float:
        return self.process.kappa_min

    @property
    def sigma_max(self) -> float:
        return self.process.kappa_max

    def network_call(self, x: torch.Tensor, sigma, cond=None) -> NetworkCall:
        """The batchable call: this denoiser over per-sample rows (x, sigma, cond).  The adapter's arithmetic
        runs once per batched forward, not once per request; the data clip, if any, per request after it."""
        call = self.prediction_call(x, sigma, cond)
        return call if self.data_clip is None else call.then(self.data_clip)

    def prediction_call(self, x: torch.Tensor, sigma, cond=None) -> NetworkCall:
        """The data prediction before the data clip (what guidance combines)."""
        return NetworkCall(self.denoise, (x, torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0]), cond))

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x0_hat for a batch: to the network's coordinates (x_t = alpha x, t of sigma), net, back to x0."""
        t = self.process.t_of_kappa(sigma)
        alpha = _bcast(self.process.alpha(t), x)
        sig = _bcast(self.process.sigma(t), x)
        x_t = x * alpha
        out = self.net(x_t, t, cond).to(x.dtype)
        return PREDICTIONS[self.prediction](x_t, out, alpha, sig, self.process)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.network_call(x, sigma, cond).run()


@dataclass(frozen=True)
class ClassifierFreeGuidance:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) in data prediction: D_u + w (D_c - D_u).

    Wraps a conditional denoiser and is itself a denoiser; the conditional and unconditional halves
    run as one batched forward pass.  Samples whose label is NULL_LABEL are returned unguided.
    """

    model: Callable
    scale: float

    def __getattr__(self, name):  # expose process, shape, sigma range... of the wrapped model
        return getattr(self.model, name)

    def network_call(self, x, sigma, cond=None) -> NetworkCall:
        """Both halves in one network call: rows [x | x] under [cond | null], then the guided combination."""
        if cond is None:
            raise InvalidRequest("guidance needs a class label per sample")
        clip = getattr(self.model, "data_clip", None)  # diffusers' schedulers clip the guided prediction
        model = self.model if clip is None else Unclipped(self.model)
        both = paired_call(model, x, sigma, *guidance_halves(cond))
        guided = both.then(lambda pair: self.combine(x, cond, *pair))
        return guided if clip is None else guided.then(clip)

    def combine(self, x, cond, d_cond, d_uncond):
        guided = d_uncond + self.scale * (d_cond - d_uncond)
        if isinstance(cond, dict):  # prompts: every row is guided
            return guided
        keep = _bcast((cond == NULL_LABEL).to(torch.float64), x).bool()
        return torch.where(keep, d_uncond, guided)

    def __call__(self, x, sigma, cond=None):
        return self.network_call(x, sigma, cond).run()


def guidance_halves(cond):
    """(conditional, unconditional) conds of classifier-free guidance: labels and NULL_LABEL, or a dict's
    own entries and its ``neg.*`` entries (renamed without the prefix)."""
    if isinstance(cond, dict):
        pos = {k: v for k, v in cond.items() if not k.startswith(NEG)}
        neg = {k[len(NEG):]: v for k, v in cond.items() if k.startswith(NEG)}
        if set(neg) != set(pos):
            raise InvalidRequest("guidance needs negative-prompt conditioning for every conditioning entry")
        return pos, neg
    return cond, torch.full_like(cond, NULL_LABEL)


def cat_cond(a, b):
    """Two conds on the batch axis (tensors, or dicts of tensors with the same keys)."""
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


def paired_call(model, x, sigma, cond_a, cond_b) -> NetworkCall:
    """(D(x | cond_a), D(x | cond_b)) as one network call over rows [x | x]: the two halves of
    classifier-free guidance, or two experts of a product."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
    both = evaluate(model, torch.cat([x, x]), torch.cat([sigma, sigma]), cat_cond(cond_a, cond_b))
    return both.then(lambda out: out.chunk(2))


def with_guidance(model, scale: float | None):
    """Return the model under classifier-free guidance at `scale`, or unchanged for None / 1."""
    if scale is None or scale == 1.0:
        return model
    if getattr(model, "num_classes", None) is None and not getattr(model, "takes_prompt", False):
        raise InvalidRequest("guidance: the model is unconditional, classifier-free guidance needs classes")
    return ClassifierFreeGuidance(model, float(scale))
