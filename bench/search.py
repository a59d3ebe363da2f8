"""Test-time search on the digits models: reward vs NFE budget for best-of-N, EvoSearch, RBF and FKC-CFG.

For every digits model in the zoo (digits-ddpm, and digits-flow once trained), target class c for each of
the 10 classes and several seeds, budgets B = T x {1, 4, 8, 16, 32} NFE with T = 10 steps:
  * setting "verifier": best_of_n (dpmpp_2m ODE), evosearch (DDIM eta = 1 / SDE-DPM-Solver++) and
    rollover_budget_forcing (the converted SDE) on the model's *unconditional* branch, steered only by
    classifier A's log p(c | x).  (With the class label the model is already ~98% accurate under
    classifier B, so every search saturates; unconditionally one sample is right ~10% of the time and
    the search does all the work, as the reward does in the papers.)
  * setting "cfg": fkc (target cfg, beta = 2; reward-free, particle 0 returned) on the class-conditional
    model against plain CFG at scale 2 (dpmpp_2m, T NFE).
  * setting "paper" (full run only): the official EvoSearch code's smallest default, 50 steps and 1465 NFE
    (schedule 5 20 30 40, populations 14 7 7 7 10, 3 elites, mutation rate 0.2), in both conventions
    (evosearch = the paper's Alg. 2, evosearch_code = the official code's), against best-of-29 (dpmpp_2m).
Measured per row: reward_a (mean log p_A(c | x), the guide), reward_b and acc_b (held-out classifier B:
mean log-probability and accuracy), fd (digits-FD of all returned samples against the held-out real
digits; few samples, so compare rows with each other, not with the model card), diversity (mean pairwise
L2 distance between the samples returned for one class, averaged over classes), seconds (wall time per
search), plus nfe, network passes and verifier calls per search.  A PNG plots reward vs budget.
A full run keeps each model's rows in bench/results/search_rows_<model>.json and reuses them while that
model's weights, the search/ code and this file are unchanged (a model added to the zoo later costs only
its rows).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from samplers import NULL_LABEL, SampleNoise, initial_noise, run_sampler, with_guidance
from search import build_verifier, run_search
from search.trajectory import schedule

ZOO = Path(__file__).resolve().parents[1] / "zoo"
RESULTS = Path(__file__).resolve().parent / "results"
STEPS = 10
MULTIPLES = (1, 4, 8, 16, 32)
FKC_BETA = 2.0


def _models():
    from models.diffusers_loader import load_unet_denoiser

    out = {}
    for name in ("digits-ddpm", "digits-flow"):
        if (ZOO / name / "unet").is_dir():
            out[name] = load_unet_denoiser(ZOO / name, null_class=10)[0]
    return out


class Unconditional:
    """The model's unconditional branch whatever labels it is given (the labels still reach the verifier)."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, sigma, cond=None):
        return self.model(x, sigma, None if cond is None else torch.full_like(torch.as_tensor(cond), NULL_LABEL))


# (row name, setting, search method, options)
METHODS = (("best_of_n", "verifier", "best_of_n", {}), ("evosearch", "verifier", "evosearch", {}),
           ("evosearch_code", "verifier", "evosearch", {"convention": "code"}),
           ("rbf", "verifier", "rollover_budget_forcing", {}), ("fkc_cfg", "cfg", "fkc", {"beta": FKC_BETA}))
# The official code's smallest default (FLUX/evosearch.py): 50 steps, evolution at steps 5 20 30 40, populations
# 14 7 7 7 10 = 1465 NFE (about 29 x 50), 3 elites, mutation rate 0.2; against best-of-29 at the same NFE.
PAPER_STEPS, PAPER_BUDGET = 50, 1465
PAPER_EVO = {"evolution_steps": [5, 20, 30, 40], "initial_factor": 2.0, "elites": 3, "mutation_rate": 0.2}
PAPER_METHODS = (("best_of_n", "best_of_n", {}), ("evosearch", "evosearch", PAPER_EVO),
                 ("evosearch_code", "evosearch", {**PAPER_EVO, "convention": "code"}))


def _cache_key(model_name: str, classes, seeds_per_class, multiples) -> str:
    """Rows of a full run are reused while the weights, the search code and the configuration are unchanged."""
    weights = sorted((ZOO / model_name / "unet").glob("*.safetensors"))
    code = sorted((Path(__file__).resolve().parents[1] / "search").glob("*.py")) + [Path(__file__).resolve()]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in weights + code)).hexdigest()[:16]
    return json.dumps([model_name, digest, STEPS, list(classes), seeds_per_class, list(multiples), FKC_BETA,
                       [(m[0], m[2], m[3]) for m in METHODS], PAPER_STEPS, PAPER_BUDGET, PAPER_METHODS])


