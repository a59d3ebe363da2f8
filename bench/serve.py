"""Serving throughput and latency on digits-ddpm: our gRPC server (eager torch, and the same weights through
the ONNX Runtime CPU backend) and the same engine in-process without gRPC vs in-process sequential sampling
vs diffusers' pipeline behind a thread pool, and the model's forward-pass limit (eager torch).

Every request asks for one sample with DPM-Solver++(2M), 10 steps, no guidance.  The server runs as a
separate process (`diffserve serve`) on loopback, so client and server do not share an interpreter.
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from models.config import DEFAULT_CONFIG, load_config
from models.loading import load_model
from server.generation import GenerateRequest, generate

MODEL, SAMPLER, STEPS = "digits-ddpm", "dpmpp_2m", 10
CONCURRENCY = (1, 8, 32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _summary(system, concurrency, latencies, wall):
    ms = sorted(1000 * x for x in latencies)
    p99 = ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]
    return {"system": system, "concurrency": concurrency, "samples_per_s": len(ms) / wall,
            "p50_ms": statistics.median(ms), "p99_ms": p99}


def _load(n, concurrency, one_request):
    """Run n requests from `concurrency` client threads; returns (latencies, wall seconds)."""
    latencies = []
    lock = threading.Lock()

    def run(k):
        start = time.perf_counter()
        one_request(k)
        with lock:
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(run, range(n)))
    return latencies, time.perf_counter() - start


def bench_grpc(n, concurrencies, backend="torch"):
    """The server process on loopback; `backend = "onnxruntime"` serves the same weights through an ONNX
    Runtime CPU session (one intra-op thread, exported into a temp folder at start-up): row "grpc_onnxruntime"."""
    from server.client import connect

    port, metrics_port = _free_port(), _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        entry = load_config()[MODEL]
        config = Path(tmp) / "models.toml"
        backend_lines = "" if backend == "torch" else (
            f'backend = "{backend}"\nproviders = ["CPUExecutionProvider"]\nthreads = 1\nexport_dir = "{tmp}/onnx"\n')
        config.write_text(f'model_roots = ["{DEFAULT_CONFIG.parent}"]\n[server]\nmax_queue = 256\nworkers = 64\n'
                          f'[[models]]\nname = "{MODEL}"\ndirectory = "{entry.directory.name}"\nkind = "diffusion"\n'
                          f'default_sampler = "{SAMPLER}"\ndefault_steps = {STEPS}\nnull_class = 10\n' + backend_lines)
        system = "grpc" if backend == "torch" else f"grpc_{backend}"
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--config", str(config), "--port",
                                 str(port), "--metrics-port", str(metrics_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            pb, stub, _ = connect(f"127.0.0.1:{port}")
            _wait_ready(pb, stub, proc)
            rows = []
            for c in concurrencies:
                def one(k):
                    stub.Generate(pb.GenerateRequest(model=MODEL, sampler=SAMPLER, steps=STEPS, base_seed=k,
                                                     format=pb.TENSOR))
                _load(min(8, n), c, one)  # warm the connection and threads
                rows.append(_summary(system, c, *_load(n if c > 1 else max(8, n // 4), c, one)))
            return rows
        finally:
            proc.terminate()
            proc.wait(30)


def _wait_ready(pb, stub, proc, timeout=120):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            if stub.GetModel(pb.GetModelRequest(name=MODEL), timeout=2).ready:
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        time.sleep(0.5)
    raise TimeoutError("the server did not become ready")


def bench_sequential(loaded, n):
    def one(k):
        generate(loaded, GenerateRequest(SAMPLER, STEPS, n=1, seed=k))
    one(0)
    return _summary("sequential", 1, *_load(n, 1, one))


def bench_inprocess(loaded, n, concurrencies):
    """The engine without gRPC (row "inprocess"): client threads call Engine.generate on one step loop, so
    the engine and the transport can be told apart."""
    from server.config import ServerConfig
    from server.engine import Engine

    engine = Engine({MODEL: loaded}, ServerConfig(port=0, metrics_port=None, max_queue=256))
    engine.warm_up()
    try:
        rows = []
        for c in concurrencies:
            def one(k):
                engine.generate(MODEL, GenerateRequest(SAMPLER, STEPS, n=1, seed=k))
            _load(min(8, n), c, one)
            rows.append(_summary("inprocess", c, *_load(n if c > 1 else max(8, n // 4), c, one)))
        return rows
    finally:
        engine.close()


def bench_diffusers(loaded, n, concurrencies):
    from diffusers import DDPMPipeline, DPMSolverMultistepScheduler

    unet = _unconditional(loaded)
    scheduler_config = DPMSolverMultistepScheduler.load_config(loaded.entry.directory / "scheduler")
    local = threading.local()

    def pipeline():
        if not hasattr(local, "pipe"):  # diffusers schedulers hold per-call state: one pipeline per thread
            local.pipe = DDPMPipeline(unet=unet, scheduler=DPMSolverMultistepScheduler.from_config(scheduler_config))
            local.pipe.set_progress_bar_config(disable=True)
        return local.pipe

    def one(k):
        pipeline()(batch_size=1, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(k),
                   output_type="np")
    rows = []
    for c in concurrencies:
        _load(min(4, n), c, one)
        rows.append(_summary("diffusers", c, *_load(n if c > 1 else max(8, n // 4), c, one)))
    return rows


def _unconditional(loaded):
    """The same UNet weights, called without labels as DDPMPipeline does (the null class)."""
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(loaded.entry.directory / "unet", use_safetensors=True).eval()
    forward = unet.forward

    def unconditional_forward(sample, timestep, class_labels=None, return_dict=True):
        labels = torch.full((sample.shape[0],), loaded.entry.null_class, dtype=torch.long)
        return forward(sample, timestep, class_labels=labels, return_dict=return_dict)
    unet.forward = unconditional_forward
    return unet


def forward_limit(loaded, batches):
    """Best forward passes per second over batch sizes, divided by NFE: the samples/s ceiling."""
    model = loaded.model
    best = 0.0
    for b in batches:
        x = torch.randn(b, *model.shape)
        sigma = torch.full((b,), 5.0, dtype=torch.float64)
        model(x, sigma, None)
        reps = max(3, 64 // b)
        start = time.perf_counter()
        for _ in range(reps):
            model(x, sigma, None)
        best = max(best, b * reps / (time.perf_counter() - start) / STEPS)
    return best


def main(quick: bool = False) -> dict:
    torch.set_num_threads(1)  # as the server does (ServerConfig.torch_threads): no OpenMP thrashing
    loaded = load_model(load_config()[MODEL])
    n = 32 if quick else 128
    concurrencies = (1, 8) if quick else CONCURRENCY
    rows = [bench_sequential(loaded, max(8, n // 4))]
    rows += bench_inprocess(loaded, n, concurrencies)
    rows += bench_grpc(n, concurrencies)
    rows += bench_grpc(n, concurrencies, backend="onnxruntime")
    rows += bench_diffusers(loaded, n, concurrencies)
    limit = forward_limit(loaded, (1, 8, 32, 64) if quick else (1, 4, 16, 32, 64, 128, 256))
    print(f"{'system':18s}{'conc':>6}{'samples/s':>12}{'p50 ms':>10}{'p99 ms':>10}")
    for r in rows:
        print(f"{r['system']:18s}{r['concurrency']:6d}{r['samples_per_s']:12.1f}{r['p50_ms']:10.1f}{r['p99_ms']:10.1f}")
    print(f"forward-pass limit: {limit:.1f} samples/s ({STEPS} NFE per sample)")
    return {"rows": rows, "forward_limit_samples_per_s": limit}
