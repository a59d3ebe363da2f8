"""Backends: per-forward latency and samples/s of every zoo model per backend, and 10-step sampling throughput.

Backends: torch eager (the baseline a user would otherwise run), torch.compile (inductor, dynamic batch),
ONNX Runtime on the CPU provider, and where a GPU is present torch eager on CUDA, TensorRT engines and ONNX
Runtime's TensorRT / CUDA providers. Forwards go through the served contract (Denoiser.net, AverageVelocity,
masked logits), so conversions the engine pays are included. End to end: concurrent 10-step requests through
the batching engine (server/engine.py), samples per second.

Zoo models missing from zoo/models.toml are replaced by random-weight models of the same architecture
(tests/backend_fixtures.py): latency does not depend on the weights. Exports and engines are cached under
run/bench-backends/, so only a first run pays for them. --quick: the digits DDPM and text models, torch vs
ONNX Runtime (torch.compile builds for minutes on a CPU), fewer repetitions.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from models.config import DEFAULT_CONFIG, REPO_ROOT, ConfigError, load_config
from models.loading import load_model

MODELS = ("digits-ddpm", "digits-flow", "digits-meanflow", "text-mdm")
KINDS = {"digits-ddpm": "diffusion", "digits-flow": "flow", "digits-meanflow": "meanflow", "text-mdm": "masked"}
SAMPLERS = {"digits-ddpm": "dpmpp_2m", "digits-flow": "euler", "digits-meanflow": "meanflow", "text-mdm": "mdlm"}
BATCHES = (1, 16, 64)
# One intra-op thread for every backend: on a shared 2-core box two spinning OpenMP threads per library fight
# the background jobs and make eager torch up to 10x slower than its one-thread self (ORT suffers less), which
# would flatter the compiled backends. The JSON records the setting.
THREADS = 1
WORK = REPO_ROOT / "run" / "bench-backends"


def backends(quick: bool) -> dict[str, tuple[dict, str]]:
    """label -> (config options, device) for what this machine can run."""
    cpu = {"backend": "onnxruntime", "providers": ["CPUExecutionProvider"], "threads": THREADS}
    out = {"torch": ({}, "cpu"), "onnxruntime-cpu": (cpu, "cpu")}
    if not quick:
        out["torch-compile"] = ({"backend": "torch-compile"}, "cpu")
    if torch.cuda.is_available():
        import onnxruntime as ort

        out["torch-cuda"] = ({}, "cuda")
        try:
            import tensorrt  # noqa: F401
            out["tensorrt"] = ({"backend": "tensorrt"}, "cuda")
            out["tensorrt-fp16"] = ({"backend": "tensorrt", "fp16": True}, "cuda")
        except ImportError:
            pass
        for provider, label in (("TensorrtExecutionProvider", "onnxruntime-tensorrt"),
                                ("CUDAExecutionProvider", "onnxruntime-cuda")):
            if provider in ort.get_available_providers():
                out[label] = ({"backend": "onnxruntime", "providers": [provider]}, "cuda")
    return out


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return f'"{value}"' if isinstance(value, str) else str(value)


def model_dirs(names) -> dict[str, tuple[Path, str]]:
    """name -> (directory, 'zoo' | 'random weights'): the zoo's model, or a stand-in of its architecture."""
    try:
        zoo = load_config(DEFAULT_CONFIG)
    except (ConfigError, OSError):
        zoo = {}
    out = {}
    for name in names:
        if name in zoo:
            out[name] = (zoo[name].directory, "zoo")
            continue
        from tests.backend_fixtures import write_model

        path = WORK / "standins" / name
        if not path.exists():
            write_model(name, path, MODELS.index(name), full_size=True)
        out[name] = (path, "random weights")
    return out


def write_config(dirs: dict, labels: dict) -> Path:
    """One entry per (model, backend), named model@backend; exports go to run/bench-backends/exports."""
    lines = ['model_roots = ["/"]', ""]
    for name, (directory, _) in dirs.items():
        for label, (options, _) in labels.items():
            opts = {**options, "export_dir": str(WORK / "exports" / name)} if options else {}
            lines += ["[[models]]", f'name = "{name}@{label}"', f'directory = "{directory}"',
                      f'kind = "{KINDS[name]}"', f'default_sampler = "{SAMPLERS[name]}"', "default_steps = 10"]
            lines += [] if KINDS[name] == "masked" else ["null_class = 10"]
            lines += [f"{k} = {_toml(v)}" for k, v in opts.items()] + [""]
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / "models.toml"
    path.write_text("\n".join(lines))
    return path


def forward_fn(kind: str, model, batch: int):
    g = torch.Generator().manual_seed(batch)
    if kind == "masked":
        tokens = torch.randint(0, model.vocab_size, (batch, model.length), generator=g)
        return lambda: model.logits(tokens)
    x = torch.randn(batch, *model.shape, generator=g)
    labels = torch.randint(0, 10, (batch,), generator=g)
    t = torch.rand(batch, generator=g, dtype=torch.float64)
    if kind == "meanflow":
        r = t * 0.5
        return lambda: model(x, r, t, labels)
    t = t * (999.0 if kind == "diffusion" else 1.0)
    return lambda: model.net(x, t, labels)


