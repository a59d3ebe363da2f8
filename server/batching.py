"""Cross-request batching: every request running on one model shares forward passes.

A `Batcher` owns one loop thread per model (vLLM's collect -> execute -> hand back).  Sampler threads
call it like the model; calls are grouped by their layout (per-sample shapes, dtypes, which arguments
are None), concatenated up to the model's max batch, run once, and split back.  Per-sample arguments
(noise levels, labels) travel with each sample, so a sample's result does not depend on its batch.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import torch

from . import metrics


def _normalize(args: tuple, batch: int) -> tuple:
    """Scalars become per-sample tensors; per-sample tensors and None pass through."""
    out = []
    for a in args:
        if a is None:
            out.append(None)
        elif isinstance(a, torch.Tensor) and a.ndim >= 1 and a.shape[0] == batch:
            out.append(a)
        else:
            out.append(torch.as_tensor(a, dtype=torch.float64).reshape(()).expand(batch))
    return tuple(out)


def _layout(args: tuple) -> tuple:
    return tuple(None if a is None else (tuple(a.shape[1:]), a.dtype) for a in args)


class _Call:
    __slots__ = ("args", "size", "future", "enqueued")

    def __init__(self, args, size):
        self.args, self.size, self.future, self.enqueued = args, size, Future(), time.monotonic()


class Batcher:
    """Coalesces concurrent calls of `fn(*per_sample_args)` into batches of at most `max_batch` samples."""

    def __init__(self, fn: Callable, model_name: str, max_batch: int = 64):
        self.fn, self.model_name, self.max_batch = fn, model_name, max_batch
        self._pending: deque[_Call] = deque()
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{model_name}", daemon=True)
        self._thread.start()

    def __call__(self, *args):
        batch = args[0].shape[0]
        call = _Call(_normalize(args, batch), batch)
        with self._cv:
            if self._stopped:
                raise RuntimeError("the batcher is stopped")
            self._pending.append(call)
            self._cv.notify()
        return call.future.result()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        self._thread.join(timeout=5)

    def _take(self) -> list[_Call]:
        """The oldest call plus every pending call with the same layout, up to max_batch samples."""
        first = self._pending.popleft()
        key, taken, size, keep = _layout(first.args), [first], first.size, deque()
        while self._pending:
            call = self._pending.popleft()
            if _layout(call.args) == key and size + call.size <= self.max_batch:
                taken.append(call)
                size += call.size
            else:
                keep.append(call)
        self._pending.extendleft(reversed(keep))
        return taken

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stopped:
                    self._cv.wait()
                if self._stopped and not self._pending:
                    return
                calls = self._take()
            self._run(calls)

    def _run(self, calls: list[_Call]) -> None:
        columns = list(zip(*(c.args for c in calls)))
        args = [None if col[0] is None else torch.cat(col) for col in columns]
        start = time.perf_counter()
        try:
            out = self.fn(*args)
        except BaseException as err:  # hand the error to every caller; the loop keeps serving
            for c in calls:
                c.future.set_exception(err)
            return
        metrics.FORWARD_SECONDS.labels(self.model_name).observe(time.perf_counter() - start)
        metrics.BATCH_SIZE.labels(self.model_name).observe(sum(c.size for c in calls))
        offset = 0
        for c in calls:
            c.future.set_result(out[offset: offset + c.size])
            offset += c.size


class BatchedModel:
    """A model facade whose call goes through a Batcher; every other attribute is the model's own."""

    def __init__(self, model, batcher: Batcher):
        self._model, self._batcher = model, batcher

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args):
        return self._batcher(*args)


class BatchedMaskedModel(BatchedModel):
    """Masked models are called through `logits(tokens, cond)`."""

    def logits(self, tokens, cond=None):
        return self._batcher(tokens, cond)
