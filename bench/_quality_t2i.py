"""digits-t2i rows of `python -m bench quality`: prompt-conditioned sample quality of the text-to-image zoo model.

For a fixed balanced prompt set (`training.digits_t2i.evaluate.balanced_prompts`: every digit, plain / bold /
thin / slanted left / slanted right, the four trained phrasings) and the same initial latents (seeds 1234 + k),
every cell scores the decoded images reduced to the classifiers' 8x8 input: class accuracy of the prompt's digit
under held-out classifier B, attribute accuracy (the measured ink mass / slant on the prompt's side of its class
median), digits-FD against the held-out digits, and the fraction of diverged samples (a non-finite latent or a
coordinate beyond twice the largest of the training digits' encodings). Sections:
  * nfe: our samplers through models/pipelines and diffusers' StableDiffusionPipeline with its own schedulers
    (DDIM, DPMSolverMultistep, UniPCMultistep, EulerDiscrete) at NFE 2-20, guidance 4 (the zoo default);
  * guidance: 1, 2, 4, 7.5 at the default 20 steps (dpmpp_2m and DPMSolverMultistep);
  * negative: "a zero" ... "a nine" without and with "bold" as the negative prompt: mean ink mass;
  * momentum: dpmpp_2m, hb, plms (order 2), plms_hb, ghvb at guidance 7.5 / 10 / 15 and NFE 5 / 8 / 10 (the setting of
    Wizadwongsa et al., arXiv 2307.11118), with the latent RMSE to a 50-step dpmpp_2m solution of the same ODE.
A full run keeps its cells in bench/results/quality_rows_digits-t2i.json (reused while the weights, samplers/,
models/pipelines/, the evaluation code and this file are unchanged).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from models.config import load_config
from models.loading import load_model
from models.pipelines.generate import PipelineRequest, generate
from samplers import SampleNoise
from training.digits_t2i import data, evaluate

MODEL = "digits-t2i"
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
NFES = (2, 4, 6, 10, 20)
SAMPLERS = ("euler", "dpmpp_2m", "unipc", "evodiff", "hb", "ghvb", "plms_hb", "dpmpp_2m_sde")  # euler = DDIM's update
SCHEDULERS = ("DDIM", "DPMSolverMultistep", "UniPCMultistep", "EulerDiscrete")
GUIDANCES = (1.0, 2.0, 4.0, 7.5)
DEFAULT_STEPS, DEFAULT_GUIDANCE = 20, 4.0  # zoo/models.toml
# each momentum method beside its beta = 1 base: hb (beta 0.8) on dpmpp_2m; plms_hb, ghvb (order 2, beta 0.8) on plms 2
MOMENTUM = (("dpmpp_2m", {}), ("hb", {}), ("plms", {"order": 2}), ("plms_hb", {}), ("ghvb", {}))
MOMENTUM_GUIDANCES, MOMENTUM_NFES, REFERENCE_STEPS = (7.5, 10.0, 15.0), (5, 8, 10), 50


def label(sampler: str, options: dict) -> str:
    return sampler + "".join(f" {k} {v}" for k, v in sorted(options.items()))


class T2IQuality:
    """Loaded once: our pipeline, diffusers' StableDiffusionPipeline on the same directory, the scorer."""

    def __init__(self) -> None:
        from diffusers import StableDiffusionPipeline

        entry = load_config()[MODEL]
        self.directory = Path(entry.directory)
        self.ours = load_model(entry).model
        self.sd = StableDiffusionPipeline.from_pretrained(self.directory, local_files_only=True)
        self.sd.set_progress_bar_config(disable=True)
        self.base_scheduler = dict(self.sd.scheduler.config)
        info = json.loads((self.directory / "train_info.json").read_text())
        self.scorer = evaluate.Scorer(info["attribute_thresholds"])
        self.bound = evaluate.latent_bound(self.sd.vae)

    def initial(self, seeds: list[int]) -> torch.Tensor:
        """Unit-variance initial latents from per-sample seeds, as our pipeline draws them."""
        return SampleNoise(seeds, torch.float64).randn(self.ours.latent_shape(*self.ours.default_size))

    @torch.no_grad()
    def run_ours(self, sampler, nfe, prompts, seeds, guidance, negative=None, options=None, chunk=50):
        """Requests of at most ``chunk`` samples: the pipeline's prompt cache holds 64 rows, and a request with more
        distinct prompts than that loses some (encode_prompts re-reads the cache). Sample k depends on seed k only."""
        images, latents = [], []
        for i in range(0, len(prompts), chunk):
            ps, ss = prompts[i:i + chunk], seeds[i:i + chunk]
            result = generate(self.ours, PipelineRequest(
                seeds=ss, prompts=ps, negative_prompts=None if negative is None else [negative] * len(ps),
                steps=nfe, sampler=sampler, guidance=guidance, options=dict(options or {}), latents=self.initial(ss)))
            if result.nfe != nfe:
                raise RuntimeError(f"{sampler}: {result.nfe} network calls for {nfe} steps")
            images.append(result.images.float().clamp(-1, 1))
            latents.append(result.latents.float())
        return torch.cat(images), torch.cat(latents)

    @torch.no_grad()
    def run_diffusers(self, scheduler, nfe, prompts, seeds, guidance, negative=None):
        import diffusers

        overrides = {"clip_sample": False} if scheduler == "DDIM" else {}  # DDIM's default clips latents to [-1, 1]
        self.sd.scheduler = getattr(diffusers, scheduler + "Scheduler").from_config(self.base_scheduler, **overrides)
        latents = self.sd(prompts, negative_prompt=None if negative is None else [negative] * len(prompts),
                          num_inference_steps=nfe, guidance_scale=guidance, latents=self.initial(seeds).float(),
                          output_type="latent").images
        images = self.sd.vae.decode(latents / self.sd.vae.config.scaling_factor).sample
        return images.float().clamp(-1, 1), latents.float()

    def score(self, images, latents, labels, forms, fd=True) -> dict:
        row = self.scorer.score(images, labels, forms, fd=fd)
        out = {k: row[k] for k in ("class_acc", "attr_acc", "attr_strict", "fd") if k in row}
        out["diverged"] = float(evaluate.diverged(latents, self.bound).float().mean())
        out["n"] = len(images)
        return out