def time_ms(fns: dict, seconds: float, max_rounds: int) -> dict[str, tuple[float, float]]:
    """Median wall and thread-CPU milliseconds of one call per backend, in interleaved rounds so all see the
    same machine load. With one intra-op thread the work runs on the calling thread, so its CPU time is the
    cost without the waits for a core that a loaded machine adds to the wall time."""
    for fn in fns.values():
        fn(), fn()
    wall, cpu = {label: [] for label in fns}, {label: [] for label in fns}
    end = time.perf_counter() + seconds
    for _ in range(max_rounds):
        for label, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.thread_time()
            fn()
            wall[label].append(time.perf_counter() - start)
            cpu[label].append(time.thread_time() - start_cpu)
        if len(wall[label]) >= 3 and time.perf_counter() > end:
            break
    return {label: (1000 * statistics.median(wall[label]), 1000 * statistics.median(cpu[label])) for label in fns}


def end_to_end(loaded, requests: int, n: int) -> dict:
    """`requests` concurrent 10-step requests of n samples each through the batching engine."""
    from server.config import ServerConfig
    from server.engine import Engine
    from server.generation import GenerateRequest

    engine = Engine({loaded.name: loaded}, ServerConfig(port=0, metrics_port=None, max_batch=64, workers=requests))
    engine.warm_up()
    masked = loaded.kind == "masked"
    jobs = [GenerateRequest(loaded.entry.default_sampler, 10, n=n, seed=100 * k,
                            class_label=None if masked else k % 10) for k in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(requests) as pool:
        list(pool.map(lambda job: engine.generate(loaded.name, job), jobs))
    seconds = time.perf_counter() - start
    engine.close()
    return {"requests": requests, "samples": requests * n, "steps": 10, "seconds": round(seconds, 3),
            "samples_per_s": round(requests * n / seconds, 2)}


def main(quick: bool = False) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool) -> dict:
    names = ("digits-ddpm", "text-mdm") if quick else MODELS
    labels = backends(quick)
    dirs = model_dirs(names)
    entries = load_config(write_config(dirs, labels))
    rows, cpu_rows, e2e, described = [], [], [], {}
    for name in names:
        loaded = {}
        for label, (_, device) in labels.items():
            start = time.perf_counter()
            loaded[label] = load_model(entries[f"{name}@{label}"], device)
            described[label] = loaded[label].backend
            print(f"  loaded {name} on {label} ({loaded[label].backend}) in {time.perf_counter() - start:.1f} s")
        for batch in BATCHES:
            fns = {label: forward_fn(KINDS[name], model.model, batch) for label, model in loaded.items()}
            for label, (ms, cpu_ms) in time_ms(fns, 1.0 if quick else 6.0, 30 if quick else 300).items():
                rows.append({"model": name, "backend": label, "batch": batch, "ms_per_forward": round(ms, 3),
                             "samples_per_s": round(1000 * batch / ms, 1)})
                cpu_rows.append({"model": name, "backend": label, "batch": batch,
                                 "cpu_ms_per_forward": round(cpu_ms, 3)})
        if not quick or name == "digits-ddpm":
            for label, model in loaded.items():
                e2e.append({"model": name, "backend": label, **end_to_end(model, 8 if quick else 16, 8)})
    speedups = []
    for name in names:
        for batch in BATCHES:
            same = [r for r in rows if r["model"] == name and r["batch"] == batch]
            best = min(same, key=lambda r: r["ms_per_forward"])
            base = next(r for r in same if r["backend"] == "torch")
            cpu = {r["backend"]: r["cpu_ms_per_forward"] for r in cpu_rows
                   if r["model"] == name and r["batch"] == batch}
            speedups.append({"model": name, "batch": batch, "best": best["backend"],
                             "best_vs_torch": round(base["ms_per_forward"] / best["ms_per_forward"], 2),
                             "cpu_time_vs_torch": {k: round(cpu["torch"] / v, 2) for k, v in cpu.items() if v > 0}})
    _print(rows, e2e, speedups)
    return {"rows": rows, "cpu_time": cpu_rows, "end_to_end": e2e, "speedups": speedups, "backends": described,
            "sources": {name: source for name, (_, source) in dirs.items()},
            "env": {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "onnxruntime": __import__("onnxruntime").__version__,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}


def _print(rows, e2e, speedups) -> None:
    print(f"{'model':16s} {'backend':22s} {'batch':>5s} {'ms/forward':>11s} {'samples/s':>10s}")
    for r in rows:
        print(f"{r['model']:16s} {r['backend']:22s} {r['batch']:5d} {r['ms_per_forward']:11.3f} "
              f"{r['samples_per_s']:10.1f}")
    print("\nbest backend vs torch eager, per forward (wall), and every backend by thread CPU time:")
    for s in speedups:
        by_cpu = ", ".join(f"{k} {v:.2f}x" for k, v in s["cpu_time_vs_torch"].items() if k != "torch")
        print(f"  {s['model']:16s} batch {s['batch']:3d}: {s['best']:22s} {s['best_vs_torch']:.2f}x wall; "
              f"thread CPU time: {by_cpu}")
    print("\nend to end, 10-step sampling through the engine:")
    for r in e2e:
        print(f"  {r['model']:16s} {r['backend']:22s} {r['requests']} requests x {r['samples'] // r['requests']} "
              f"samples: {r['seconds']:.2f} s, {r['samples_per_s']:.1f} samples/s")
