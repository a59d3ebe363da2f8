"""One request plan for every entry point: (loaded model, request) -> a validated `Plan`, or an
`InvalidRequest` naming the field.

Generate, GenerateStream, SubmitJob (and the queue worker), the command line's in-process path and
search all call `make_plan`, so they accept and reject exactly the same requests with the same limits.
A plan checks everything that can be checked without compute: sizes first (before tokenizing a prompt),
then the sampler or search against its registry, options, steps, seeds, labels, guidance, grid, prompt
and output format.  `Plan.machine` turns it into a step machine (samplers/calls.py) that the engine
advances one network call at a time, or `samplers.calls.drive` runs directly.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from samplers import REGISTRY, SampleNoise, initial_noise, make_grid, with_guidance
from samplers.block_diffusion import block_diffusion_machine
from samplers.calls import StepMachine
from samplers.errors import InvalidRequest, NonFiniteOutput
from samplers.grids import GRIDS
from samplers.hooks import StepInfo
from samplers.masked import masked_sampler_machine
from samplers.meanflow import meanflow_times
from samplers.registry import sampler_machine, validate
from search import build_verifier, run_search
from search.registry import DEFAULT_STEPS, MAX_SEARCHES, validate_search
from search.verifiers import REQUEST_RESOURCES, validate_verifier

from .errors import quote
from .limits import check_response_size
from .requests import PLACEHOLDER, GenerateRequest, GenerateResult, TextStep

OUTPUTS = ("png", "tensor", "text")
PROMPT_CHARS_PER_TOKEN = 16  # a prompt_text longer than this many characters per position is refused untokenized


@dataclass(frozen=True)
class Limits:
    """Per-request limits; the server's come from its `[server]` table, the CLI uses the same defaults."""

    max_samples: int = 256
    max_steps: int = 1000
    max_response_bytes: int | None = None  # None: responses are not bounded (library use, queued jobs)

    @classmethod
    def of(cls, config, *, job: bool = False) -> Limits:
        """The limits of a server config (`job`: a queued job may ask for up to queue_max_job_samples, and its
        results are paged, so no response-size bound)."""
        if job:
            return cls(config.queue_max_job_samples, config.max_steps)
        return cls(config.max_samples, config.max_steps, config.max_message_bytes)


@dataclass(frozen=True)
class Plan:
    """A validated request: which machine runs it and with what.  `label` names it in metrics."""

    model: str
    kind: str  # the model kind the sampler or search treats the model as
    request: GenerateRequest  # sampler and steps filled in
    seeds: tuple[int, ...]
    options: dict[str, Any] = field(default_factory=dict)  # sampler options with defaults

    @property
    def label(self) -> str:
        return self.request.search.method if self.request.search else self.request.sampler

    @property
    def n(self) -> int:
        return len(self.seeds)

    def machine(self, loaded, model=None, hook=None, resources: Mapping[str, Any] | None = None
                ) -> StepMachine[GenerateResult]:
        """The step machine of this plan on `loaded` (through `model` when given, e.g. a backend)."""
        model = loaded.model if model is None else model
        if loaded.entry.family is not None:
            if self.request.search is not None:
                return _pipeline_search(self, loaded, model, hook, dict(resources or {}))
            return _pipeline(self, model, hook)
        if self.request.search is not None:
            return _search(self, loaded, model, hook, dict(resources or {}))
        if loaded.kind == "masked":
            return _masked(self, loaded, model, hook)
        if loaded.kind == "block_diffusion":
            return _block(self, loaded, model, hook)
        return _continuous(self, loaded, model, hook)


