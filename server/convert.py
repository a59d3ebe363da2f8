"""Proto <-> plain dataclasses.  Validation of request fields happens here and in the engine."""

from __future__ import annotations

import json
import math

import numpy as np

from samplers import REGISTRY
from samplers.errors import InvalidRequest

from .images import grid_png
from .requests import GenerateRequest, SearchRequest


def _number(x: float, where: str):
    if not math.isfinite(x):
        raise InvalidRequest(f"{where}: {x} is not a finite number")
    return int(x) if x.is_integer() and abs(x) < 2**63 else x  # Struct carries every number as a double


def _value(value, where: str):
    """A google.protobuf.Value option -> Python (numbers finite, no nested objects, no nulls)."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return _number(value.number_value, where)
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "list_value":
        return [_value(v, f"{where}[{k}]") for k, v in enumerate(value.list_value.values)]
    if kind == "struct_value":
        raise InvalidRequest(f"{where}: an object is not an option value; give a number, string, bool or list")
    raise InvalidRequest(f"{where}: null (or no value) is not an option value; give a number, string, bool or list")


def _typed(value, where: str):
    """An OptionValue -> Python."""
    kind = value.WhichOneof("value")
    if kind == "number_value":
        return _number(value.number_value, where)
    if kind in ("int_value", "bool_value", "string_value"):
        return getattr(value, kind)
    if kind == "list_value":
        return [_typed(v, f"{where}[{k}]") for k, v in enumerate(value.list_value.values)]
    raise InvalidRequest(f"{where}: no value set; set one of number_value, int_value, bool_value, string_value "
                         "or list_value")


def options_of(message, struct_field: str, typed_field: str, where: str = "") -> dict:
    """The options of a Struct field and its typed map (a key may be in one of them only)."""
    out = {}
    if message.HasField(struct_field):
        for key, value in getattr(message, struct_field).fields.items():
            out[key] = _value(value, f"{where}{struct_field}.{key}")
    for key, value in getattr(message, typed_field).items():
        if key in out:
            raise InvalidRequest(f"{where}{typed_field}.{key}: also given in {where}{struct_field}; give it once")
        out[key] = _typed(value, f"{where}{typed_field}.{key}")
    return out


def to_request(pb, request, entry) -> GenerateRequest:
    """A GenerateRequest proto -> GenerateRequest, filling the model's defaults."""
    seeds = tuple(int(s) for s in request.seeds) or None
    n = request.num_samples or (len(seeds) if seeds else 1)
    steps = request.steps or (None if entry.kind == "masked" else entry.default_steps)  # masked: per sampler
    guidance = request.guidance if request.HasField("guidance") else None
    class_label = request.class_label if request.HasField("class_label") else None
    if guidance is None and (class_label is not None or request.prompt):
        guidance = entry.guidance
    if guidance is not None and not math.isfinite(guidance):
        raise InvalidRequest("guidance: must be finite")
    search = None
    if request.HasField("search"):
        spec = request.search
        if not spec.method:
            raise InvalidRequest("search.method: name is empty")
        search = SearchRequest(spec.method, int(spec.budget_nfe), spec.verifier,
                               options_of(spec, "options", "typed_options", "search."),
                               options_of(spec, "verifier_options", "typed_verifier_options", "search."))
    return GenerateRequest(sampler=request.sampler or entry.default_sampler, steps=steps, n=n, search=search,
                           seed=int(request.base_seed), seeds=seeds, class_label=class_label, guidance=guidance,
                           grid=request.grid or None, options=options_of(request, "options", "typed_options"),
                           prompt_tokens=tuple(request.prompt_tokens) or None,
                           prompt_text=request.prompt_text or None, prompt=request.prompt or None,
                           negative_prompt=request.negative_prompt or None, height=request.height or None,
                           width=request.width or None,
                           distilled_guidance=request.distilled_guidance if request.HasField("distilled_guidance")
                           else None, max_new_tokens=request.max_new_tokens or None)


def tensor(pb, array: np.ndarray):
    little_endian = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"))
    return pb.Tensor(dtype=str(array.dtype), shape=list(array.shape), data=little_endian.tobytes())


def sample_protos(pb, result, fmt: int, png_scale: int = 1) -> list:
    """A GenerateResult's samples as Sample protos (text / tokens, raw tensor or PNG at native resolution
    times `png_scale`; rewards of searches).  Every sample carries its seed, seed 0 too."""
    samples = []
    if result.texts is not None:
        for k, (seed, row, text) in enumerate(zip(result.seeds, result.samples, result.texts)):
            sample = pb.Sample(seed=seed, tokens=[int(t) for t in row])
            if result.rewards is not None and math.isfinite(result.rewards[k]):
                sample.reward = result.rewards[k]  # a search over a text model (best_of_n_masked)
            if fmt == pb.TENSOR:
                sample.tensor.CopyFrom(tensor(pb, row.numpy().astype(np.int64)))
            else:
                sample.text = text
            samples.append(sample)
        return samples
    if fmt == pb.TEXT:
        raise InvalidRequest("format: TEXT output is for masked (text) models; use PNG or TENSOR")
    for k, (seed, x) in enumerate(zip(result.seeds, result.samples)):
        sample = pb.Sample(seed=seed)
        if result.rewards is not None and math.isfinite(result.rewards[k]):
            sample.reward = result.rewards[k]
        if fmt == pb.TENSOR:
            sample.tensor.CopyFrom(tensor(pb, x.float().numpy()))
        else:
            sample.png = grid_png(x[None], scale=max(1, png_scale), pad=0)
        samples.append(sample)
    return samples


