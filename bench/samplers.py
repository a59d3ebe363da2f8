"""Sampler accuracy against the exact probability-flow ODE, and divergence under strong guidance.

On the 64-D Gaussian mixture (samplers.gmm.gmm_image) under the discrete-VP (DDPM linear betas, eps
prediction) and rectified-flow (velocity) processes: RMS error of every deterministic solver to the exact
ODE solution from the same x_T, per NFE, plus diffusers' DPMSolverMultistepScheduler and
UniPCMultistepScheduler on the VP model.  Then the momentum paper's divergence test: classifier-free
guidance at scale 8, fraction of samples whose norm exceeds 3x the data's largest norm.  Last, the
final-step conventions of dpmpp_2m and hb (option `final_step`, "ours" vs the official codes' "reference")
on grids that end at sigma_min rather than 0, the only grids where they differ.
"""

from __future__ import annotations

from pathlib import Path

import torch

from samplers import REGISTRY, SampleNoise, initial_noise, make_grid, run_sampler, with_guidance
from samplers.gmm import gmm_image
from samplers.processes import DiscreteVP, RectifiedFlow

NFES = (4, 5, 6, 8, 10, 15, 20)
DIVERGENCE_NFES = (5, 8, 10)
GRID = "uniform_lambda"


def deterministic_solvers() -> list[str]:
    return [name for name, spec in REGISTRY.items()
            if not spec.stochastic and "diffusion" in spec.kinds and "flow" in spec.kinds]


def steps_for(name: str, nfe: int) -> int | None:
    spec = REGISTRY[name]
    return next((s for s in range(1, nfe + 1) if spec.nfe(s) == nfe), None)


def _diffusers_row(gmm, process, scheduler_cls, x_T, labels, ref, nfes):
    net = gmm.network(process, "eps")
    row = {}
    for nfe in nfes:
        scheduler = scheduler_cls()
        scheduler.set_timesteps(nfe)
        x = x_T.float()
        for t in scheduler.timesteps:
            eps = net(x.double(), torch.full((x.shape[0],), float(t), dtype=torch.float64), labels).float()
            x = scheduler.step(eps, t, x).prev_sample
        row[nfe] = _rms(x.double(), ref)
    return row


def _rms(x, ref) -> float:
    return float((x - ref).pow(2).mean().sqrt())


def _sweep(model, x, labels, nfes, score) -> dict:
    """score(samples) for every deterministic solver at every NFE it can hit exactly, from the same x."""
    table = {}
    for name in deterministic_solvers():
        table[name] = {}
        for nfe in nfes:
            steps = steps_for(name, nfe)
            if steps is None:
                continue
            out, used = run_sampler(name, model, x, make_grid(model.process, steps, GRID), labels)
            assert used == nfe, (name, nfe, used)
            table[name][nfe] = score(out)
    return table


def error_table(gmm, process, prediction, n, nfes):
    model = gmm.denoiser(process, prediction)
    noise = SampleNoise(range(n), torch.float64)
    labels = torch.arange(n) % gmm.num_classes
    x = initial_noise(model, noise)
    ref = gmm.exact_ode(x, model.sigma_max, 0.0, labels)
    table = _sweep(model, x, labels, nfes, lambda out: _rms(out, ref))
    if isinstance(process, DiscreteVP):
        from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
        x_T = x * process.alpha(process.t_max)
        table["diffusers_dpmpp_2m"] = _diffusers_row(gmm, process, DPMSolverMultistepScheduler, x_T, labels, ref, nfes)
        table["diffusers_unipc"] = _diffusers_row(gmm, process, UniPCMultistepScheduler, x_T, labels, ref, nfes)
    return table


def divergence_table(gmm, n, nfes, scale=8.0):
    process = DiscreteVP.from_schedule()
    model = with_guidance(gmm.denoiser(process, "eps"), scale)
    data = gmm.sample(20000, torch.Generator().manual_seed(1))
    limit = 3 * float(data.flatten(1).norm(dim=1).max())
    noise = SampleNoise(range(1000, 1000 + n), torch.float64)
    labels = torch.arange(n) % gmm.num_classes
    x = initial_noise(model, noise)
    def divergent_fraction(out):
        norms = out.flatten(1).norm(dim=1)
        return float(((norms > limit) | ~torch.isfinite(norms)).double().mean())
    return _sweep(model, x, labels, nfes, divergent_fraction)


FINAL_STEP_NFES = (5, 6, 8, 10, 15, 20)
FINAL_STEP_GRIDS = ("uniform_lambda", "uniform_t")