def make_plan(loaded, request: GenerateRequest, limits: Limits = Limits(), *, output: str | None = None,
              png_scale: int = 1, resources: Mapping[str, Any] | None = None) -> Plan:
    """Check `request` against the model, the registries and `limits`; `output` is the response format
    ("png", "tensor", "text"; None: the model's default), `png_scale` the PNG upscale factor; `resources`
    are what this server can build verifiers from (None: not checked)."""
    n = request.n
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limits.max_samples:
        raise InvalidRequest(f"num_samples: {n!r} is outside [1, {limits.max_samples}]")
    seeds = tuple(request.sample_seeds())
    model, kind = loaded.model, loaded.kind
    if kind not in ("diffusion", "flow", "meanflow", "masked", "block_diffusion"):
        raise InvalidRequest(f"model: {loaded.name!r} is a {kind} model, which loads but is not served yet")
    if output is not None:
        _check_output(output, kind)
    if loaded.entry.family is not None:
        return _plan_pipeline(loaded, request, limits, seeds, output, png_scale, resources)
    if kind == "block_diffusion":
        return _plan_block(loaded, request, limits, seeds, output)
    lm = kind == "masked" and takes_prompt(model)
    if (request.prompt and not lm) or request.negative_prompt or request.height or request.width:
        field = "prompt" if request.prompt or request.negative_prompt else "height, width"
        raise InvalidRequest(f"{field}: model {loaded.name!r} is not a text-to-image pipeline or a text LM")
    if request.max_new_tokens is not None and not (lm and request.prompt):
        raise InvalidRequest(f"max_new_tokens: model {loaded.name!r} takes it with a `prompt` only")
    if limits.max_response_bytes is not None:  # refuse what the client could not receive, before compute
        shape = (model.length,) if kind == "masked" else tuple(model.shape)
        check_response_size(kind, shape, n, output or ("text" if kind == "masked" else "png"), png_scale,
                            limits.max_response_bytes)
    if request.grid is not None and request.grid not in GRIDS:
        raise InvalidRequest(f"grid: unknown grid {quote(request.grid)}; expected one of {sorted(GRIDS)}")
    if kind == "masked":
        _check_prompt(model, request)
        if request.class_label is not None or request.guidance not in (None, 1.0):
            raise InvalidRequest("class_label: masked models take a prompt, not a class label or guidance")
    else:
        if request.prompt_text or request.prompt_tokens:
            raise InvalidRequest(f"prompt: model {loaded.name!r} is an image model; it takes no token prompt")
        labels_of(model, request)
    if request.search is not None:
        return _plan_search(loaded, request, limits, seeds, resources)
    if not request.sampler:
        raise InvalidRequest("sampler: name is empty")
    if kind == "masked":
        _check_sampler_kind(loaded, request.sampler)
    spec = REGISTRY.get(request.sampler)
    sampler_kind = "flow" if kind == "meanflow" and spec is not None and "meanflow" not in spec.kinds else kind
    steps = request.steps
    if kind == "masked":
        steps = _masked_steps(loaded, request, spec)
        check_steps = steps if steps is not None else 1
    else:
        if steps is None:
            steps = loaded.entry.default_steps
        check_steps = steps
        if sampler_kind == "meanflow" and request.guidance not in (None, 1.0):
            raise InvalidRequest("guidance: MeanFlow models bake guidance into training; leave it unset")
    _, options = validate(request.sampler, check_steps, request.options, sampler_kind)
    if steps is not None and steps > limits.max_steps:
        raise InvalidRequest(f"steps: {steps} is outside [1, {limits.max_steps}]")
    return Plan(loaded.name, sampler_kind, replace(request, steps=steps), seeds, options)