def to_response(pb, name: str, out, fmt: int, png_scale: int = 1):
    """The GenerateResponse of an engine result; PNGs at native resolution unless `png_scale` (the request's)."""
    result = out.result
    images = result.texts is None and fmt != pb.TENSOR
    scale = max(1, png_scale)
    return pb.GenerateResponse(model=name, sampler=out.sampler, samples=sample_protos(pb, result, fmt, scale),
                               nfe=result.nfe, timings=pb.Timings(queue_seconds=out.queue_seconds,
                                                                  compute_seconds=out.compute_seconds),
                               grid_png=grid_png(result.samples, scale=scale) if images else b"")


def model_info(pb, entry, served):
    model = served.loaded.model
    if entry.family is not None:  # a latent pipeline (models/pipelines)
        return _pipeline_info(pb, entry, served)
    if entry.kind == "block_diffusion":
        return _block_info(pb, entry, served)
    masked = entry.kind == "masked"
    shape = [model.length] if masked else list(model.shape)
    info = pb.ModelInfo(name=entry.name, kind=entry.kind, shape=shape,
                        num_classes=getattr(model, "num_classes", None) or 0,
                        default_sampler=entry.default_sampler, default_steps=entry.default_steps,
                        backend=served.backend, ready=served.ready,
                        vocab_size=getattr(model, "vocab_size", 0) if masked else 0)
    if entry.guidance is not None:
        info.guidance = entry.guidance
    if masked:
        tokenizer = getattr(model, "tokenizer", None)
        info.layout, info.mask_token_id = "L", int(model.mask_id)
        info.mask_token = getattr(tokenizer, "mask_token", None) or ""
        info.tokenizer = _tokenizer_name(tokenizer)
        from .plan import takes_prompt  # (lazily: the plan imports torch)

        info.takes_prompt = takes_prompt(model)  # a text LM: `prompt` + max_new_tokens
    else:
        info.layout, info.value_min, info.value_max = "CHW", -1.0, 1.0
    return info


def _block_info(pb, entry, served):
    """ModelInfo of a block-diffusion LM (DiffusionGemma): token output, a prompt, no mask token."""
    model = served.loaded.model
    tokenizer = getattr(model.processor, "tokenizer", model.processor)
    return pb.ModelInfo(name=entry.name, kind=entry.kind, shape=[model.length], default_sampler=entry.default_sampler,
                        default_steps=entry.default_steps, backend=served.backend, ready=served.ready,
                        vocab_size=model.vocab_size, layout="L", mask_token_id=-1,
                        tokenizer=_tokenizer_name(tokenizer), takes_prompt=True)


def _pipeline_info(pb, entry, served):
    """ModelInfo of a text-to-image or class-conditional latent pipeline: its inputs, sizes and defaults."""
    d = served.loaded.model.describe()
    info = pb.ModelInfo(name=entry.name, kind=d["kind"], shape=[3, d["default_height"], d["default_width"]],
                        num_classes=d["num_classes"] or 0, default_sampler=entry.default_sampler,
                        default_steps=entry.default_steps, backend=served.backend, ready=served.ready,
                        layout="CHW", value_min=-1.0, value_max=1.0, family=d["family"],
                        takes_prompt=d["takes_prompt"], default_height=d["default_height"],
                        default_width=d["default_width"], size_multiple=d["size_multiple"],
                        takes_distilled_guidance=d["distilled_guidance"])
    guidance = entry.guidance if entry.guidance is not None else d["default_guidance"]
    if guidance is not None:
        info.guidance = guidance
    return info


def _tokenizer_name(tokenizer) -> str:
    """The tokenizer's name (its checkpoint's directory name, never a path), else its class."""
    if tokenizer is None:
        return ""
    source = str(getattr(tokenizer, "name_or_path", "") or "").rstrip("/\\")
    return source.replace("\\", "/").rsplit("/", 1)[-1] or type(tokenizer).__name__


def sampler_infos(pb, kind: str):
    out = []
    for name, spec in sorted(REGISTRY.items()):
        if kind and kind not in spec.kinds:
            continue
        options = []
        for key, opt in spec.options.items():
            info = pb.OptionInfo(name=key, type=opt.type.__name__, default_json=json.dumps(opt.default),
                                 choices=[str(c) for c in opt.choices or ()], help=opt.help)
            if opt.minimum is not None:
                info.minimum = opt.minimum
            if opt.maximum is not None:
                info.maximum = opt.maximum
            options.append(info)
        out.append(pb.SamplerInfo(name=name, kinds=list(spec.kinds), nfe_per_step=spec.nfe_per_step,
                                  order=spec.order, stochastic=spec.stochastic, when_to_use=spec.when_to_use,
                                  options=options, max_steps=spec.max_steps))
    return out