def final_step_table(gmm, n, nfes, scale=8.0):
    """dpmpp_2m and hb with final_step "ours" / "reference" on grids ending at sigma_min (final_zero=False):
    RMS error to the exact ODE solution at sigma_min (VP and flow, no guidance), and the divergent
    fraction at CFG scale 8 (VP)."""
    runs = [(name, fs) for name in ("dpmpp_2m", "hb") for fs in ("ours", "reference")]
    out = {}
    for kind, process, prediction in (("vp", DiscreteVP.from_schedule(), "eps"), ("flow", RectifiedFlow(), "velocity")):
        model = gmm.denoiser(process, prediction)
        noise = SampleNoise(range(n), torch.float64)
        labels = torch.arange(n) % gmm.num_classes
        x = initial_noise(model, noise)
        ref = gmm.exact_ode(x, model.sigma_max, model.sigma_min, labels)
        for grid in FINAL_STEP_GRIDS:
            for name, fs in runs:
                row = out.setdefault(f"{kind} {grid} error: {name} {fs}", {})
                for nfe in nfes:
                    sigmas = make_grid(model.process, nfe, grid, final_zero=False)
                    res, _ = run_sampler(name, model, x, sigmas, labels, options={"final_step": fs})
                    row[nfe] = _rms(res, ref)
    process = DiscreteVP.from_schedule()
    model = with_guidance(gmm.denoiser(process, "eps"), scale)
    data = gmm.sample(20000, torch.Generator().manual_seed(1))
    limit = 3 * float(data.flatten(1).norm(dim=1).max())
    m = min(n, 1000)
    noise = SampleNoise(range(1000, 1000 + m), torch.float64)
    labels = torch.arange(m) % gmm.num_classes
    x = initial_noise(model, noise)
    for grid in FINAL_STEP_GRIDS:
        for name, fs in runs:
            row = out.setdefault(f"vp {grid} divergent (cfg {scale:g}): {name} {fs}", {})
            for nfe in nfes:
                res, _ = run_sampler(name, model, x, make_grid(process, nfe, grid, final_zero=False), labels,
                                     options={"final_step": fs})
                norms = res.flatten(1).norm(dim=1)
                row[nfe] = float(((norms > limit) | ~torch.isfinite(norms)).double().mean())
    return out


def plot(errors, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(errors["vp"])
    colors = {name: plt.cm.tab20(i % 20) for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, (kind, table) in zip(axes, errors.items()):
        for name, row in table.items():
            if row:
                style = "--" if name.startswith("diffusers_") else "-"
                ax.plot(list(row), list(row.values()), style, marker="os^vD"[names.index(name) % 5], ms=4,
                        color=colors[name], label=name)
        ax.set(xscale="log", yscale="log", xlabel="NFE", title=f"{kind}: RMS error to the exact ODE solution")
        ax.set_xticks(list(NFES), [str(n) for n in NFES])
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("RMS error (64-D Gaussian mixture)")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _print_table(title, table, cols):
    width = max([20, *(len(name) + 1 for name in table)])
    print(f"\n{title}")
    print(f"{'solver':{width}s}" + "".join(f"{c:>10}" for c in cols))
    for name, row in table.items():
        print(f"{name:{width}s}" + "".join(f"{row[c]:10.4f}" if c in row else f"{'-':>10}" for c in cols))


def main(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    gmm = gmm_image()
    n = 64 if quick else 512
    errors = {"vp": error_table(gmm, DiscreteVP.from_schedule(), "eps", n, NFES),
              "flow": error_table(gmm, RectifiedFlow(), "velocity", n, NFES)}
    divergence = divergence_table(gmm, 128 if quick else 1000, DIVERGENCE_NFES)
    final_step = final_step_table(gmm, n, FINAL_STEP_NFES)
    for kind, table in errors.items():
        _print_table(f"RMS error to the exact ODE solution ({kind}, {n} samples, {GRID} grid)", table, NFES)
    _print_table("Fraction of divergent samples, CFG scale 8 (VP)", divergence, DIVERGENCE_NFES)
    _print_table("final_step conventions on grids ending at sigma_min", final_step, FINAL_STEP_NFES)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    plot(errors, out / ("samplers_quick.png" if quick else "samplers.png"))
    return {"error": {kind: _str_keys(table) for kind, table in errors.items()},
            "divergence": _str_keys(divergence), "final_step": _str_keys(final_step)}


def _str_keys(table: dict) -> dict:
    return {name: {str(nfe): value for nfe, value in row.items()} for name, row in table.items()}