def _plan_pipeline(loaded, request: GenerateRequest, limits: Limits, seeds, output, png_scale,
                   resources=None) -> Plan:
    """Latent pipelines (models/pipelines): a prompt (or a class label), a size, a sampler for its kind,
    or a search over the latent denoiser whose verifier scores decoded images."""
    pipe = loaded.model
    if request.prompt_text or request.prompt_tokens:
        raise InvalidRequest(f"prompt_text: model {loaded.name!r} takes `prompt` (text-to-image), not a token "
                             f"template")
    if request.grid is not None:
        raise InvalidRequest(f"grid: model {loaded.name!r} samples on its own scheduler's time grid")
    if pipe.takes_prompt:
        if not request.prompt:
            raise InvalidRequest(f"prompt: model {loaded.name!r} needs a prompt")
        if request.class_label is not None:
            raise InvalidRequest(f"class_label: model {loaded.name!r} takes a prompt, not a class label")
    else:
        if request.prompt or request.negative_prompt:
            raise InvalidRequest(f"prompt: model {loaded.name!r} is class-conditional; give a class_label")
        if request.class_label is None:
            raise InvalidRequest(f"class_label: model {loaded.name!r} needs a class label")
        if not 0 <= request.class_label < pipe.num_classes:
            raise InvalidRequest(f"class_label: {request.class_label} is outside [0, {pipe.num_classes - 1}]")
    if request.distilled_guidance is not None and not pipe.info.get("distilled_guidance", False):
        raise InvalidRequest(f"distilled_guidance: model {loaded.name!r} has no guidance input; use guidance")
    if request.guidance is not None and not 0.0 <= float(request.guidance) <= 100.0:
        raise InvalidRequest(f"guidance: {request.guidance} is outside [0, 100]")
    height, width = request.height or pipe.default_size[0], request.width or pipe.default_size[1]
    pipe.check_size(height, width)
    if request.search is not None:
        return _plan_pipeline_search(loaded, replace(request, height=height, width=width), limits, seeds, output,
                                     png_scale, resources)
    steps = request.steps if request.steps is not None else pipe.default_steps
    if not request.sampler:
        raise InvalidRequest("sampler: name is empty")
    _, options = validate(request.sampler, steps, request.options, pipe.denoiser.kind)
    if steps > limits.max_steps:
        raise InvalidRequest(f"steps: {steps} is outside [1, {limits.max_steps}]")
    if limits.max_response_bytes is not None:
        check_response_size("diffusion", (3, height, width), len(seeds), output or "png", png_scale,
                            limits.max_response_bytes)
    return Plan(loaded.name, pipe.denoiser.kind, replace(request, steps=steps, height=height, width=width),
                seeds, options)


def _plan_pipeline_search(loaded, request: GenerateRequest, limits: Limits, seeds, output, png_scale,
                          resources) -> Plan:
    """A search on a latent pipeline: the search's checks, the verifier built once from what the request
    and the server supply (so a prompt the verifier cannot read is refused here), the response size."""
    pipe, search = loaded.model, request.search
    kind = pipe.denoiser.kind
    steps, options, vspec = _check_search(request, kind, seeds, limits, resources)
    if options.get("second_prompt"):
        if not pipe.takes_prompt:
            raise InvalidRequest(f"search.options.second_prompt: model {loaded.name!r} is class-conditional; "
                                 f"use second_class")
        if options.get("target") != "product":
            raise InvalidRequest("search.options.second_prompt: only the product target takes a second prompt")
    second_class = options.get("second_class", -1)
    if pipe.takes_prompt and second_class >= 0:
        raise InvalidRequest(f"search.options.second_class: model {loaded.name!r} takes prompts; use second_prompt")
    if not pipe.takes_prompt and second_class >= pipe.num_classes:
        raise InvalidRequest(f"search.options.second_class: {second_class} is outside [0, {pipe.num_classes - 1}]")
    if "prompt" in vspec.resources and not pipe.takes_prompt:
        raise InvalidRequest(f"search.verifier: {search.verifier!r} scores a prompt; model {loaded.name!r} takes "
                             f"class labels")
    if vspec.needs_cond and pipe.takes_prompt:
        raise InvalidRequest(f"search.verifier: {search.verifier!r} scores a class label; model {loaded.name!r} "
                             f"takes a prompt (digit-prompt scores prompts)")
    if resources is not None:
        _pipeline_verifier(loaded, request, resources)  # builds it: refuses a prompt it cannot score
    if limits.max_response_bytes is not None:
        check_response_size("diffusion", (3, request.height, request.width), len(seeds), output or "png",
                            png_scale, limits.max_response_bytes)
    return Plan(loaded.name, kind, replace(request, steps=steps), seeds)


@functools.lru_cache(maxsize=16)
def train_info_thresholds(directory: str) -> dict | None:
    """The attribute thresholds a model's card measured its captions by (zoo/digits-t2i/train_info.json)."""
    path = Path(directory) / "train_info.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("attribute_thresholds")