def cache_key(n: int) -> str:
    files = sorted((REPO / "zoo" / MODEL).rglob("*.safetensors"))
    for folder in ("samplers", "models/pipelines"):
        files += sorted((REPO / folder).glob("*.py"))
    files += [Path(evaluate.__file__), Path(data.__file__)]
    cells_code = Path(__file__).read_text().split("\n# --- plot")[0].encode()  # the plot may change freely
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files) + cells_code).hexdigest()
    return json.dumps([digest[:16], n, evaluate.NOISE_SEED])


class Cells:
    """Each computed cell once per run; a full run also keeps them on disk under the code's hash."""

    def __init__(self, path: Path | None, key: str) -> None:
        self.path, self.key, self.cells = path, key, {}
        if path is not None and path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                self.cells = saved["cells"]

    def get(self, cell_id: str, compute) -> dict:
        if cell_id not in self.cells:
            self.cells[cell_id] = compute()
            if self.path is not None:
                self.path.write_text(json.dumps({"key": self.key, "cells": self.cells}) + "\n")
        return self.cells[cell_id]


def _memo(fn):
    """fn() computed on first use only (a reference solution is needed only when some cell is not cached)."""
    saved = []
    return lambda: saved[0] if saved else saved.append(fn()) or saved[0]


def _print(row: dict) -> None:
    keys = ("class_acc", "attr_acc", "fd", "diverged", "rmse_ref", "ink_mass")
    metrics = "  ".join(f"{k} {row[k]:.3f}" for k in keys if row.get(k) is not None)
    print(f"  t2i {row['section']:8s} {row['source']:9s} {row['sampler']:22s} NFE {row['nfe']:3d} "
          f"w {row['guidance']:4.1f} {row.get('negative') or '':4s} {metrics}", flush=True)


