"""The command line's client for a running server: connections, option parsing, request building and
one-line errors, shared by `generate --server`, `models`, `samplers` and the queue commands.

Imports neither torch nor the samplers: `diffserve --help` and every remote command start in a fraction
of a second.
"""

from __future__ import annotations

import argparse
import json

import grpc
import numpy as np

from . import protogen

DEFAULT_SERVER = "127.0.0.1:50051"


def _channel(address: str, ca: str | None = None) -> grpc.Channel:
    if ca:
        with open(ca, "rb") as f:
            return grpc.secure_channel(address, grpc.ssl_channel_credentials(f.read()))
    return grpc.insecure_channel(address)


def _metadata(token: str | None) -> tuple:
    return (("authorization", f"Bearer {token}"),) if token else ()


def connect(address: str, token: str | None = None, ca: str | None = None):
    """(pb module, Diffserve stub, call metadata) for a server at HOST:PORT."""
    pb, pb_grpc = protogen.load()
    return pb, pb_grpc.DiffserveStub(_channel(address, ca)), _metadata(token)


def connect_jobs(address: str, token: str | None = None, ca: str | None = None):
    """(jobs pb module, Jobs stub, call metadata) for a server at HOST:PORT."""
    jobs_grpc = protogen.module("jobs_pb2_grpc")
    return protogen.module("jobs_pb2"), jobs_grpc.JobsStub(_channel(address, ca)), _metadata(token)


def takes_prompt(args) -> bool:
    """Whether `--prompt` is the request's `prompt` (a text-to-image or chat model, as the server says)."""
    if not args.prompt:
        return False
    pb, stub, metadata = connect(args.server, args.token, args.ca)
    return stub.GetModel(pb.GetModelRequest(name=args.model), metadata=metadata).takes_prompt


def tensor_to_array(t) -> np.ndarray:
    """A Tensor proto as an array (the data is little-endian, C order; see diffserve.proto)."""
    return np.frombuffer(t.data, dtype=np.dtype(t.dtype).newbyteorder("<")).reshape(tuple(t.shape))


# arguments
def option(text: str) -> tuple[str, object]:
    """argparse type of --option KEY=VALUE: VALUE as JSON (0.5, true, [1, 2]), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text[:100]!r}: expected KEY=VALUE, e.g. eta=0.5")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def positive_int(text: str) -> int:
    """argparse type of counts (--n, --steps, ...): an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:100]!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer (at least 1)")
    return value


def non_negative_int(text: str) -> int:
    """argparse type of seeds and labels: an integer of at least 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:100]!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def option_value(pb, value):
    """A parsed option value as a typed OptionValue proto."""
    if isinstance(value, bool):
        return pb.OptionValue(bool_value=value)
    if isinstance(value, int):
        return pb.OptionValue(int_value=value)
    if isinstance(value, float):
        return pb.OptionValue(number_value=value)
    if isinstance(value, str):
        return pb.OptionValue(string_value=value)
    if isinstance(value, list):
        return pb.OptionValue(list_value=pb.OptionList(values=[option_value(pb, v) for v in value]))
    raise ValueError(f"option value {str(value)[:100]!r}: expected a number, a string, true/false or a list")


def generate_request(pb, args, fmt: int, takes_prompt: bool = False):
    """The GenerateRequest of `generate --server` and `submit` arguments (the same flags, one builder).
    `--prompt` is the prompt of a model that `takes_prompt` (text-to-image pipelines, chat LMs), else a
    masked model's text template."""
    request = pb.GenerateRequest(model=args.model, sampler=args.sampler or "", steps=args.steps or 0,
                                 num_samples=args.n, base_seed=args.seed, grid=args.grid or "",
                                 format=fmt, png_scale=args.scale or 0,
                                 negative_prompt=args.negative_prompt or "", height=args.height or 0,
                                 width=args.width or 0)
    if takes_prompt:
        request.prompt = args.prompt or ""
    else:
        request.prompt_text = args.prompt or ""
    if args.distilled_guidance is not None:
        request.distilled_guidance = args.distilled_guidance
    if args.max_new_tokens:
        request.max_new_tokens = args.max_new_tokens
    for key, value in args.option:
        request.typed_options[key].CopyFrom(option_value(pb, value))
    if args.class_label is not None:
        request.class_label = args.class_label
    if args.guidance is not None:
        request.guidance = args.guidance
    if args.search:
        request.search.CopyFrom(pb.SearchSpec(method=args.search, budget_nfe=args.budget or 0,
                                              verifier=args.verifier or ""))
        for key, value in args.search_option:
            request.search.typed_options[key].CopyFrom(option_value(pb, value))
        for key, value in args.verifier_option:
            request.search.typed_verifier_options[key].CopyFrom(option_value(pb, value))
    return request