def _pipeline_verifier(loaded, request: GenerateRequest, resources: Mapping[str, Any]):
    """The request's verifier over decoded images (None for a reward-free search)."""
    from search.verifiers import DecodedVerifier

    search, pipe = request.search, loaded.model
    if not search.verifier:
        return None
    supplied = {**resources, "model": pipe.denoiser, "prompt": request.prompt or ""}
    thresholds = train_info_thresholds(str(loaded.entry.directory))
    if thresholds is not None:
        supplied.setdefault("digit-attributes", thresholds)
    verifier = build_verifier(search.verifier, search.verifier_options, supplied, pipe.denoiser.kind)
    return DecodedVerifier(pipe.decoder, verifier)


def _check_output(output: str, kind: str) -> None:
    if output not in OUTPUTS:
        raise InvalidRequest(f"format: {quote(output)} is not one of {list(OUTPUTS)}")
    if kind in TEXT_KINDS and output == "png":
        raise InvalidRequest("format: text models give TEXT or TENSOR output")
    if kind not in TEXT_KINDS and output == "text":
        raise InvalidRequest("format: TEXT output is for masked (text) models; use PNG or TENSOR")


def _masked_steps(loaded, request: GenerateRequest, spec) -> int | None:
    """mdlm takes N steps (the model's default when unset); first_hitting takes one per masked position."""
    if spec is None or spec.one_step_per_mask:
        return request.steps
    return request.steps if request.steps is not None else loaded.entry.default_steps


def _check_search(request: GenerateRequest, kind: str, seeds, limits: Limits, resources):
    """What every search request is checked for: the number of searches, steps, the method and its options,
    the verifier and what it needs from the server.  Returns (steps, options with defaults, verifier spec)."""
    search = request.search
    steps = DEFAULT_STEPS if request.steps is None else request.steps
    if not 1 <= len(seeds) <= MAX_SEARCHES:
        raise InvalidRequest(f"num_samples: a search runs 1 to {MAX_SEARCHES} searches, got {len(seeds)}")
    if isinstance(steps, int) and steps > limits.max_steps:
        raise InvalidRequest(f"steps: {steps} is outside [1, {limits.max_steps}]")
    _, options = validate_search(search.method, search.budget_nfe, search.options, kind, steps)
    vspec, _ = validate_verifier(search.verifier, search.verifier_options, kind)
    if resources is not None:
        missing = [r for r in vspec.resources if r not in resources and r not in REQUEST_RESOURCES]
        if missing:
            raise InvalidRequest(f"search.verifier: {search.verifier!r} is not available on this server "
                                 f"(needs {missing[0]!r})")
    return steps, options, vspec


def _plan_search(loaded, request: GenerateRequest, limits: Limits, seeds, resources) -> Plan:
    kind = "flow" if loaded.kind == "meanflow" else loaded.kind
    steps, _, _ = _check_search(request, kind, seeds, limits, resources)
    if request.guidance is not None and not 0.0 <= float(request.guidance) <= 100.0:
        raise InvalidRequest(f"guidance: {request.guidance} is outside [0, 100]")
    return Plan(loaded.name, kind, replace(request, steps=steps), seeds)


def _check_prompt(model, request: GenerateRequest) -> None:
    """Masked models: one of prompt_text / prompt_tokens (or an LM's `prompt`), bounded by size before any
    tokenizing."""
    if request.prompt:
        if request.prompt_text or request.prompt_tokens is not None:
            raise InvalidRequest("prompt: give a prompt or a token template (prompt_text / prompt_tokens)")
        prompt_template(model, request)
        return
    if request.prompt_tokens is not None and request.prompt_text:
        raise InvalidRequest("prompt: give prompt_tokens or prompt_text, not both")
    if request.prompt_text and len(request.prompt_text) > PROMPT_CHARS_PER_TOKEN * model.length:
        raise InvalidRequest(f"prompt_text: {len(request.prompt_text)} characters is too long for the model's "
                             f"{model.length} positions")
    if request.prompt_tokens is not None:
        if len(request.prompt_tokens) > model.length:
            raise InvalidRequest(f"prompt_tokens: {len(request.prompt_tokens)} tokens is longer than the model's "
                                 f"length {model.length}")
        bad = [t for t in request.prompt_tokens if t != -1 and not 0 <= t < model.vocab_size]
        if bad:
            raise InvalidRequest(f"prompt_tokens: {bad[0]} is not a token id in [0, {model.vocab_size}) "
                                 f"or -1 (sample here)")
    masked_template(model, request)


