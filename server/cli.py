"""The `diffserve` command line.  Bad arguments give a one-line error and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import json
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


def cmd_generate(args) -> int:
    import numpy as np
    from tqdm import tqdm

    from models.config import load_config, lookup
    from models.loading import load_model

    from .generation import GenerateRequest, generate
    from .images import grid_png

    entry = lookup(load_config(args.config), args.model)
    loaded = load_model(entry)
    request = GenerateRequest(sampler=args.sampler or entry.default_sampler, steps=args.steps or entry.default_steps,
                              n=args.n, seed=args.seed, class_label=args.class_label,
                              guidance=args.guidance if args.guidance is not None else
                              (entry.guidance if args.class_label is not None else None),
                              grid=args.grid, options=dict(_parse_option(o) for o in args.option))
    with tqdm(total=request.steps, desc=f"{entry.name} {request.sampler}", unit="step", leave=False,
              disable=args.quiet) as bar:
        samples, nfe, seeds = generate(loaded, request, hook=lambda info: bar.update(1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "npy":
        np.save(out, samples.float().numpy())
    else:
        out.write_bytes(grid_png(samples))
    print(f"wrote {len(seeds)} samples to {out} ({nfe} NFE, seeds {seeds[0]}..{seeds[-1]})")
    return 0


def cmd_samplers(args) -> int:
    from samplers import REGISTRY

    for name, spec in sorted(REGISTRY.items()):
        opts = ", ".join(f"{k}={o.default}" for k, o in spec.options.items())
        print(f"{name:16s} {'/'.join(spec.kinds):18s} {spec.when_to_use}" + (f"  [{opts}]" if opts else ""))
    return 0


def cmd_models(args) -> int:
    from models.config import load_config

    for entry in load_config(args.config).values():
        print(f"{entry.name:18s} {entry.kind:10s} default {entry.default_sampler} x {entry.default_steps}")
    return 0


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
    gen.add_argument("--format", choices=("png", "npy"), default="png")
    gen.add_argument("--out", default="grid.png")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)
    sam = sub.add_parser("samplers", help="list the samplers")
    sam.set_defaults(func=cmd_samplers)
    mod = sub.add_parser("models", help="list the models in a config")
    mod.add_argument("--config", default=str(DEFAULT_CONFIG))
    mod.set_defaults(func=cmd_models)
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