def error_line(err: grpc.RpcError, address: str) -> str:
    """One line for a failed call: the status and the server's message, or why the server is unreachable."""
    code, details = err.code(), err.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and any(
            s in details.lower() for s in ("connect", "connection refused", "dns", "unreachable", "name resolution")):
        return f"cannot reach a diffserve server at {address} (is the server running? `make serve` starts one)"
    return f"{code.name}: {details}"


def add_request_flags(parser: argparse.ArgumentParser) -> None:
    """The request flags of `generate` and `submit` (one definition, so both take the same requests)."""
    parser.add_argument("--model", required=True, help="model name (see `diffserve models`)")
    parser.add_argument("--sampler", help="sampler name (see `diffserve samplers`); default: the model's")
    parser.add_argument("--steps", type=positive_int, help="sampler steps; default: the model's")
    parser.add_argument("--class", dest="class_label", type=non_negative_int,
                        help="class label for class-conditional models (e.g. the digit 0-9)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (with --class or a "
                                                      "text-to-image --prompt; 1 = none)")
    parser.add_argument("--n", type=positive_int, default=16, help="number of samples (default 16)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the first sample; sample k uses seed + k (default 0)")
    parser.add_argument("--grid", help="time grid: uniform_t, uniform_lambda, karras, quadratic_t; default: the "
                                       "model's")
    parser.add_argument("--option", action="append", default=[], type=option, metavar="KEY=VALUE",
                        help="sampler option, VALUE as JSON (e.g. eta=0.5); repeatable")
    parser.add_argument("--prompt", help="text-to-image models: the prompt; text LMs (LLaDA, MDLM / BD3-LM, "
                                         "DiffusionGemma): the user message (through the chat template where the "
                                         "model has one); other masked (text) models: a text template in which "
                                         "the mask token marks positions to fill")
    parser.add_argument("--negative-prompt", help="text-to-image models: what to steer away from (the "
                                                  "unconditional half of guidance)")
    parser.add_argument("--height", type=positive_int, help="text-to-image models: image height in pixels "
                                                            "(default: the model's)")
    parser.add_argument("--width", type=positive_int, help="text-to-image models: image width in pixels "
                                                           "(default: the model's)")
    parser.add_argument("--max-new-tokens", type=positive_int,
                        help="text LMs: tokens to generate after the prompt (default 128)")
    parser.add_argument("--distilled-guidance", type=float,
                        help="FLUX-dev: the distilled guidance value (its own input, not --guidance)")
    parser.add_argument("--search", help="test-time search method instead of one sampler run (e.g. best_of_n, "
                                         "evosearch)")
    parser.add_argument("--budget", type=positive_int, help="search: NFE budget per sample")
    parser.add_argument("--verifier", help="search: verifier name (e.g. digit-class, ink-mass)")
    parser.add_argument("--search-option", action="append", default=[], type=option, metavar="KEY=VALUE",
                        help="search method option (repeatable)")
    parser.add_argument("--verifier-option", action="append", default=[], type=option, metavar="KEY=VALUE",
                        help="verifier option (repeatable)")
    parser.add_argument("--scale", type=positive_int,
                        help="PNG output: enlarge each sample this many times (nearest neighbour); default: "
                             "native resolution")


def add_connection_flags(parser: argparse.ArgumentParser, default: str | None) -> None:
    """--server, --token, --ca; `default` None: without --server the command runs in-process."""
    where = (f"HOST:PORT of the server (default {default})" if default else
             "HOST:PORT of a running server (default: run in-process, no server needed)")
    parser.add_argument("--server", default=default, help=where)
    parser.add_argument("--token", help="bearer token, for a server started with --token-env")
    parser.add_argument("--ca", help="CA certificate (PEM file) to reach a TLS server")
