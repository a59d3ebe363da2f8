"""Per-sample layouts of network calls: which calls can share a forward pass, and how to join and split them.

Every tensor argument of a `NetworkCall` carries one row per sample on dim 0 (noise levels and labels
too), so calls of different requests concatenate row-wise, and a sample's result does not depend on its
batch.  Arguments may be None, scalars (expanded to one value per row), tensors, lists (one item per
row), or dicts and tuples of these (the conditioning of text-to-image pipelines).  An argument may also
join itself: an object with `batch_rows()`, `batch_layout()` and a classmethod `batch_join(items)` (token
sequences of different lengths, padded with a key mask: models/padded.py).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from samplers.calls import NetworkCall


def rows(call: NetworkCall) -> int:
    """Samples in a call: dim 0 of its first tensor argument."""
    return _rows_of(call.args)


def _joins_itself(arg: Any) -> bool:
    return hasattr(arg, "batch_join") and hasattr(arg, "batch_layout") and hasattr(arg, "batch_rows")


def _rows(arg: Any) -> int | None:
    if isinstance(arg, torch.Tensor) and arg.ndim >= 1:
        return arg.shape[0]
    if _joins_itself(arg):
        return arg.batch_rows()
    if isinstance(arg, dict | tuple):
        for value in arg.values() if isinstance(arg, dict) else arg:
            n = _rows(value)
            if n is not None:
                return n
    return None


def _layout(arg: Any, n: int) -> Any:
    if arg is None:
        return None
    if _joins_itself(arg):
        return ("joins", type(arg), arg.batch_layout())
    if isinstance(arg, torch.Tensor) and arg.ndim >= 1 and arg.shape[0] == n:
        return (tuple(arg.shape[1:]), arg.dtype)
    if isinstance(arg, dict):
        return ("dict", tuple((k, _layout(v, n)) for k, v in sorted(arg.items())))
    if isinstance(arg, tuple):
        return ("tuple", tuple(_layout(v, n) for v in arg))
    if isinstance(arg, list):
        return "list"
    return "scalar"


def batch_key(call: NetworkCall) -> tuple:
    """Calls with equal keys run as one forward pass: the same network, the same per-sample layout."""
    n = rows(call)
    return _identity(call.network), tuple(_layout(a, n) for a in call.args)


def _identity(network) -> Any:
    """A bound method is its object and function (a fresh method object per call otherwise differs)."""
    if inspect.ismethod(network):
        return id(network.__self__), network.__func__
    try:
        hash(network)
        return network
    except TypeError:
        return id(network)


def _per_row(arg: Any, n: int) -> Any:
    if isinstance(arg, torch.Tensor) and arg.ndim >= 1 and arg.shape[0] == n:
        return arg
    return torch.as_tensor(arg, dtype=torch.float64).reshape(()).expand(n)


def _join(column: list, sizes: list[int]) -> Any:
    first = column[0]
    if first is None:
        return None
    if _joins_itself(first):
        return type(first).batch_join(column)
    if isinstance(first, dict):
        return {k: _join([c[k] for c in column], sizes) for k in first}
    if isinstance(first, tuple):
        return tuple(_join([c[i] for c in column], sizes) for i in range(len(first)))
    if isinstance(first, list):
        return [item for c in column for item in c]
    return torch.cat([_per_row(c, n) for c, n in zip(column, sizes)])


def concat(arg_lists: list[tuple]) -> list:
    """The arguments of one forward pass over calls with equal batch keys."""
    sizes = [_rows_of(args) for args in arg_lists]
    return [_join(list(column), sizes) for column in zip(*arg_lists)]


def _rows_of(args: tuple) -> int:
    for arg in args:
        n = _rows(arg)
        if n is not None:
            return n
    raise ValueError("a network call needs at least one per-sample tensor argument")


def _take(out: Any, start: int, stop: int) -> Any:
    if isinstance(out, torch.Tensor):
        return out[start:stop]
    if isinstance(out, dict):
        return {k: _take(v, start, stop) for k, v in out.items()}
    if isinstance(out, tuple | list):
        return type(out)(_take(v, start, stop) for v in out)
    raise TypeError(f"cannot split a network output of type {type(out).__name__} by rows")


def split(out: Any, sizes: list[int]) -> list:
    """Each call's rows of a batched network output (a tensor, or a dict / tuple of tensors)."""
    parts, start = [], 0
    for n in sizes:
        parts.append(_take(out, start, start + n))
        start += n
    return parts