def _diversity(samples: torch.Tensor, labels: torch.Tensor) -> float:
    per_class = []
    for c in labels.unique():
        x = samples[labels == c].flatten(1).double()
        if len(x) > 1:
            d = torch.cdist(x, x)
            per_class.append(float(d.sum() / (len(x) * (len(x) - 1))))
    return sum(per_class) / len(per_class)


def _metrics(samples, labels, clf_a, clf_b):
    from training.digits_fd import frechet_distance

    x = samples.float().clamp(-1, 1)
    with torch.no_grad():
        la, lb = torch.log_softmax(clf_a(x), -1), torch.log_softmax(clf_b(x), -1)
    idx = torch.arange(len(labels))
    return {"reward_a": float(la[idx, labels].mean()), "reward_b": float(lb[idx, labels].mean()),
            "acc_b": float((lb.argmax(1) == labels).float().mean()),
            "fd": frechet_distance(x, backend="scipy")["fd"], "diversity": _diversity(x, labels)}


def _plain_cfg(model, labels, seeds):
    """The baseline a user would otherwise pick: one dpmpp_2m sample at CFG scale 2 per seed, T NFE."""
    noise = SampleNoise(seeds)
    x = initial_noise(model, noise)
    out, nfe = run_sampler("dpmpp_2m", with_guidance(model, FKC_BETA), x, schedule(model, STEPS), labels)
    return out, nfe


def main(quick: bool = False) -> dict:
    from models.classifiers import load_classifier

    torch.set_num_threads(2)
    clf_a = load_classifier(ZOO / "digit-classifier-a")
    clf_b = load_classifier(ZOO / "digit-classifier-b")
    verifier = build_verifier("digit-class", {}, {"classifier-a": clf_a})
    classes = (0, 7) if quick else tuple(range(10))
    seeds_per_class = 2
    multiples = (1, 4) if quick else MULTIPLES
    models = _models()
    if quick:
        models = dict(list(models.items())[:1])
    labels = torch.tensor([c for c in classes for _ in range(seeds_per_class)])
    seeds = [1000 * c + s for c in classes for s in range(seeds_per_class)]
    rows = []

    def add(row):
        rows.append(row)
        _print_row(row)

    for model_name, model in models.items():
        cache = RESULTS / f"search_rows_{model_name}.json"
        key = _cache_key(model_name, classes, seeds_per_class, multiples)
        if not quick and cache.is_file() and json.loads(cache.read_text()).get("key") == key:
            for row in json.loads(cache.read_text())["rows"]:
                add(row)
            continue
        first = len(rows)
        t0 = time.perf_counter()
        out, nfe = _plain_cfg(model, labels, seeds)
        add({"method": "cfg", "setting": "cfg", "model": model_name, "budget_nfe": nfe, "nfe": nfe,
             "network_passes": 2 * nfe, "verifier_calls": 0, **_metrics(out, labels, clf_a, clf_b),
             "seconds": (time.perf_counter() - t0) / len(seeds)})
        for row_name, setting, method, options in METHODS:
            for m in multiples:
                budget = m * STEPS
                opts = dict(options)
                if method == "rollover_budget_forcing" and budget < 2 * STEPS + 3:
                    opts.update(particles=1, init_fraction=0.0, finish_steps=0)  # one chain, no finish
                target = Unconditional(model) if setting == "verifier" else model
                t0 = time.perf_counter()
                result = run_search(method, target, verifier=verifier, budget_nfe=budget, cond=labels, seeds=seeds,
                                    steps=STEPS, options=opts, trace=False)
                add({"method": row_name, "setting": setting, "model": model_name, "budget_nfe": budget,
                     "nfe": result.nfe, "network_passes": result.network_passes,
                     "verifier_calls": result.verifier_calls, **_metrics(result.samples, labels, clf_a, clf_b),
                     "seconds": (time.perf_counter() - t0) / len(seeds)})
        for row_name, method, opts in () if quick else PAPER_METHODS:
            t0 = time.perf_counter()
            result = run_search(method, Unconditional(model), verifier=verifier, budget_nfe=PAPER_BUDGET, cond=labels,
                                seeds=seeds, steps=PAPER_STEPS, options=opts, trace=False)
            add({"method": row_name, "setting": "paper", "model": model_name, "budget_nfe": PAPER_BUDGET,
                 "steps": PAPER_STEPS, "nfe": result.nfe, "network_passes": result.network_passes,
                 "verifier_calls": result.verifier_calls, **_metrics(result.samples, labels, clf_a, clf_b),
                 "seconds": (time.perf_counter() - t0) / len(seeds)})
        if not quick:
            RESULTS.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"key": key, "rows": rows[first:]}, indent=1) + "\n")
    from .search_t2i import rows as t2i_rows

    t2i = t2i_rows(quick, _print_t2i_row)
    rows += t2i
    _plot(rows, RESULTS / ("search_quick.png" if quick else "search.png"))
    _plot_t2i(t2i, RESULTS / ("search_t2i_quick.png" if quick else "search_t2i.png"))
    return {"steps": STEPS, "classes": list(classes), "seeds_per_class": seeds_per_class, "rows": rows}


