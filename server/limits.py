"""Size limits checked at the door, before any work: every field of a request message is bounded (names,
seeds, prompts, options), and a response's size is estimated before compute.

`check_message` runs on every decoded request (ErrorInterceptor), so a 16 MB prompt or a 1 MB model name
is refused before a tokenizer, a registry lookup or an error message ever sees it.  The request plan then
checks the values (against the model, the registries and the server's limits).
"""

from __future__ import annotations

import math

from samplers.errors import InvalidRequest

from .errors import quote

MAX_NAME_CHARS = 128          # model, sampler, grid, search method, verifier names
MAX_PROMPT_BYTES = 65_536     # prompt_text (the plan bounds it again by the model's length)
MAX_PROMPT_TOKENS = 65_536    # prompt_tokens (the plan bounds it again by the model's length)
MAX_SEEDS = 100_000           # seeds of one request (a queued job's largest; Generate's limit is lower)
MAX_OPTIONS_BYTES = 65_536    # all options of one block, serialized
MAX_OPTION_KEYS = 64
MAX_PNG_SCALE = 16
NAMES = {"GenerateRequest": ("model", "sampler", "grid"), "GetModelRequest": ("name",),
         "ListSamplersRequest": ("kind",), "SearchSpec": ("method", "verifier")}


def _name(message, field: str, where: str) -> None:
    value = getattr(message, field)
    if len(value) > MAX_NAME_CHARS:
        raise InvalidRequest(f"{where}{field}: {len(value)} characters, at most {MAX_NAME_CHARS}: {quote(value)}")


def _options_size(message, fields: tuple[str, ...], where: str) -> None:
    """Struct blocks and typed maps alike: at most MAX_OPTION_KEYS keys each, MAX_OPTIONS_BYTES in all."""
    size = 0
    for field in fields:
        block = getattr(message, field)
        is_struct = hasattr(block, "fields")
        keys = len(block.fields) if is_struct else len(block)
        if keys > MAX_OPTION_KEYS:
            raise InvalidRequest(f"{where}{field}: {keys} keys, at most {MAX_OPTION_KEYS}")
        long = next((k for k in (block.fields if is_struct else block) if len(k) > MAX_NAME_CHARS), None)
        if long is not None:
            raise InvalidRequest(f"{where}{field}: a key of {len(long)} characters, at most {MAX_NAME_CHARS}: "
                                 f"{quote(long)}")
        size += block.ByteSize() if is_struct else sum(len(k) + v.ByteSize() for k, v in block.items())
    if size > MAX_OPTIONS_BYTES:
        raise InvalidRequest(f"{where}{fields[0]}: {size} bytes of options, at most {MAX_OPTIONS_BYTES}")


def check_generate_request(request, where: str = "") -> None:
    """Bound every field of a GenerateRequest by size (not by value: the plan checks values)."""
    for field in NAMES["GenerateRequest"]:
        _name(request, field, where)
    if len(request.seeds) > MAX_SEEDS:
        raise InvalidRequest(f"{where}seeds: {len(request.seeds)} seeds, at most {MAX_SEEDS}")
    for field in ("prompt_text", "prompt", "negative_prompt"):
        prompt_bytes = len(getattr(request, field).encode("utf-8", "surrogatepass"))
        if prompt_bytes > MAX_PROMPT_BYTES:
            raise InvalidRequest(f"{where}{field}: {prompt_bytes} bytes, at most {MAX_PROMPT_BYTES}")
    if len(request.prompt_tokens) > MAX_PROMPT_TOKENS:
        raise InvalidRequest(f"{where}prompt_tokens: {len(request.prompt_tokens)} tokens, at most {MAX_PROMPT_TOKENS}")
    if request.png_scale > MAX_PNG_SCALE:
        raise InvalidRequest(f"{where}png_scale: {request.png_scale} is outside [0, {MAX_PNG_SCALE}]")
    _options_size(request, ("options", "typed_options"), where)
    if request.HasField("search"):
        for field in NAMES["SearchSpec"]:
            _name(request.search, field, f"{where}search.")
        _options_size(request.search, ("options", "verifier_options", "typed_options", "typed_verifier_options"),
                      f"{where}search.")


def check_message(message) -> None:
    """Size bounds of any request message the server receives (unknown types pass)."""
    kind = type(message).__name__
    if kind == "GenerateRequest":
        check_generate_request(message)
    elif kind == "SubmitJobRequest":
        check_generate_request(message.request, "request.")
    elif kind in NAMES:
        for field in NAMES[kind]:
            _name(message, field, "")


def response_bytes(kind: str, sample_shape: tuple[int, ...], n: int, output: str, png_scale: int = 1) -> int:
    """An upper estimate of a Generate response's size: n samples (+ the PNG grid) of `sample_shape`
    ((C, H, W) images, (L,) token ids) in `output` format ("png", "tensor", "text")."""
    elements = math.prod(sample_shape)
    if kind == "masked":  # token ids as varints (<= 5 bytes), plus the text or the int64 tensor
        per = elements * 5 + (elements * 8 if output == "tensor" else elements * 32)
        return n * (per + 64) + 256
    if output == "tensor":
        return n * (elements * 4 + 64) + 256
    c, h, w = sample_shape[-3:]
    scale = max(1, png_scale)
    png = c * h * scale * (w * scale + 1) * 1.01 + 128  # PNG of incompressible pixels: raw rows + filter bytes
    return int(2 * n * png) + 256  # each sample and the grid of all of them


def check_response_size(kind: str, sample_shape: tuple[int, ...], n: int, output: str, png_scale: int,
                        max_bytes: int) -> None:
    """Refuse before compute a response larger than the message limit (the client could not receive it)."""
    size = response_bytes(kind, sample_shape, n, output, png_scale)
    if size <= max_bytes:
        return
    per = max(1, (size - 256) // n)
    fits = max(1, (max_bytes - 256) // per)
    raise InvalidRequest(f"num_samples: {n} {output} samples make a response of about {size / 2**20:.1f} MiB, "
                         f"above the message limit of {max_bytes / 2**20:.1f} MiB; ask for at most {fits} per "
                         f"request, or queue them as a job (SubmitJob; GetJobResults pages the samples)")