def labels_of(model, request: GenerateRequest) -> torch.Tensor | None:
    """The (n,) class labels of a class-conditional request, or None; refuses what the model cannot take."""
    num_classes = getattr(model, "num_classes", None)
    if request.class_label is None:
        if request.guidance not in (None, 1.0):
            raise InvalidRequest("guidance: classifier-free guidance needs a class_label")
        return None
    if num_classes is None:
        raise InvalidRequest("class_label: the model is unconditional")
    if isinstance(request.class_label, bool) or not 0 <= request.class_label < num_classes:
        raise InvalidRequest(f"class_label: {request.class_label!r} is outside [0, {num_classes - 1}]")
    return torch.full((request.n,), request.class_label, dtype=torch.long)


DEFAULT_NEW_TOKENS = 128
TEXT_KINDS = ("masked", "block_diffusion")


def takes_prompt(model) -> bool:
    """A text LM (LLaDA, MDLM / BD3-LM, DiffusionGemma): `prompt` + max_new_tokens, through its chat template
    where it has one."""
    return hasattr(model, "prompt_ids")


def prompt_ids(model, request: GenerateRequest) -> tuple[list[int], int]:
    """An LM request's prompt ids (chat-templated where the model has a template) and its new-token count."""
    if len(request.prompt) > PROMPT_CHARS_PER_TOKEN * model.length:
        raise InvalidRequest(f"prompt: {len(request.prompt)} characters is too long for the model's {model.length} "
                             f"positions")
    ids = list(model.prompt_ids(request.prompt))
    new = request.max_new_tokens or DEFAULT_NEW_TOKENS
    if len(ids) + new > model.length:
        raise InvalidRequest(f"max_new_tokens: {len(ids)} prompt tokens + {new} new tokens exceed the model's "
                             f"length {model.length}")
    return ids, new


def prompt_template(model, request: GenerateRequest) -> tuple[torch.Tensor, int]:
    """A masked LM's (L,) tokens: the prompt then max_new_tokens masks; and the prompt's length."""
    ids, new = prompt_ids(model, request)
    return torch.tensor(ids + [model.mask_id] * new, dtype=torch.long), len(ids)




def _check_sampler_kind(loaded, name: str) -> None:
    """A sampler of another model kind is refused naming both, with the samplers that do apply."""
    spec = REGISTRY.get(name)
    if spec is not None and loaded.kind not in spec.kinds:
        fits = sorted(n for n, s in REGISTRY.items() if loaded.kind in s.kinds)
        raise InvalidRequest(f"sampler: {name!r} does not apply to model {loaded.name!r} (a {loaded.kind} model); "
                             f"its samplers are {fits}")


