"""One latent-pipeline request as a step machine: encode the prompts, denoise, decode.

`generate_machine(pipeline, request)` is a generator that yields a `NetworkCall` for the text encoder (the
prompts not already cached), for every denoiser evaluation (through the sampler's own machine) and for
the VAE decode, and returns a `PipelineResult`; `samplers.calls.drive` runs it in the calling thread and
the server's engine interleaves many of them, batching each network across requests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from samplers import registry
from samplers.calls import StepMachine
from samplers.errors import InvalidRequest
from samplers.hooks import Hook, report
from samplers.noise import SampleNoise

from .common import NEG, flow_prior_step, stack_rows
from .pipeline import LatentPipeline

RESCALE_FAMILIES = ("sd", "sdxl")  # the diffusers pipelines with a guidance_rescale argument


@dataclass(frozen=True)
class PipelineRequest:
    """What a latent-pipeline request asks for; None fields take the model's defaults.

    `latents` optionally replaces the unit-variance initial noise drawn from the seeds (diffusers'
    `latents` argument, before its scheduler's init_noise_sigma)."""

    seeds: Sequence[int]
    prompts: Sequence[str] | None = None
    negative_prompts: Sequence[str] | None = None
    class_labels: Sequence[int] | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    sampler: str = "euler"
    guidance: float | None = None
    options: dict = field(default_factory=dict)
    latents: torch.Tensor | None = None
    distilled_guidance: float | None = None  # FLUX-dev's guidance embedding
    guidance_rescale: float | None = None  # SD / SDXL: diffusers' guidance_rescale in [0, 1]


@dataclass(frozen=True)
class PipelineResult:
    images: torch.Tensor  # (N, 3, H, W) float32 in [-1, 1]
    latents: torch.Tensor
    nfe: int
    seeds: tuple[int, ...]


def generate(pipeline: LatentPipeline, request: PipelineRequest, hook: Hook | None = None) -> PipelineResult:
    """Library entry point: run `generate_machine` to completion in this thread."""
    from samplers.calls import drive

    return drive(generate_machine(pipeline, request, hook))


def encode_prompts(pipeline: LatentPipeline, prompts: Sequence[str]) -> StepMachine[list[dict]]:
    """Per-sample conditioning rows for `prompts`; one encoder call for the ones not cached."""
    cache = pipeline.text.cache
    found = {p: cache.get(p) for p in dict.fromkeys(prompts)}  # held here: other requests may evict them
    missing = sorted(p for p, row in found.items() if row is None)
    if missing:
        rows = yield pipeline.text.encode_call(missing)
        for prompt, row in zip(missing, rows, strict=True):
            cache.put(prompt, row)
            found[prompt] = row
    return [found[p] for p in prompts]


def _prompts(request: PipelineRequest, n: int, key: str) -> list[str] | None:
    given = getattr(request, key)
    if given is None:
        return None
    given = [given] if isinstance(given, str) else list(given)
    if len(given) == 1:
        given = given * n
    if len(given) != n or not all(isinstance(p, str) for p in given):
        raise InvalidRequest(f"{key}: give one string or one per sample ({n})")
    return given


def condition(pipeline: LatentPipeline, request: PipelineRequest, n: int, guided: bool, height: int,
              width: int) -> StepMachine[dict]:
    """The cond dict: per-sample text (or class) conditioning, plus neg.* rows under guidance."""
    if not pipeline.takes_prompt:
        return _class_cond(pipeline, request, n, guided)
    prompts = _prompts(request, n, "prompts")
    if prompts is None:
        raise InvalidRequest(f"prompt: model {pipeline.name!r} needs a prompt")
    negatives = _prompts(request, n, "negative_prompts") if guided else None
    if guided and negatives is None and pipeline.zero_negative:
        rows = yield from encode_prompts(pipeline, prompts)
        neg_rows = [{k: torch.zeros_like(v) for k, v in row.items()} for row in rows]
    else:
        negatives = negatives or ([""] * n if guided else [])
        both = yield from encode_prompts(pipeline, prompts + negatives)
        rows, neg_rows = both[:n], both[n:]
    cond = stack_rows(rows)
    if pipeline.extra_cond is not None:
        cond.update(pipeline.extra_cond(height, width, n, request_extras(request)))
    if guided:
        neg = stack_rows(neg_rows)
        if pipeline.extra_cond is not None:
            neg.update(pipeline.extra_cond(height, width, n, request_extras(request)))
        cond.update({NEG + k: v for k, v in neg.items()})
    return cond


def request_extras(request: PipelineRequest) -> dict:
    return {"distilled_guidance": request.distilled_guidance}


def guidance_rescale(pipeline: LatentPipeline, request: PipelineRequest, guided: bool) -> float:
    """The request's guidance_rescale, checked: a number in [0, 1], on a family whose pipeline has it."""
    value = request.guidance_rescale
    if value is None or value == 0:
        return 0.0
    if pipeline.family not in RESCALE_FAMILIES:
        raise InvalidRequest(f"guidance_rescale: model {pipeline.name!r} ({pipeline.family}) has no guidance rescale "
                             f"(families: {', '.join(RESCALE_FAMILIES)})")
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise InvalidRequest(f"guidance_rescale: must be a number in [0, 1], got {str(value)[:100]!r}")
    if not guided:
        raise InvalidRequest("guidance_rescale: needs classifier-free guidance (guidance > 1)")
    return float(value)


def _class_cond(pipeline, request, n, guided):
    labels = request.class_labels
    if labels is None or len(labels) not in (1, n):
        raise InvalidRequest(f"class_label: model {pipeline.name!r} needs one class label or one per sample")
    labels = torch.as_tensor(list(labels) * (n if len(labels) == 1 else 1), dtype=torch.long)
    if (labels < 0).any() or (labels >= pipeline.num_classes).any():
        raise InvalidRequest(f"class_label: must lie in [0, {pipeline.num_classes - 1}]")
    cond = {"class_labels": labels}
    if guided:
        cond[NEG + "class_labels"] = torch.full_like(labels, pipeline.info.get("null_class", pipeline.num_classes))
    return cond


def denoise(sampler: str, model, x, sigmas, cond, noise, hook, options, kind) -> StepMachine:
    """The sampler's step machine (`sampler_machine`), or `run_sampler` where it does not exist yet."""
    machine = getattr(registry, "sampler_machine", None)
    if machine is not None:
        return (yield from machine(sampler, model, x, sigmas, cond, noise=noise, hook=hook, options=options,
                                   kind=kind))
    return registry.run_sampler(sampler, model, x, sigmas, cond, noise=noise, hook=hook, options=options, kind=kind)


def generate_machine(pipeline: LatentPipeline, request: PipelineRequest, hook: Hook | None = None
                     ) -> StepMachine[PipelineResult]:
    """Conditioning -> denoising -> VAE decoding for one request; yields every network call."""
    asked = (request.height or pipeline.default_size[0], request.width or pipeline.default_size[1])
    pipeline.check_size(*asked)
    height, width = pipeline.generation_size(*asked)  # PixArt: the aspect-ratio bin, resized back after decoding
    steps = pipeline.default_steps if request.steps is None else request.steps
    registry.validate(request.sampler, steps, request.options, pipeline.denoiser.kind)  # before any grid math
    n = len(request.seeds)
    if n < 1:
        raise InvalidRequest("seeds: need at least one sample")
    scale = pipeline.default_guidance if request.guidance is None else float(request.guidance)
    guided = scale is not None and scale > 1.0
    cond = yield from condition(pipeline, request, n, guided, height, width)
    rescale = guidance_rescale(pipeline, request, guided)
    model = pipeline.denoiser.guided(scale, rescale) if guided else pipeline.denoiser
    sigmas = pipeline.grid(steps, request.sampler, height, width)
    noise = SampleNoise(request.seeds, torch.float64)
    shape = pipeline.latent_shape(height, width)
    eps = request.latents.to(torch.float64) if request.latents is not None else noise.randn(shape)
    if tuple(eps.shape) != (n, *shape):
        raise InvalidRequest(f"latents: expected shape {(n, *shape)}, got {tuple(eps.shape)}")
    nfe = 0
    if pipeline.denoiser.kind == "meanflow":  # flow-map models: z = eps at t = 1 walks the times to 0 itself
        x, nfe = yield from denoise(request.sampler, model, eps, sigmas, cond, noise, hook, request.options, "meanflow")
        sigmas = sigmas[-1:]
    elif math.isinf(float(sigmas[0])):  # flow grids start at t = 1: one exact first-order step from noise
        x0_hat = yield model.prior_call(eps, cond)
        x = flow_prior_step(x0_hat, eps, float(sigmas[1]))
        report(hook, 0, steps, math.inf, float(sigmas[1]), x, x0_hat)
        sigmas, nfe = sigmas[1:], 1
        if hook is not None:  # the sampler's steps count on from the prior step, and so does its NFE
            inner = hook
            hook = lambda info: inner(replace(info, step=info.step + 1, steps=info.steps + 1, nfe=info.nfe + 1))  # noqa: E731
    else:
        x = eps * math.sqrt(1 + float(sigmas[0]) ** 2)  # x_T / alpha_T with x_T ~ N(0, I)
    if len(sigmas) > 1:
        x, used = yield from denoise(request.sampler, model, x, sigmas, cond, noise, hook, request.options,
                                     pipeline.denoiser.kind)
        nfe += used
    last = float(sigmas[-1])
    if last > 0:  # a grid ending above 0 (DDIM without set_alpha_to_one) decodes x_t, as diffusers does
        x = x * pipeline.denoiser.process.alpha(pipeline.denoiser.process.t_of_kappa(torch.tensor(last)))
    images = yield pipeline.decoder.decode_call(x, None if asked == (height, width) else asked)
    return PipelineResult(images, x, nfe, tuple(int(s) for s in request.seeds))
