"""The `diffserve` command line.  Every mistake gives one line and exit status 2, never a traceback: bad
arguments (argparse names the flag), refused requests, a server's status (code and message), an unreachable
server (its address), a port in use.  Ctrl-C exits quietly with 130.

Nothing heavy is imported before it is needed: `--help` and the remote commands never import torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .client import DEFAULT_SERVER, add_connection_flags, add_request_flags, positive_int

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "zoo" / "models.toml"  # models.config's, without torch
CPU_THREADS = 1  # in-process torch threads: more thrash on shared cores (1.1 s vs 23 ms a step, make demo)


def _search_request(args):
    from .generation import SearchRequest

    if not args.search:
        return None
    return SearchRequest(args.search, args.budget or 0, args.verifier or "", dict(args.search_option),
                         dict(args.verifier_option))


def _default_out(args, text: bool) -> Path | None:
    """Where results go without --out: text to stdout (None), tensors to samples.npy, images to grid.png."""
    if args.out:
        return Path(args.out)
    if text:
        return None
    return Path("samples.npy" if args.format == "npy" else "grid.png")


def _write_texts(texts, out: Path | None) -> str:
    if out is None:
        print("\n\n".join(texts))
        return "stdout"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(texts) + "\n")
    return str(out)


def _prompt_fields(args, loaded) -> dict:
    """`--prompt` is the prompt of a text-to-image pipeline or a text LM (LLaDA, MDLM / BD3-LM, DiffusionGemma),
    else a masked model's text template."""
    from .plan import takes_prompt

    prompted = loaded.entry.family is not None or takes_prompt(loaded.model)
    return {"prompt" if prompted else "prompt_text": args.prompt, "negative_prompt": args.negative_prompt,
            "height": args.height, "width": args.width, "distilled_guidance": args.distilled_guidance,
            "max_new_tokens": args.max_new_tokens}


def cmd_generate_remote(args) -> int:
    import numpy as np

    from .client import connect, generate_request, takes_prompt, tensor_to_array

    pb, stub, metadata = connect(args.server, args.token, args.ca)
    request = generate_request(pb, args, pb.TENSOR if args.format == "npy" else pb.OUTPUT_FORMAT_UNSPECIFIED,
                               takes_prompt(args))
    result = None
    from tqdm import tqdm

    with tqdm(desc=f"{args.model} @ {args.server}", unit="step", leave=False, disable=args.quiet) as bar:
        for event in stub.GenerateStream(request, metadata=metadata):
            if event.HasField("progress"):
                bar.total = event.progress.steps
                bar.update(event.progress.step - bar.n)
                if event.progress.HasField("best_reward"):
                    bar.set_postfix(best_reward=f"{event.progress.best_reward:.3f}")
            else:
                result = event.result
    texts = result.samples and result.samples[0].WhichOneof("data") == "text"
    out = _default_out(args, bool(texts))
    if texts:
        where = _write_texts([s.text for s in result.samples], out)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.format == "npy":
            np.save(out, np.stack([tensor_to_array(s.tensor) for s in result.samples]))
        else:
            out.write_bytes(result.grid_png)
        where = str(out)
    rewards = [s.reward for s in result.samples if s.HasField("reward")]
    if rewards:
        print(f"rewards: {', '.join(f'{r:.3f}' for r in rewards)}", file=sys.stderr if out is None else sys.stdout)
    print(f"wrote {len(result.samples)} samples to {where} ({result.nfe} NFE, compute "
          f"{result.timings.compute_seconds:.2f} s, queue {result.timings.queue_seconds:.3f} s)",
          file=sys.stderr if out is None else sys.stdout)
    return 0


