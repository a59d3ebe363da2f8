"""Sample quality per NFE on the digits zoo: digits-FD (classifier-B features, held-out digits) and
classifier-B accuracy of class-conditional samples, for every applicable sampler and for diffusers' own
schedulers on the same weights, seeds and labels; the real-data floor is train-split vs held-out FD.

Class-balanced labels, no guidance (on these digits guidance raises FD), 100 samples per cell (50 with
--quick): FD from few samples is biased upwards, so compare cells with each other, not with papers.
A full run keeps each model's cells in bench/results/quality_rows_<model>.json and reuses them while that
model's weights, the samplers/ code and this file are unchanged (retraining one zoo model costs only its
rows). Threads: OMP_NUM_THREADS when set, else 1 (on a shared 2-core machine two threads ran 5x slower).

The text-to-image zoo model's rows (`rows` in the JSON: per sampler and NFE ours vs diffusers, guidance sweep,
negative prompt, momentum under strong guidance) come from bench/_quality_t2i.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from bench import _quality_t2i as t2i
from models.config import load_config
from models.loading import load_model
from samplers import REGISTRY, SampleNoise, initial_noise, make_grid, run_sampler, with_guidance
from samplers.meanflow import meanflow_times
from training.digits_fd import balanced_labels, balanced_real_subset, class_accuracy, digits_fd, real_floor

NFES = (1, 2, 4, 6, 10, 20)
SEED = 1000
RESULTS = Path(__file__).resolve().parent / "results"


def _cache_key(directory: Path, n: int, nfes) -> str:
    """Cells of a full run are reused while the weights, the sampler code and this file are unchanged."""
    repo = Path(__file__).resolve().parents[1]
    files = sorted(Path(directory).rglob("*.safetensors")) + sorted((repo / "samplers").glob("*.py"))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files + [Path(__file__).resolve()])).hexdigest()
    return json.dumps([digest[:16], n, list(nfes), SEED])


def steps_for(name: str, nfe: int) -> int | None:
    spec = REGISTRY[name]
    return next((s for s in range(1, nfe + 1) if spec.nfe(s) == nfe), None)


def _ours(loaded, name, nfe, n, guidance):
    model = loaded.model
    noise = SampleNoise(range(SEED, SEED + n))
    labels = balanced_labels(n)
    if loaded.kind == "meanflow" and name == "meanflow":
        out, _ = run_sampler(name, model, noise.randn(model.shape), meanflow_times(nfe), labels, noise=noise)
        return out, labels
    if loaded.kind == "meanflow":
        model = model.as_flow_denoiser()
    steps = steps_for(name, nfe)
    sigmas = make_grid(model.process, steps, loaded.entry.grid, shift=loaded.shift)
    out, used = run_sampler(name, with_guidance(model, guidance), initial_noise(model, noise), sigmas, labels,
                            noise=noise)
    assert used == nfe, (name, nfe, used)
    return out, labels


def _diffusers(loaded, scheduler_cls, nfe, n, guidance):
    """diffusers' scheduler loop on the same UNet (classifier-free guidance as in its pipelines)."""
    net = loaded.model.net
    scheduler = scheduler_cls.from_pretrained(loaded.entry.directory / "scheduler")
    scheduler.set_timesteps(nfe)
    labels = balanced_labels(n)
    noise = SampleNoise(range(SEED, SEED + n))
    x = noise.randn(loaded.model.shape) * getattr(scheduler, "init_noise_sigma", 1.0)  # flow schedulers: 1
    null = torch.full_like(labels, -1)  # NULL_LABEL
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        scale = 1.0 if loaded.kind == "diffusion" else 1 / 1000  # our flow net takes t in [0, 1]
        tt = torch.full((n,), float(t) * scale, dtype=torch.float64)
        out = net(inp, tt, labels)
        if guidance != 1.0:
            out = net(inp, tt, null) + guidance * (out - net(inp, tt, null))
        x = scheduler.step(out, t, x).prev_sample
    return x, labels


def _applicable(kind):
    kinds = {"meanflow": ("meanflow", "flow")}.get(kind, (kind,))
    return [name for name, spec in REGISTRY.items() if any(k in spec.kinds for k in kinds)]


def _score(out, labels, results, accuracy, model_name, row, nfe):
    fd = digits_fd(out.clamp(-1, 1))
    acc = class_accuracy(out, labels)
    results[model_name].setdefault(row, {})[str(nfe)] = fd
    accuracy[model_name].setdefault(row, {})[str(nfe)] = acc
    print(f"  {row:30s} NFE {nfe:3d}  FD {fd:8.3f}  acc {acc:.3f}", flush=True)


