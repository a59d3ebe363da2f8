"""`python -m bench NAME [--quick]`: run benchmark bench/NAME.py.

Each benchmark module has ``main(quick: bool) -> dict``; this runner prints the readable table the module
prints, writes bench/results/NAME.json and prints the same JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def available() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("name", help=f"one of: {', '.join(available())}")
    parser.add_argument("--quick", action="store_true", help="small version that finishes in under a minute")
    args, extra = parser.parse_known_args(argv)  # options of the benchmark itself (e.g. masked --lengths)
    if args.name not in available():
        parser.error(f"unknown benchmark {args.name!r}; available: {', '.join(available())}")
    module = importlib.import_module(f"bench.{args.name}")
    result = module.main(quick=args.quick, argv=extra) if extra else module.main(quick=args.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"{args.name}{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