def cmd_generate(args) -> int:
    if args.server:
        return cmd_generate_remote(args)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # no install advice between a user and their samples
    import numpy as np
    import torch
    from tqdm import tqdm

    from models.config import load_config, lookup
    from models.loading import load_model

    torch.set_num_threads(args.threads)

    from .app import load_resources
    from .generation import GenerateRequest, generate
    from .images import grid_png

    entry = lookup(load_config(args.config), args.model)
    loaded = load_model(entry)
    steps = args.steps if args.steps is not None else (None if entry.kind == "masked" else entry.default_steps)
    text_to_image = entry.family is not None
    request = GenerateRequest(sampler=args.sampler or entry.default_sampler, steps=steps,
                              n=args.n, seed=args.seed, class_label=args.class_label,
                              guidance=args.guidance if args.guidance is not None else
                              (entry.guidance if args.class_label is not None or text_to_image else None),
                              grid=args.grid, options=dict(args.option), search=_search_request(args),
                              **_prompt_fields(args, loaded))
    what = request.search.method if request.search else request.sampler
    with tqdm(total=request.steps, desc=f"{entry.name} {what}", unit="step", leave=False,
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
    out = _default_out(args, result.texts is not None)
    if result.texts is not None:
        where = _write_texts(result.texts, out)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.format == "npy":
            np.save(out, result.samples.float().numpy())
        else:
            out.write_bytes(grid_png(result.samples, scale=args.scale or 1))
        where = str(out)
    seeds = result.seeds
    print(f"wrote {len(seeds)} samples to {where} ({result.nfe} NFE, seeds {seeds[0]}..{seeds[-1]})",
          file=sys.stderr if out is None else sys.stdout)
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
        raise ValueError(f"--token-env: environment variable {args.token_env} is empty or unset")
    config = load_server_config(args.config, port=args.port, metrics_port=args.metrics_port, host=args.host,
                                auth_token=token, redis_url=args.redis or os.environ.get("DIFFSERVE_REDIS_URL"))
    serve(args.config, config)
    return 0


def _config_flag(parser, what: str = "models config (TOML)") -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help=f"{what}; default: the zoo's")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffserve", description="Serve and sample generative models.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate samples (in-process, or on a server with --server) and write "
                                          "a PNG grid, a tensor or text")
    _config_flag(gen)
    add_request_flags(gen)
    gen.add_argument("--format", choices=("png", "npy"), default="png",
                     help="png: one grid picture; npy: the raw samples as a NumPy array (default png)")
    gen.add_argument("--out", help="output file (default: grid.png, samples.npy with --format npy; text models "
                                   "print to stdout)")
    gen.add_argument("--threads", type=positive_int, default=CPU_THREADS,
                     help=f"in-process: torch CPU threads (default {CPU_THREADS}; more slow down on shared cores)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    add_connection_flags(gen, None)
    gen.set_defaults(func=cmd_generate)
    sam = sub.add_parser("samplers", help="list the samplers (in-process, or a server's with --server)")
    add_connection_flags(sam, None)
    sam.set_defaults(func=cmd_samplers)
    mod = sub.add_parser("models", help="list the models in a config, or on a server with --server")
    _config_flag(mod)
    add_connection_flags(mod, None)
    mod.set_defaults(func=cmd_models)
    exp = sub.add_parser("export", help="export a model's network to ONNX (dynamic batch) or a TensorRT engine")
    _config_flag(exp)
    exp.add_argument("--model", required=True, help="model name in the config")
    exp.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx", help="what to export (default onnx)")
    exp.add_argument("--opset", type=positive_int, default=17, help="ONNX opset (default 17)")
    exp.add_argument("--fp16", action="store_true", help="onnx: half-precision weights; tensorrt: FP16 engine")
    exp.add_argument("--max-batch", type=positive_int, default=64, help="TensorRT profile: batch 1..max (default 64)")
    exp.add_argument("--out-dir", help="where to write (default: the model's export_dir, else <model>/onnx)")
    exp.set_defaults(func=cmd_export)
    srv = sub.add_parser("serve", help="run the gRPC server (and, without --redis, a local Redis and a worker)")
    _config_flag(srv)
    srv.add_argument("--host", help="address to bind (default from config: 127.0.0.1)")
    srv.add_argument("--port", type=int, help="gRPC port (default 50051)")
    srv.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 9464; 0: any free port)")
    srv.add_argument("--token-env", help="name of an environment variable holding the bearer token")
    srv.add_argument("--redis", help="job queue's Redis URL (default: $DIFFSERVE_REDIS_URL, else start a local "
                                     "redis-server under run/redis)")
    srv.set_defaults(func=cmd_serve)
    from .queue.cli import add_queue_commands

    add_queue_commands(sub)
    return parser


def _error_line(err: BaseException, args) -> str | None:
    """One line for an error the user can act on; None for a bug (which keeps its traceback)."""
    errors = sys.modules.get("samplers.errors")  # imported whenever one of its errors could be raised
    if errors is not None and isinstance(err, errors.DiffservError):
        return str(err)
    grpc = sys.modules.get("grpc")
    if grpc is not None and isinstance(err, grpc.RpcError):
        from .client import error_line

        return error_line(err, getattr(args, "server", None) or DEFAULT_SERVER)
    if isinstance(err, (ValueError, OSError)):
        return str(err)
    return None


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as err:
        line = _error_line(err, args)
        if line is None:
            raise
        print(f"diffserve: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
