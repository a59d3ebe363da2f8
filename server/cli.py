"""The `diffserve` command line.  Bad arguments give a one-line error and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from samplers.errors import DiffservError, InvalidRequest


def _parse_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise InvalidRequest(f"--option {text!r}: expected KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _search_request(args):
    from .generation import SearchRequest

    if not args.search:
        return None
    return SearchRequest(args.search, args.budget or 0, args.verifier or "",
                         dict(_parse_option(o) for o in args.search_option),
                         dict(_parse_option(o) for o in args.verifier_option))


def cmd_generate_remote(args) -> int:
    import numpy as np
    from google.protobuf import struct_pb2
    from tqdm import tqdm

    from .client import connect, tensor_to_array

    pb, stub, metadata = connect(args.server, args.token, args.ca)
    options = struct_pb2.Struct()
    options.update(dict(_parse_option(o) for o in args.option))
    request = pb.GenerateRequest(model=args.model, sampler=args.sampler or "", steps=args.steps or 0,
                                 num_samples=args.n, base_seed=args.seed, grid=args.grid or "",
                                 prompt_text=args.prompt or "", options=options,
                                 format=pb.TENSOR if args.format == "npy" else pb.OUTPUT_FORMAT_UNSPECIFIED)
    if args.search:
        request.search.CopyFrom(pb.SearchSpec(method=args.search, budget_nfe=args.budget or 0,
                                              verifier=args.verifier or ""))
        request.search.options.update(dict(_parse_option(o) for o in args.search_option))
        request.search.verifier_options.update(dict(_parse_option(o) for o in args.verifier_option))
    if args.class_label is not None:
        request.class_label = args.class_label
    if args.guidance is not None:
        request.guidance = args.guidance
    result = None
    with tqdm(desc=f"{args.model} @ {args.server}", unit="step", leave=False, disable=args.quiet) as bar:
        for event in stub.GenerateStream(request, metadata=metadata):
            if event.HasField("progress"):
                bar.total = event.progress.steps
                bar.update(event.progress.step - bar.n)
                if event.progress.HasField("best_reward"):
                    bar.set_postfix(best_reward=f"{event.progress.best_reward:.3f}")
            else:
                result = event.result
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if result.samples and result.samples[0].WhichOneof("data") == "text":
        out.write_text("\n\n".join(s.text for s in result.samples) + "\n")
    elif args.format == "npy":
        np.save(out, np.stack([tensor_to_array(s.tensor) for s in result.samples]))
    else:
        out.write_bytes(result.grid_png)
    rewards = [s.reward for s in result.samples if s.HasField("reward")]
    if rewards:
        print(f"rewards: {', '.join(f'{r:.3f}' for r in rewards)}")
    print(f"wrote {len(result.samples)} samples to {out} ({result.nfe} NFE, compute "
          f"{result.timings.compute_seconds:.2f} s, queue {result.timings.queue_seconds:.3f} s)")
    return 0


def cmd_generate(args) -> int:
    if args.server:
        return cmd_generate_remote(args)
    import numpy as np
    from tqdm import tqdm

    from models.config import load_config, lookup
    from models.loading import load_model

    from .app import load_resources
    from .generation import GenerateRequest, generate
    from .images import grid_png

    entry = lookup(load_config(args.config), args.model)
    loaded = load_model(entry)
    steps = args.steps if args.steps is not None else (None if entry.kind == "masked" else entry.default_steps)
    request = GenerateRequest(sampler=args.sampler or entry.default_sampler, steps=steps,
                              n=args.n, seed=args.seed, class_label=args.class_label,
                              guidance=args.guidance if args.guidance is not None else
                              (entry.guidance if args.class_label is not None else None),
                              grid=args.grid, options=dict(_parse_option(o) for o in args.option),
                              prompt_text=args.prompt, search=_search_request(args))
    with tqdm(total=request.steps, desc=f"{entry.name} {request.sampler}", unit="step", leave=False,
              disable=args.quiet) as bar:
        def progress(info):
            if hasattr(info, "budget_nfe"):  # a search: NFE spent of the budget
                bar.total = info.budget_nfe
                bar.update(info.nfe - bar.n)
            else:
                bar.total = info.steps
                bar.update(1)
        resources = load_resources(args.config) if request.search else None
        from .config import load_server_config
        from .plan import Limits

        limits = Limits.of(load_server_config(args.config))  # the server's own limits: one plan, one answer
        result = generate(loaded, request, hook=progress, resources=resources, limits=limits)
    if result.rewards is not None:
        print(f"rewards: {', '.join(f'{r:.3f}' for r in result.rewards)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if result.texts is not None:
        out.write_text("\n\n".join(result.texts) + "\n")
    elif args.format == "npy":
        np.save(out, result.samples.float().numpy())
    else:
        out.write_bytes(grid_png(result.samples))
    seeds = result.seeds
    print(f"wrote {len(seeds)} samples to {out} ({result.nfe} NFE, seeds {seeds[0]}..{seeds[-1]})")
    return 0


def cmd_samplers(args) -> int:
    if args.server:
        from .client import connect
        pb, stub, metadata = connect(args.server, args.token, args.ca)
        rows = [(s.name, s.kinds, s.when_to_use, {o.name: o.default_json for o in s.options})
                for s in stub.ListSamplers(pb.ListSamplersRequest(), metadata=metadata).samplers]
    else:
        from samplers import REGISTRY
        rows = [(name, spec.kinds, spec.when_to_use, {k: o.default for k, o in spec.options.items()})
                for name, spec in sorted(REGISTRY.items())]
    for name, kinds, when, opts in rows:
        extra = ", ".join(f"{k}={v}" for k, v in opts.items())
        print(f"{name:16s} {'/'.join(kinds):18s} {when}" + (f"  [{extra}]" if extra else ""))
    return 0


def cmd_models(args) -> int:
    if args.server:
        from .client import connect
        pb, stub, metadata = connect(args.server, args.token, args.ca)
        for m in stub.ListModels(pb.ListModelsRequest(), metadata=metadata).models:
            state = "ready" if m.ready else "loading"
            print(f"{m.name:18s} {m.kind:10s} default {m.default_sampler} x {m.default_steps}  "
                  f"shape {list(m.shape)}  {m.backend}  {state}")
        return 0
    from models.config import load_config

    for entry in load_config(args.config).values():
        print(f"{entry.name:18s} {entry.kind:10s} default {entry.default_sampler} x {entry.default_steps}")
    return 0


def cmd_export(args) -> int:
    from models.backends import export_model
    from models.config import load_config, lookup

    entry = lookup(load_config(args.config), args.model)
    for line in export_model(entry, args.format, opset=args.opset, fp16=args.fp16, max_batch=args.max_batch,
                             out_dir=Path(args.out_dir) if args.out_dir else None):
        print(line)
    return 0


def cmd_serve(args) -> int:
    from .app import serve
    from .config import load_server_config

    token = os.environ.get(args.token_env) if args.token_env else None
    if args.token_env and not token:
        raise InvalidRequest(f"--token-env: environment variable {args.token_env} is empty or unset")
    config = load_server_config(args.config, port=args.port, metrics_port=args.metrics_port, host=args.host,
                                auth_token=token, redis_url=args.redis or os.environ.get("DIFFSERVE_REDIS_URL"))
    serve(args.config, config)
    return 0


def _client_flags(parser) -> None:
    parser.add_argument("--server", help="HOST:PORT of a running server (default: run in-process)")
    parser.add_argument("--token", help="bearer token for a server that requires one")
    parser.add_argument("--ca", help="CA certificate (PEM) to reach a TLS server")


def build_parser() -> argparse.ArgumentParser:
    from models.config import DEFAULT_CONFIG

    parser = argparse.ArgumentParser(prog="diffserve", description="Serve and sample generative models.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate samples in-process and write a PNG grid or a tensor")
    gen.add_argument("--config", default=str(DEFAULT_CONFIG), help="models config (TOML); default: the zoo")
    gen.add_argument("--model", required=True)
    gen.add_argument("--sampler", help="sampler name (see `diffserve samplers`); default: the model's")
    gen.add_argument("--steps", type=int, help="sampler steps; default: the model's")
    gen.add_argument("--class", dest="class_label", type=int, help="class label for conditional models")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    gen.add_argument("--n", type=int, default=16, help="number of samples")
    gen.add_argument("--seed", type=int, default=0, help="seed of the first sample (sample k uses seed + k)")
    gen.add_argument("--grid", help="time grid: uniform_t, uniform_lambda, karras, quadratic_t")
    gen.add_argument("--option", action="append", default=[], help="sampler option KEY=VALUE (repeatable)")
    gen.add_argument("--prompt", help="masked models: a text template; the mask token marks positions to fill")
    gen.add_argument("--search", help="test-time search method instead of one sampler run (e.g. evosearch)")
    gen.add_argument("--budget", type=int, help="search: NFE budget per sample")
    gen.add_argument("--verifier", help="search: verifier name (e.g. digit-class)")
    gen.add_argument("--search-option", action="append", default=[], help="search method option KEY=VALUE")
    gen.add_argument("--verifier-option", action="append", default=[], help="verifier option KEY=VALUE")
    gen.add_argument("--format", choices=("png", "npy"), default="png")
    gen.add_argument("--out", default="grid.png")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    _client_flags(gen)
    gen.set_defaults(func=cmd_generate)
    sam = sub.add_parser("samplers", help="list the samplers")
    _client_flags(sam)
    sam.set_defaults(func=cmd_samplers)
    mod = sub.add_parser("models", help="list the models in a config or on a server")
    mod.add_argument("--config", default=str(DEFAULT_CONFIG))
    _client_flags(mod)
    mod.set_defaults(func=cmd_models)
    exp = sub.add_parser("export", help="export a model's network to ONNX (dynamic batch) or a TensorRT engine")
    exp.add_argument("--config", default=str(DEFAULT_CONFIG), help="models config (TOML); default: the zoo")
    exp.add_argument("--model", required=True)
    exp.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx")
    exp.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    exp.add_argument("--fp16", action="store_true", help="onnx: half-precision weights; tensorrt: FP16 engine")
    exp.add_argument("--max-batch", type=int, default=64, help="TensorRT profile: batch 1..max (default 64)")
    exp.add_argument("--out-dir", help="where to write (default: the model's export_dir, else <model>/onnx)")
    exp.set_defaults(func=cmd_export)
    srv = sub.add_parser("serve", help="run the gRPC server")
    srv.add_argument("--config", default=str(DEFAULT_CONFIG), help="models config (TOML); default: the zoo")
    srv.add_argument("--host", help="address to bind (default from config: 127.0.0.1)")
    srv.add_argument("--port", type=int, help="gRPC port (default 50051)")
    srv.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 9464)")
    srv.add_argument("--token-env", help="name of an environment variable holding the bearer token")
    srv.add_argument("--redis", help="job queue's Redis URL (default: start a local redis-server under run/redis)")
    srv.set_defaults(func=cmd_serve)
    from .queue.cli import add_queue_commands

    add_queue_commands(sub, _client_flags)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (DiffservError, ValueError, FileNotFoundError) as err:
        print(f"diffserve: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
