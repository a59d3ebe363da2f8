"""Step machines: samplers that hand each network evaluation to whoever drives them.

A sampler (or a search, or a whole pipeline request) is a generator function.  Where a plain function
would call the model, it yields a `NetworkCall` and receives the result::

    denoised = yield evaluate(model, x, sigma, cond)

`drive` runs such a machine to completion in the calling thread (library use, `run_sampler`); the
server's engine instead collects the pending calls of every running machine, concatenates the calls that
go to the same network with the same per-sample layout into one forward pass, and sends each machine
its slice (vLLM's schedule / execute / update loop, one network call at a time).

A `NetworkCall` is the batchable part of one evaluation: ``network(*args)`` where every tensor argument
has one row per sample (dicts and tuples of such tensors are allowed), followed by ``finish(out)``, the
per-request arithmetic around it (a parameterization adapter, the CFG combination).  Wrappers compose
by wrapping `finish`: a model that exposes ``network_call(*args) -> NetworkCall`` is split that way; any
other callable is its own network.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

StepMachine = Generator["NetworkCall", Any, T]


@dataclass(frozen=True, eq=False)
class NetworkCall:
    """One network evaluation: `network(*args)` (per-sample rows on dim 0), then `finish` on its output."""

    network: Callable
    args: tuple
    finish: Callable[[Any], Any] | None = None

    def run(self) -> Any:
        """Evaluate unbatched, in the calling thread."""
        return self.complete(self.network(*self.args))

    def complete(self, out: Any) -> Any:
        """What the step machine receives, given this call's rows of the network output."""
        return out if self.finish is None else self.finish(out)

    def then(self, fn: Callable[[Any], Any]) -> NetworkCall:
        """The same network evaluation followed by `fn` on what this call would return."""
        inner = self.finish
        return NetworkCall(self.network, self.args, fn if inner is None else (lambda out: fn(inner(out))))


def evaluate(model: Callable, *args) -> NetworkCall:
    """The NetworkCall for `model(*args)`: split by the model's `network_call` when its class defines one.

    Looked up on the class, so a wrapper that forwards unknown attributes to the model it wraps (through
    `__getattr__`) is still called itself rather than bypassed."""
    split = getattr(type(model), "network_call", None)
    return split(model, *args) if split is not None else NetworkCall(model, args)


def evaluate_logits(model, tokens, cond=None) -> NetworkCall:
    """The NetworkCall for a masked model's `model.logits(tokens, cond) -> (B, L, V)`, split by the class's
    `logits_call` when it has one (looked up on the class, as in `evaluate`); the shape is checked."""
    split = getattr(type(model), "logits_call", None)
    call = split(model, tokens, cond) if split is not None else NetworkCall(model.logits, (tokens, cond))
    return call.then(lambda out: _checked_logits(model, tokens, out))


def evaluate_canvas(model, *args) -> NetworkCall:
    """The NetworkCall for a block-diffusion model's `model.canvas_logits(context, canvas, sc_logits, sc_mask)`,
    split by the class's `canvas_call` when it has one (looked up on the class, as in `evaluate`)."""
    split = getattr(type(model), "canvas_call", None)
    return split(model, *args) if split is not None else NetworkCall(model.canvas_logits, args)


def _checked_logits(model, tokens, out):
    if out.shape != (*tokens.shape, model.vocab_size):
        raise RuntimeError(f"masked model returned logits of shape {tuple(out.shape)}, expected "
                           f"{(*tokens.shape, model.vocab_size)}")
    return out


def step_machine(machine: Callable[..., StepMachine[T]]) -> Callable[..., T]:
    """Decorator: the plain-function form of generator function `machine` (same arguments, runs it to
    completion with `drive`); the generator stays reachable as `.machine` for callers that are
    themselves step machines (``u = yield from velocity.machine(...)``)."""
    @functools.wraps(machine)
    def run(*args, **kwargs):
        return drive(machine(*args, **kwargs))
    run.machine = machine
    return run


def drive(machine: StepMachine[T]) -> T:
    """Run a step machine to completion, evaluating each call directly; returns the machine's value."""
    try:
        call = next(machine)
        while True:
            call = machine.send(call.run())
    except StopIteration as stop:
        return stop.value
