"""Quality numbers for the zoo's model cards: digits-FD and classifier-B accuracy of conditional samples.

Every model is evaluated on the same seeded noise (seed ``NOISE_SEED``) and class-balanced labels
(0, 1, ..., 9, 0, 1, ...), ``N_EVAL`` = 1000 samples, against the 359 held-out digits. The floor is the FD
of class-balanced 1000-image subsets of the real training digits against the same held-out digits (same
sample count and class balance as the generated sets, so the same bias), averaged over 5 subsets.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from models.digits_data import train_split
from models.recipes._common import Logger, classifier_b_dir

N_EVAL = 1000
N_EVAL_QUICK = 16
NOISE_SEED = 1234
SAMPLER_SEED = 4321
FLOOR_SEED = 99


def real_floor(n: int, repeats: int = 5) -> dict:
    """FD of real digits vs the held-out digits: the mean over ``repeats`` class-balanced n-subsets of the
    training split (same sample count and balance as the generated sets), plus the FD of all 1438."""
    from models.digits_fd import balanced_real_subset, frechet_distance, get_classifier_b

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


def evaluate(
    sample: Callable[..., tuple[torch.Tensor, int]],
    configs: list[tuple[str, int, float | None]],
    *,
    quick: bool,
    n_eval: int | None,
    log: Logger,
) -> dict:
    """Run ``sample(kind, steps, w, noise, labels, generator) -> (x, nfe)`` for each config and score it.

    FD / accuracy need ``zoo/digit-classifier-b``; without it (or in quick mode) only finiteness is checked.
    """
    n = n_eval or (N_EVAL_QUICK if quick else N_EVAL)
    noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(NOISE_SEED))
    labels = torch.arange(n) % 10
    have_b = (classifier_b_dir() / "model.safetensors").is_file() and not quick
    clf = None
    if have_b:
        from models.digits_fd import class_accuracy, frechet_distance, get_classifier_b

        clf = get_classifier_b(classifier_b_dir())
    rows = []
    for kind, steps, w in configs:
        t0 = time.time()
        g = torch.Generator().manual_seed(SAMPLER_SEED)
        x, nfe = sample(kind, steps, w, noise.clone(), labels, g)
        secs = time.time() - t0
        row = {
            "sampler": kind,
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
    metrics: dict = {"rows": rows, "n_eval": n, "noise_seed": NOISE_SEED}
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
        f"(`models/digits_fd.py`, {f['backend']} backend) between {metrics['n_eval']} class-balanced samples "
        f"(fixed noise seed {metrics['noise_seed']}, final samples clamped to [-1, 1]) and the 359 "
        f"held-out digits; class acc = classifier-B accuracy on the requested labels. **Floor** (real "
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