def main(quick: bool = False) -> dict:
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    n = 50 if quick else 100
    nfes = (2, 10) if quick else NFES
    config = load_config()
    results, accuracy = {}, {}
    diffusers_for = {"diffusion": [DPMSolverMultistepScheduler, UniPCMultistepScheduler, DDIMScheduler,
                                   EulerDiscreteScheduler], "flow": [FlowMatchEulerDiscreteScheduler]}
    start = time.perf_counter()
    for name in ("digits-ddpm", "digits-flow", "digits-meanflow"):
        cache = RESULTS / f"quality_rows_{name}.json"
        key = _cache_key(config[name].directory, n, nfes)
        if not quick and cache.is_file() and json.loads(cache.read_text()).get("key") == key:
            saved = json.loads(cache.read_text())
            results[name], accuracy[name] = saved["fd"], saved["accuracy"]
            print(f"{name}: reusing {cache.name} (weights and code unchanged)", flush=True)
            continue
        loaded = load_model(config[name])
        guidance = None  # plain conditional sampling: on these digits guidance only raises FD (model cards)
        results[name], accuracy[name] = {}, {}
        print(f"{name} (guidance {guidance})", flush=True)
        samplers = _applicable(loaded.kind)
        if loaded.kind == "meanflow":  # its own sampler, and flow-matching Euler on u(z, t, t) for contrast
            samplers = ["meanflow", "euler"]
        if quick:
            samplers = ["meanflow", "euler"] if loaded.kind == "meanflow" else ["dpmpp_2m", "evodiff", "unipc", "ddpm"]
        for sampler in samplers:
            for nfe in nfes if sampler != "meanflow" else (1, 2, 4):
                if sampler != "meanflow" and steps_for(sampler, nfe) is None:
                    continue
                with torch.no_grad():
                    out, labels = _ours(loaded, sampler, nfe, n, guidance)
                _score(out, labels, results, accuracy, name, sampler, nfe)
        for scheduler_cls in diffusers_for.get(loaded.kind, []):
            row = "diffusers_" + scheduler_cls.__name__.removesuffix("Scheduler")
            for nfe in nfes:
                with torch.no_grad():
                    out, labels = _diffusers(loaded, scheduler_cls, nfe, n, guidance or 1.0)
                _score(out, labels, results, accuracy, name, row, nfe)
        if loaded.kind == "flow":  # the 50-step Euler reference MeanFlow is compared against
            with torch.no_grad():
                out, labels = _ours(loaded, "euler", 50, n, guidance)
            _score(out, labels, results, accuracy, name, "euler", 50)
        if not quick:
            RESULTS.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"key": key, "fd": results[name], "accuracy": accuracy[name]}) + "\n")
    floor = real_floor()["fd"]
    floor_at_n = _real_floor_at(n)
    print(f"floor (train split vs held-out): {floor:.3f}; {n} class-balanced real training digits vs held-out "
          f"(the floor at this cell size, median of 5 draws): {floor_at_n:.3f}; {time.perf_counter() - start:.0f} s")
    _plot(results, floor, floor_at_n, n, RESULTS / ("quality_quick.png" if quick else "quality.png"))
    rows = t2i.run(quick)
    docs = Path(__file__).resolve().parents[1] / "docs"
    t2i.plot(rows, RESULTS / "quality_t2i_quick.png" if quick else docs / "quality_t2i.png")
    return {"fd": results, "floor": floor, "floor_at_n": floor_at_n, "samples_per_cell": n, "accuracy": accuracy,
            "rows": rows}


def _real_floor_at(n: int, draws: int = 5) -> float:
    """FD of n class-balanced real training digits to the held-out split (median of draws): what a model that
    reproduced the training digits would score in a cell of n samples."""
    g = torch.Generator().manual_seed(SEED)
    return sorted(digits_fd(balanced_real_subset(n, g)) for _ in range(draws))[draws // 2]


def _plot(results, floor, floor_at_n, n, path, top=5.0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.8), sharey=True)
    for ax, (model, table) in zip(axes, results.items()):
        for i, (row, values) in enumerate(table.items()):
            xs = [int(k) for k in values]
            ax.plot(xs, list(values.values()), "--" if row.startswith("diffusers_") else "-",
                    marker="os^vD"[i % 5], ms=4, color=plt.cm.tab20(i % 20), label=row)
        ax.axhline(floor, color="k", lw=0.8, ls=":", label="real digits (all 1438) vs held-out")
        ax.axhline(floor_at_n, color="k", lw=0.8, ls="--", label=f"{n} real digits (10 per class) vs held-out")
        ax.set(xscale="log", yscale="log", xlabel="NFE", title=model, ylim=(0.8 * floor, top))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, ncol=2)
    axes[0].set_ylabel(f"digits-FD, {n} samples per point")
    fig.suptitle(f"digits-FD vs NFE (lower is better; values above {top:g} clipped)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)