def _plan_block(loaded, request: GenerateRequest, limits: Limits, seeds, output) -> Plan:
    """Block-diffusion LMs (DiffusionGemma): a prompt, max_new_tokens (the sampler's gen_length), a canvas
    sampler with `steps` per canvas."""
    model = loaded.model
    if request.search is not None:
        raise InvalidRequest(f"search: test-time search is not available on block-diffusion models yet "
                             f"(model {loaded.name!r})")
    if request.prompt_text or request.prompt_tokens is not None:
        raise InvalidRequest(f"prompt_text: model {loaded.name!r} takes `prompt` (and max_new_tokens), not a token "
                             f"template")
    refused = {"class_label": request.class_label is not None, "guidance": request.guidance not in (None, 1.0),
               "negative_prompt": bool(request.negative_prompt), "height, width": bool(request.height or request.width),
               "distilled_guidance": request.distilled_guidance is not None}
    for name, given in refused.items():
        if given:
            raise InvalidRequest(f"{name}: model {loaded.name!r} is a text LM; it takes a prompt and max_new_tokens")
    if request.grid is not None:
        raise InvalidRequest(f"grid: model {loaded.name!r} has no time grid; its samplers step over canvases")
    if not request.prompt:
        raise InvalidRequest(f"prompt: model {loaded.name!r} needs a prompt")
    if not request.sampler:
        raise InvalidRequest("sampler: name is empty")
    _check_sampler_kind(loaded, request.sampler)
    if "gen_length" in request.options:
        raise InvalidRequest("options.gen_length: set max_new_tokens instead")
    steps = request.steps if request.steps is not None else loaded.entry.default_steps
    _, options = validate(request.sampler, steps, request.options, "block_diffusion")
    if steps > limits.max_steps:
        raise InvalidRequest(f"steps: {steps} is outside [1, {limits.max_steps}]")
    ids, new = prompt_ids(model, request)
    canvases = -(-new // model.canvas_length)
    if len(ids) + canvases * model.canvas_length > model.length:
        raise InvalidRequest(f"max_new_tokens: {len(ids)} prompt tokens + {canvases} canvases of "
                             f"{model.canvas_length} exceed the model's length {model.length}")
    if limits.max_response_bytes is not None:
        check_response_size("masked", (len(ids) + new,), len(seeds), output or "text", 1, limits.max_response_bytes)
    return Plan(loaded.name, "block_diffusion", replace(request, steps=steps), seeds, {**options, "gen_length": new})


def masked_template(model, request: GenerateRequest) -> torch.Tensor:
    """The (L,) token template: prompt ids (-1 = sample here) or text, padded with masks to the length."""
    if request.prompt_text:
        ids = model.encode(request.prompt_text)
    elif request.prompt_tokens is not None:
        ids = [model.mask_id if t == -1 else t for t in request.prompt_tokens]
    else:
        ids = []
    if len(ids) > model.length:
        raise InvalidRequest(f"prompt: {len(ids)} tokens is longer than the model's length {model.length}")
    ids = list(ids) + [model.mask_id] * (model.length - len(ids))
    return torch.tensor(ids, dtype=torch.long)


def _check_finite(out: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(out).all():
        raise NonFiniteOutput("the sampler produced NaN or Inf values; try more steps or a lower guidance scale")
    return out


def _continuous(plan: Plan, loaded, model, hook) -> StepMachine[GenerateResult]:
    """Diffusion, flow and MeanFlow models: per-sample noise from the seeds, CFG, the grid, the sampler."""
    request = plan.request
    noise = SampleNoise(list(plan.seeds), torch.float64)  # sampler state in float64, as EDM keeps it
    labels = labels_of(model, request)
    if plan.kind == "meanflow":
        out, nfe = yield from sampler_machine(request.sampler, model, noise.randn(model.shape),
                                              meanflow_times(request.steps), labels, noise=noise, hook=hook,
                                              options=plan.options, kind="meanflow")
        return GenerateResult(_check_finite(out), nfe, list(plan.seeds))
    if loaded.kind == "meanflow":
        model = model.as_flow_denoiser()  # any flow sampler runs on the boundary velocity u(z, t, t)
    guided = with_guidance(model, request.guidance) if labels is not None else model
    sigmas = make_grid(model.process, request.steps, request.grid or loaded.entry.grid, shift=loaded.shift)
    out, nfe = yield from sampler_machine(request.sampler, guided, initial_noise(model, noise), sigmas, labels,
                                          noise=noise, hook=hook, options=plan.options, kind=plan.kind)
    return GenerateResult(_check_finite(out), nfe, list(plan.seeds))


def _masked(plan: Plan, loaded, model, hook) -> StepMachine[GenerateResult]:
    request = plan.request
    if request.prompt:  # an LM: the answer follows the (templated) prompt; its text stops at end-of-text
        template, start = prompt_template(model, request)
    else:
        template, start = masked_template(model, request), 0
    tokens = template.expand(plan.n, -1).clone()
    out, nfe = yield from masked_sampler_machine(request.sampler, model, tokens, steps=request.steps,
                                                 noise=SampleNoise(list(plan.seeds)),
                                                 hook=_text_hook(hook, model, start, model.mask_id),
                                                 options=request.options)
    return GenerateResult(out, nfe, list(plan.seeds), [model.decode(row[start:]) for row in out])


def _block(plan: Plan, loaded, model, hook) -> StepMachine[GenerateResult]:
    """A block-diffusion LM: canvases after the prompt, cut to max_new_tokens; texts stop at end-of-text."""
    request = plan.request
    ids, new = prompt_ids(model, request)
    prompt = torch.tensor(ids, dtype=torch.long).expand(plan.n, -1).clone()
    text_hook = _text_hook(hook, model, len(ids), -1)  # the sampler reports positions still noise as -1
    out, nfe = yield from block_diffusion_machine(request.sampler, model, prompt, steps=request.steps,
                                                  noise=SampleNoise(list(plan.seeds)), hook=text_hook,
                                                  options=plan.options)
    out = out[:, :len(ids) + new]
    if text_hook is not None:  # the final text, once more: early-stopped canvases settle after their last report
        text_hook.final(out, nfe)
    return GenerateResult(out, nfe, list(plan.seeds),
                          [model.decode(row[len(ids):]) for row in out])


def preview_text(model, ids, hidden: int) -> str:
    """The text of answer ids so far: PLACEHOLDER for each `hidden` id (still masked), cut at end-of-text;
    with nothing hidden, exactly the final text (`model.decode`)."""
    ids = [int(i) for i in ids]
    eos = getattr(model, "eos_id", None)
    if eos is not None and eos in ids:
        ids = ids[:ids.index(eos)]
    if hidden not in ids:
        return model.decode(ids)
    parts, run = [], []
    for i in [*ids, hidden]:
        if i != hidden:
            run.append(i)
            continue
        if run:
            parts.append(model.decode(run))
            run = []
        parts.append(PLACEHOLDER)
    return "".join(parts[:-1])


def _text_hook(hook, model, start: int, hidden: int):
    """The hook seeing TextSteps: each step's answers render as preview texts on demand; `nfe` counts calls."""
    if hook is None:
        return None
    calls, last = [0], [None]

    def render(x: torch.Tensor) -> list[str]:
        return [preview_text(model, row[start:], hidden) for row in x]

    def emit(info: StepInfo, nfe: int) -> None:
        hook(TextStep(**{f.name: getattr(info, f.name) for f in fields(StepInfo)} | {"nfe": nfe}, render=render))

    def text_hook(info: StepInfo) -> None:
        calls[0] += 1
        last[0] = info
        emit(info, info.nfe or calls[0])

    def final(x: torch.Tensor, nfe: int) -> None:
        """The final texts at the last step's index (no new step, no new call)."""
        info = last[0] if last[0] is not None else StepInfo(0, 1, 0.0, 0.0, x, x)
        emit(replace(info, x=x, x0_hat=x), nfe)

    text_hook.final = final
    return text_hook


def _search(plan: Plan, loaded, model, hook, resources) -> StepMachine[GenerateResult]:
    """Test-time search (search/): one search per seed; its particles are rows of the engine's forwards."""
    request, spec = plan.request, plan.request.search
    labels = labels_of(model, request)
    if loaded.kind == "meanflow":
        model = model.as_flow_denoiser()
    cond, start = labels, 0
    if loaded.kind == "masked" and (request.prompt or request.prompt_text or request.prompt_tokens is not None):
        template, start = (prompt_template(model, request) if request.prompt  # the answer follows the prompt
                           else (masked_template(model, request), 0))
        cond = {"tokens": template.expand(plan.n, -1).clone()}  # scored from its first mask: the answer only
    verifier = build_verifier(spec.verifier, spec.verifier_options, {**resources, "model": model}, plan.kind)
    result = yield from run_search.machine(
        spec.method, model, verifier=verifier, budget_nfe=spec.budget_nfe, cond=cond, seeds=list(plan.seeds),
        steps=request.steps, guidance=request.guidance if labels is not None else None, options=spec.options,
        hook=hook, kind=plan.kind, trace=False)
    samples = result.samples if loaded.kind == "masked" else _check_finite(result.samples)
    texts = [model.decode(row[start:]) for row in samples] if loaded.kind == "masked" else None
    return GenerateResult(samples, result.nfe, list(result.seeds), texts,
                          rewards=[float(r) for r in result.rewards])


def _pipeline(plan: Plan, pipe, hook) -> StepMachine[GenerateResult]:
    """Text encoding -> denoising -> VAE decoding (models/pipelines); decoded images (N, 3, H, W) in [-1, 1]."""
    from models.pipelines.generate import PipelineRequest, generate_machine

    r = plan.request
    request = PipelineRequest(
        seeds=list(plan.seeds), prompts=r.prompt, negative_prompts=r.negative_prompt,
        class_labels=None if r.class_label is None else [r.class_label], height=r.height, width=r.width,
        steps=r.steps, sampler=r.sampler, guidance=r.guidance, options=plan.options,
        distilled_guidance=r.distilled_guidance)
    out = yield from generate_machine(pipe, request, hook)
    return GenerateResult(_check_finite(out.images), out.nfe, list(plan.seeds))


@dataclass(frozen=True, eq=False)
class _LatentsAtSize:
    """A pipeline's latent denoiser as a search sees it: one request's latent shape, whether its cond is a
    prompt, and the pipeline's own guidance (search/budget.py's CountedModel uses `guided`)."""

    model: Any
    shape: tuple[int, ...]
    takes_prompt: bool

    def __getattr__(self, name):  # process, sigma range, kind, num_classes
        return getattr(self.model, name)

    def network_call(self, x, sigma, cond=None):
        return self.model.network_call(x, sigma, cond)

    def guided(self, scale: float) -> _LatentsAtSize:
        """The pipeline's own prompt guidance (its data clip after the combination, as a plain request)."""
        return _LatentsAtSize(self.model.guided(scale), self.shape, self.takes_prompt)

    def prediction_call(self, x, sigma, cond=None):  # before the model's data clip: guidance clips after
        return self.model.prediction_call(x, sigma, cond)


def _pipeline_search(plan: Plan, loaded, pipe, hook, resources) -> StepMachine[GenerateResult]:
    """Test-time search on a latent pipeline: conditioning once per search, the search over latents (its
    particles are rows of the engine's forwards, its verifier scores VAE-decoded images), then the decode
    of the returned latents.  Search progress carries no latent previews."""
    from models.pipelines.generate import PipelineRequest, condition

    r, spec = plan.request, plan.request.search
    options = spec.options or {}
    scale = pipe.default_guidance if r.guidance is None else float(r.guidance)
    guided = scale is not None and scale > 1.0
    if spec.method == "fkc":  # cfg pairs prompt and negative itself; a product's experts are unguided
        negatives = {"cfg": True, "anneal": guided, "product": False}[options.get("target", "cfg")]
    else:
        negatives = guided
    height, width = pipe.generation_size(r.height, r.width)  # PixArt: the aspect-ratio bin, resized back below
    request = PipelineRequest(
        seeds=list(plan.seeds), prompts=r.prompt, negative_prompts=r.negative_prompt,
        class_labels=None if r.class_label is None else [r.class_label], height=height, width=width,
        steps=r.steps, guidance=scale, distilled_guidance=r.distilled_guidance)
    cond = yield from condition(pipe, request, plan.n, negatives, height, width)
    second = None
    if options.get("second_prompt"):
        second = yield from condition(pipe, replace(request, prompts=options["second_prompt"], negative_prompts=None),
                                      plan.n, False, height, width)
    elif not pipe.takes_prompt and options.get("second_class", -1) >= 0:
        second = {"class_labels": torch.full((plan.n,), int(options["second_class"]), dtype=torch.long)}
    model = _LatentsAtSize(pipe.denoiser, tuple(pipe.latent_shape(height, width)), pipe.takes_prompt)
    verifier = _pipeline_verifier(loaded, r, resources)
    progress = None if hook is None else (lambda p: hook(replace(p, best_x0=None)))
    result = yield from run_search.machine(
        spec.method, model, verifier=verifier, budget_nfe=spec.budget_nfe, cond=cond, seeds=list(plan.seeds),
        steps=r.steps, guidance=scale if guided and negatives else None, options=spec.options, hook=progress,
        kind=plan.kind, trace=False, second_cond=second)
    asked = (r.height, r.width)
    images = yield pipe.decoder.decode_call(_check_finite(result.samples), None if asked == (height, width) else asked)
    return GenerateResult(_check_finite(images), result.nfe, list(result.seeds),
                          rewards=[float(v) for v in result.rewards])
