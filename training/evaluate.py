"""Quality numbers for the zoo's model cards: digits-FD and classifier-B accuracy of conditional samples.

The samples come from the served path: the checkpoint the recipe has just written is loaded by
:func:`models.loading.load_model` and sampled by :func:`samplers.run_sampler` (no sampler of our own here),
so a card's figures measure exactly what ``diffserve generate`` would produce with the same seeds. Every
model is evaluated with per-sample seeds ``NOISE_SEED + k`` (initial noise and, for stochastic samplers,
the per-step noise), class-balanced labels (0, 1, ..., 9, 0, 1, ...), ``N_EVAL`` = 1000 samples, on the
``GRID`` time grid, against the 359 held-out digits. The floor is the FD of class-balanced 1000-image
subsets of the real training digits against the same held-out digits (same sample count and class
balance as the generated sets, so the same bias), averaged over 5 subsets.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from models.config import ModelEntry
from models.loading import LoadedModel, load_model
from samplers import SampleNoise, initial_noise, make_grid, run_sampler, with_guidance
from samplers.meanflow import meanflow_times
from training.common import Logger, classifier_b_dir
from training.digits_data import train_split

N_EVAL = 1000
N_EVAL_QUICK = 16
NOISE_SEED = 1234
FLOOR_SEED = 99
NULL_CLASS = 10
GRID = "uniform_t"  # uniform in the model's own time: DDIM's linspace(999, 0), t = 1 -> 0 for flow models

# (sampler name in samplers.REGISTRY, steps, classifier-free guidance scale or None)
EvalConfig = tuple[str, int, float | None]


def load_for_eval(directory: Path, kind: str) -> LoadedModel:
    """A checkpoint directory the recipe wrote, loaded exactly as the server loads a zoo entry."""
    directory = Path(directory)
    entry = ModelEntry(name=directory.name, directory=directory, kind=kind, default_sampler="euler",
                       default_steps=10, null_class=NULL_CLASS, grid=GRID)
    return load_model(entry)


@torch.no_grad()
def sample(loaded: LoadedModel, sampler: str, steps: int, guidance: float | None, n: int,
           seed: int = NOISE_SEED) -> tuple[torch.Tensor, torch.Tensor, int]:
    """n class-balanced samples from the served sampler; returns (x, labels, NFE used)."""
    noise = SampleNoise(range(seed, seed + n))
    labels = torch.arange(n) % 10
    model = loaded.model
    if sampler == "meanflow":
        x, nfe = run_sampler(sampler, model, noise.randn(model.shape), meanflow_times(steps), labels, noise=noise)
        return x, labels, nfe
    if loaded.kind == "meanflow":  # a flow sampler on the boundary velocity u(z, t, t)
        model = model.as_flow_denoiser()
    sigmas = make_grid(model.process, steps, GRID, shift=loaded.shift)
    x, nfe = run_sampler(sampler, with_guidance(model, guidance), initial_noise(model, noise), sigmas, labels,
                         noise=noise)
    return x, labels, nfe


def real_floor(n: int, repeats: int = 5) -> dict:
    """FD of real digits vs the held-out digits: the mean over ``repeats`` class-balanced n-subsets of the
    training split (same sample count and balance as the generated sets), plus the FD of all 1438."""
    from training.digits_fd import balanced_real_subset, frechet_distance, get_classifier_b

    clf = get_classifier_b(classifier_b_dir())
    x, _ = train_split()
    g = torch.Generator().manual_seed(FLOOR_SEED)
    m = min(n, len(x))
    subs = [frechet_distance(balanced_real_subset(m, g), classifier=clf) for _ in range(repeats)]
    full = frechet_distance(x, classifier=clf)
    vals = [s["fd"] for s in subs]
    return {
        "fd_train_subset_vs_heldout": sum(vals) / len(vals),
        "fd_train_subset_values": vals,
        "n_subset": m,
        "fd_train_all_vs_heldout": full["fd"],
        "backend": full["backend"],
    }


def evaluate(directory: Path, kind: str, configs: list[EvalConfig], *, quick: bool, n_eval: int | None,
             log: Logger) -> dict:
    """Sample the checkpoint in ``directory`` with each (sampler, steps, guidance) config and score it.

    FD / accuracy need ``zoo/digit-classifier-b``; without it (or in quick mode) only finiteness is checked.
    """
    n = n_eval or (N_EVAL_QUICK if quick else N_EVAL)
    loaded = load_for_eval(directory, kind)
    have_b = (classifier_b_dir() / "model.safetensors").is_file() and not quick
    clf = None
    if have_b:
        from training.digits_fd import class_accuracy, frechet_distance, get_classifier_b

        clf = get_classifier_b(classifier_b_dir())
    rows = []
    for sampler, steps, w in configs:
        t0 = time.time()
        x, labels, nfe = sample(loaded, sampler, steps, w, n)
        secs = time.time() - t0
        row = {
            "sampler": sampler,
            "steps": steps,
            "guidance": w,
            "nfe": nfe,
            "n": n,
            "finite": bool(torch.isfinite(x).all()),
            "seconds": round(secs, 2),
        }
        if clf is not None:
            xc = x.clamp(-1, 1)
            row["fd"] = round(frechet_distance(xc, classifier=clf)["fd"], 4)
            row["class_acc"] = round(class_accuracy(xc, labels, classifier=clf), 4)
        rows.append(row)
        log(f"eval {row}")
    metrics: dict = {"rows": rows, "n_eval": n, "noise_seed": NOISE_SEED, "grid": GRID}
    if clf is not None:
        metrics["floor"] = real_floor(n)
        best = min(rows, key=lambda r: r["fd"])
        metrics["best"] = {k: best[k] for k in ("sampler", "steps", "guidance", "fd", "class_acc")}
        log(f"floor {metrics['floor']}")
    return metrics


def eval_header(metrics: dict) -> str:
    if "floor" not in metrics:
        return "(no quality numbers: classifier B was not available when this card was written)"
    f = metrics["floor"]
    return (
        f"digits-FD = Frechet distance of classifier-B (`zoo/digit-classifier-b`) penultimate features "
        f"(`training/digits_fd.py`, {f['backend']} backend) between {metrics['n_eval']} class-balanced samples "
        f"of the served samplers (`samplers.run_sampler`, seeds {metrics['noise_seed']} + k, "
        f"{metrics.get('grid', 'uniform_t')} grid; final samples clamped to [-1, 1]) and the 359 "
        f"held-out digits; class acc = classifier-B accuracy on the requested labels; NFE counts a guided "
        f"evaluation once (two network passes, batched). **Floor** (real "
        f"digits: mean over 5 class-balanced {f['n_subset']}-image subsets of the training split vs held-out): "
        f"**{f['fd_train_subset_vs_heldout']:.3f}** "
        f"(all 1438 training images: {f['fd_train_all_vs_heldout']:.3f})."
    )


def format_rows(metrics: dict) -> str:
    lines = [
        "| sampler | steps | guidance | NFE | digits-FD | class acc (B) | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in metrics["rows"]:
        g = "-" if r["guidance"] is None else r["guidance"]
        fd = f"{r['fd']:.3f}" if "fd" in r else "n/a"
        acc = f"{r['class_acc']:.3f}" if "class_acc" in r else "n/a"
        lines.append(f"| {r['sampler']} | {r['steps']} | {g} | {r['nfe']} | {fd} | {acc} | {r['seconds']} |")
    return "\n".join(lines)
