"""The batcher's gather window: running requests that call within the window share one forward pass; a lone
request never waits for it."""

from __future__ import annotations

import threading
import time

import torch

from server.batching import Batcher


def _recording_batcher(gather_seconds: float) -> tuple[Batcher, list[int]]:
    sizes: list[int] = []

    def fn(x, sigma):
        sizes.append(x.shape[0])
        return x * 2 + sigma.view(-1, 1)

    return Batcher(fn, "test", max_batch=64, gather_seconds=gather_seconds), sizes


def _staggered_calls(batcher: Batcher, n: int, stagger: float) -> list[torch.Tensor]:
    out: list[torch.Tensor | None] = [None] * n
    entered = threading.Barrier(n)

    def request(i: int) -> None:
        with batcher.running():
            entered.wait()  # all n are running before anyone calls
            time.sleep(i * stagger)
            out[i] = batcher(torch.full((1, 3), float(i)), float(i))

    threads = [threading.Thread(target=request, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out


def test_running_requests_within_the_window_share_one_batch():
    batcher, sizes = _recording_batcher(gather_seconds=2.0)
    try:
        out = _staggered_calls(batcher, 4, stagger=0.05)
    finally:
        batcher.stop()
    assert sizes == [4]
    for i, y in enumerate(out):  # each caller gets its own rows back
        assert torch.equal(y, torch.full((1, 3), 3.0 * i))


def test_without_a_window_staggered_calls_run_separately():
    batcher, sizes = _recording_batcher(gather_seconds=0.0)
    try:
        _staggered_calls(batcher, 4, stagger=0.05)
    finally:
        batcher.stop()
    assert len(sizes) == 4


def test_a_lone_request_does_not_wait_for_the_window():
    batcher, sizes = _recording_batcher(gather_seconds=30.0)
    try:
        with batcher.running():
            start = time.monotonic()
            batcher(torch.ones(2, 3), 0.5)
            assert time.monotonic() - start < 10  # 30 s if it waited for the window
        start = time.monotonic()
        batcher(torch.ones(1, 3), 0.5)  # a caller outside running(): nobody to wait for either
        assert time.monotonic() - start < 10
    finally:
        batcher.stop()
    assert sizes == [2, 1]


def test_a_full_batch_does_not_wait_for_the_rest():
    sizes: list[int] = []
    batcher = Batcher(lambda x: (sizes.append(x.shape[0]), x)[1], "test", max_batch=4, gather_seconds=30.0)
    try:
        with batcher.running(), batcher.running():  # two more running requests that never call
            start = time.monotonic()
            batcher(torch.ones(4, 3))
            assert time.monotonic() - start < 10
    finally:
        batcher.stop()
    assert sizes == [4]
