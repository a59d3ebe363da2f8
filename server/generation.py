"""`generate`: one request run to completion in the calling thread, through the same plan and step machine
the engine runs (library use, the command line's in-process path)."""

from __future__ import annotations

from samplers.calls import drive

from .plan import Limits, make_plan
from .requests import GenerateRequest, GenerateResult, SearchRequest

__all__ = ["MAX_SAMPLES", "GenerateRequest", "GenerateResult", "SearchRequest", "generate"]

MAX_SAMPLES = 4096  # library use: more than a server's request, as many as a queued task could hold


def generate(loaded, request: GenerateRequest, hook=None, model=None, resources=None, limits=None) -> GenerateResult:
    """Run `request` on a LoadedModel in the calling thread (through `model` when given, e.g. a backend):
    the same plan (server/plan.py) and step machine the engine runs; `resources` are what verifiers need
    (loaded classifiers) when the request carries a search; `limits` default to the server's, but with up to
    MAX_SAMPLES samples for library use (the command line passes its config's server limits)."""
    plan = make_plan(loaded, request, limits or Limits(max_samples=MAX_SAMPLES), resources=resources)
    return drive(plan.machine(loaded, model, hook, resources))