HEADER = f"{'model':<12} {'setting':<9} {'method':<10} {'B':>5} {'nfe':>5} {'passes':>6} {'v.calls':>7} " \
         f"{'reward_a':>9} {'reward_b':>9} {'acc_b':>6} {'fd':>8} {'divers.':>7} {'s/search':>8}"


def _print_row(r: dict) -> None:
    if not getattr(_print_row, "started", False):
        print(HEADER)
        _print_row.started = True
    print(f"{r['model']:<12} {r['setting']:<9} {r['method']:<10} {r['budget_nfe']:>5} {r['nfe']:>5} "
          f"{r['network_passes']:>6} {r['verifier_calls']:>7} {r['reward_a']:>9.4f} {r['reward_b']:>9.4f} "
          f"{r['acc_b']:>6.3f} {r['fd']:>8.2f} "
          f"{r['diversity']:>7.3f} {r['seconds']:>8.3f}", flush=True)


def _print_t2i_row(r: dict) -> None:
    if not getattr(_print_t2i_row, "started", False):
        print(f"\n{'model':<12} {'setting':<8} {'method':<26} {'B':>5} {'nfe':>5} {'satisfied':>9} {'acc_b':>6} "
              f"{'reward_a':>9} {'reward_b':>9} {'fd':>7} {'divers.':>7} {'s/sample':>8}")
        _print_t2i_row.started = True
    print(f"{r['model']:<12} {r['setting']:<8} {r['method']:<26} {r['budget_nfe']:>5} {r['nfe']:>5} "
          f"{r['satisfied']:>9.3f} {r['acc_b']:>6.3f} {r['reward_a']:>9.3f} {r['reward_b']:>9.3f} {r['fd']:>7.2f} "
          f"{r['diversity']:>7.3f} {r['seconds']:>8.3f}", flush=True)


def _plot_t2i(rows: list[dict], path: Path) -> None:
    """digits-t2i: prompt satisfaction (held-out B + measured attributes) vs budget, and the FKC products."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.2))
    prompt = [r for r in rows if r["setting"] == "prompt"]
    for method in dict.fromkeys(r["method"] for r in prompt):
        pts = sorted((r["budget_nfe"], r["satisfied"]) for r in prompt if r["method"] == method)
        if method.startswith("plain"):
            left.axhline(pts[0][1], ls="--", lw=1, color="gray" if method == "plain" else "black",
                         label=f"{method} ({pts[0][0]} NFE)")
        else:
            left.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
    left.set_xscale("log", base=2)
    left.set_xlabel("NFE budget per sample")
    left.set_ylabel("prompts satisfied (classifier B + attributes)")
    left.set_title("digits-t2i: prompted search, guidance 1, two-attribute prompts", fontsize=10)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    product = [r for r in rows if r["setting"] == "product"]
    right.barh([r["method"] for r in product], [r["satisfied"] for r in product])
    right.set_xlabel('"a bold seven" satisfied (classifier B + bold)')
    right.set_title('FKC product "a seven" x "bold 7" vs CFG on the joint prompt', fontsize=10)
    right.set_xlim(0, 1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["setting"] in ("verifier", "cfg")]
    models = sorted({r["model"] for r in rows})
    panels = [("verifier", "reward_a", "verifier-steered: classifier A (guide)"),
              ("verifier", "reward_b", "verifier-steered: classifier B (held out)"),
              ("cfg", "reward_b", "FKC-CFG vs CFG 2: classifier B")]
    fig, axes = plt.subplots(len(models), 3, figsize=(15, 3.8 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, (setting, key, title) in enumerate(panels):
            ax = axes[i][j]
            mine = [r for r in rows if r["model"] == model and r["setting"] == setting]
            for method in sorted({r["method"] for r in mine}):
                pts = sorted((r["budget_nfe"], r[key]) for r in mine if r["method"] == method)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "*" if len(pts) == 1 else "o-", label=method)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("NFE budget per sample")
            ax.set_ylabel(f"{key}: mean log p(c | x)")
            ax.set_title(f"{model}: {title}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