def run(quick: bool = False) -> list[dict]:
    """The digits-t2i rows (list of dicts with model, section, source, sampler, nfe, guidance and metrics)."""
    n = 20 if quick else 100
    nfes = (4, 10) if quick else NFES
    samplers = ("euler", "dpmpp_2m", "hb") if quick else SAMPLERS
    schedulers = ("DPMSolverMultistep", "EulerDiscrete") if quick else SCHEDULERS
    guidances = (1.0, 7.5) if quick else GUIDANCES
    momentum = MOMENTUM[:2] if quick else MOMENTUM
    m_guidances, m_nfes = ((15.0,), (5, 10)) if quick else (MOMENTUM_GUIDANCES, MOMENTUM_NFES)
    start = time.perf_counter()
    q = T2IQuality()
    cells = Cells(None if quick else RESULTS / f"quality_rows_{MODEL}.json", cache_key(n))
    prompts, labels, forms, seeds = evaluate.balanced_prompts(n)
    rows: list[dict] = []

    def add(section, source, sampler, nfe, guidance, negative=None, options=None, ref=None):
        run_fn = q.run_ours if source == "ours" else q.run_diffusers
        extra = {"options": options} if options else {}
        prompt_set = "plain" if section == "negative" else "balanced"
        cell_id = json.dumps([source, sampler, options or {}, nfe, guidance, negative, prompt_set, ref is not None])

        def compute():
            ps, ls, fs = (plain, plain_labels, ["plain"] * n) if prompt_set == "plain" else (prompts, labels, forms)
            if ref is not None and nfe == REFERENCE_STEPS:  # the reference row itself
                images, latents = ref()
            else:
                images, latents = run_fn(sampler, nfe, ps, seeds, guidance, negative, **extra)
            out = q.score(images, latents, ls, fs)
            if section == "negative":
                x8 = data.to_classifier(images)
                out["ink_mass"] = float(data.ink_mass(x8).mean())
                out["ink_quantile"] = q.scorer.ink_quantile(images, ls)
            if ref is not None:
                rms = ((latents - ref()[1]) ** 2).flatten(1).mean(1).sqrt()
                out["rmse_ref"] = float(rms.nan_to_num(float("inf")).median())
            return out

        row = {"model": MODEL, "section": section, "source": source, "sampler": label(sampler, options or {}),
               "nfe": nfe, "guidance": guidance, **({"negative": negative} if section == "negative" else {}),
               **cells.get(cell_id, compute)}
        rows.append(row)
        _print(row)

    for sampler in samplers:
        for nfe in nfes:
            add("nfe", "ours", sampler, nfe, DEFAULT_GUIDANCE)
    for scheduler in schedulers:
        for nfe in nfes:
            add("nfe", "diffusers", scheduler, nfe, DEFAULT_GUIDANCE)
    for guidance in guidances:
        add("guidance", "ours", "dpmpp_2m", DEFAULT_STEPS, guidance)
        add("guidance", "diffusers", "DPMSolverMultistep", DEFAULT_STEPS, guidance)
    plain = [evaluate.form_prompt(k % 10, "plain") for k in range(n)]
    plain_labels = torch.arange(n) % 10
    for negative in (None, "bold"):
        add("negative", "ours", "dpmpp_2m", DEFAULT_STEPS, DEFAULT_GUIDANCE, negative)
        add("negative", "diffusers", "DPMSolverMultistep", DEFAULT_STEPS, DEFAULT_GUIDANCE, negative)
    for guidance in m_guidances:
        ref = _memo(lambda g=guidance: q.run_ours("dpmpp_2m", REFERENCE_STEPS, prompts, seeds, g))
        add("momentum", "ours", "dpmpp_2m", REFERENCE_STEPS, guidance, ref=ref)
        for sampler, options in momentum:
            for nfe in m_nfes:
                add("momentum", "ours", sampler, nfe, guidance, options=options, ref=ref)
    print(f"digits-t2i: {len(rows)} rows, {n} samples per cell, latent bound {q.bound:.2f}, "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return rows


# --- plot (outside the cells' hash: see cache_key)
def plot(rows: list[dict], path: Path) -> None:
    """NFE grid (class acc, attribute acc, digits-FD), guidance sweep, momentum at the strongest guidance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    grid = [r for r in rows if r["section"] == "nfe"]
    names = list(dict.fromkeys((r["source"], r["sampler"]) for r in grid))
    for i, (source, sampler) in enumerate(names):
        cell = sorted((r for r in grid if (r["source"], r["sampler"]) == (source, sampler)), key=lambda r: r["nfe"])
        style = dict(ls="--" if source == "diffusers" else "-", marker="os^vD"[i % 5], ms=4,
                     color=plt.cm.tab20(i % 20), label=f"{source}: {sampler}")
        for ax, key in zip(axes[0], ("class_acc", "attr_acc", "fd")):
            ax.plot([r["nfe"] for r in cell], [r[key] for r in cell], **style)
    nfes = sorted({r["nfe"] for r in grid})
    for ax, key in zip(axes[0], ("class acc (classifier B)", "attribute acc", "digits-FD")):
        ax.set(xscale="log", xlabel="NFE (guidance 4)", ylabel=key, title=f"{key} vs NFE")
        ax.set_xticks(nfes, [str(v) for v in nfes])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0][2].set_yscale("log")
    axes[0][0].legend(fontsize=6, ncol=2)
    ax = axes[1][0]
    for source, color in (("ours", "C0"), ("diffusers", "C1")):
        sweep = sorted((r for r in rows if r["section"] == "guidance" and r["source"] == source),
                       key=lambda r: r["guidance"])
        ws = [r["guidance"] for r in sweep]
        ax.plot(ws, [r["class_acc"] for r in sweep], "-o", color=color, label=f"{source} class acc")
        ax.plot(ws, [r["attr_acc"] for r in sweep], ":s", color=color, label=f"{source} attribute acc")
        ax.plot(ws, [r["fd"] for r in sweep], "--^", color=color, label=f"{source} digits-FD")
    ax.set(xlabel="guidance (20 steps)", title="guidance sweep: dpmpp_2m, DPMSolverMultistep (equal)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    momentum = [r for r in rows if r["section"] == "momentum" and r["nfe"] != REFERENCE_STEPS]
    if momentum:
        w = max(r["guidance"] for r in momentum)
        for i, sampler in enumerate(dict.fromkeys(r["sampler"] for r in momentum)):
            cell = sorted((r for r in momentum if r["sampler"] == sampler and r["guidance"] == w),
                          key=lambda r: r["nfe"])
            for ax, key in zip(axes[1][1:], ("diverged", "rmse_ref")):
                ax.plot([r["nfe"] for r in cell], [r[key] for r in cell], "-" + "os^vDpx"[i % 7], ms=5,
                        color=plt.cm.tab10(i % 10), label=sampler)
        ref = next(r for r in rows if r["section"] == "momentum" and r["nfe"] == REFERENCE_STEPS
                   and r["guidance"] == w)
        axes[1][1].axhline(ref["diverged"], color="k", lw=0.8, ls=":", label=f"dpmpp_2m {REFERENCE_STEPS} steps")
        axes[1][1].set(xlabel="NFE", ylabel="fraction diverged", title=f"momentum: divergence at guidance {w:g}")
        axes[1][2].set(xlabel="NFE", ylabel=f"median latent RMSE to dpmpp_2m, {REFERENCE_STEPS} steps", yscale="log",
                       title=f"momentum: error at guidance {w:g}")
        for ax in axes[1][1:]:
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    n = rows[0]["n"] if rows else 0
    fig.suptitle(f"digits-t2i: {n} samples per point, balanced prompts, same initial latents for ours and diffusers",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
