"""Masked diffusion on text-mdm: first_hitting (FHS) against the MDLM ancestral sampler, float64 and float32.

For every row: wall time per 128-token sample, NFE per sample, generative perplexity under the
independent Kneser-Ney trigram evaluator (training/text_eval.py, fitted on the training split) and the mean
per-sample token entropy. Rows: `first_hitting`, and `mdlm` at N = 128, 512 and 10 L = 1280 with and
without caching, each with float64 and float32 categorical sampling; the held-out text is the reference.
All rows sample the same seeds in batches of BATCH on one thread, so timings compare like with like; on a
shared machine the process CPU time (cpu_seconds_per_sample) is the steadier of the two clocks.

Uncached mdlm makes the same draws from the same noise streams as cached mdlm, so it produces the same
tokens; it is timed on the first batch only, its tokens are checked against the cached run's, and its
quality columns are then the cached run's (over all samples). `identical_to_cached` records the check.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from models.masked_lm import load_masked_lm
from samplers.masked import all_masked, run_masked_sampler
from samplers.noise import SampleNoise
from samplers.registry import CallCounter
from training import text_data, text_eval

ZOO = Path(__file__).resolve().parents[1] / "zoo" / "text-mdm"
RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 8


def generate(lm, name, steps, options, seeds):
    """Sample every seed in batches of BATCH; returns (tokens, mean NFE per sample, wall and CPU s per sample).

    NFE per sample: the rows the network received (a masked sampler calls only the sequences still changing)
    over the number of samples."""
    tokens, wall, cpu = [], 0.0, 0.0
    counter = CallCounter(lm)
    for start in range(0, len(seeds), BATCH):
        chunk = seeds[start:start + BATCH]
        t0, c0 = time.perf_counter(), time.process_time()
        x, _ = run_masked_sampler(name, counter, all_masked(lm, len(chunk)), steps=steps, noise=SampleNoise(chunk),
                                  options=options)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        tokens.append(x)
    return torch.cat(tokens), counter.rows / len(seeds), wall / len(seeds), cpu / len(seeds)


def configs(quick: bool, lengths=None):
    steps = lengths or ((128,) if quick else (128, 512, 1280))
    for precision in ("float64", "float32"):
        yield "first_hitting", None, precision, None
        for n in steps:
            yield "mdlm", n, precision, True
            yield "mdlm", n, precision, False


def run_rows(lm, evaluator, seeds, quick: bool, log=print, lengths=None) -> list[dict]:
    rows, cached_tokens = [], {}
    for name, steps, precision, cached in configs(quick, lengths):
        options = {"precision": precision} | ({} if cached is None else {"cached": cached})
        row = dict(sampler=name, steps=steps if steps else lm.length, precision=precision, cached=cached)
        if cached is False:  # timed on one batch; same draws as the cached run -> same tokens
            x, nfe, sec, cpu = generate(lm, name, steps, options, seeds[:BATCH])
            ref = cached_tokens[steps, precision]
            row["identical_to_cached"] = bool(torch.equal(x, ref[:len(x)]))
            x_quality = ref if row["identical_to_cached"] else x
        else:
            x, nfe, sec, cpu = generate(lm, name, steps, options, seeds)
            x_quality = x
            if name == "mdlm":
                cached_tokens[steps, precision] = x
        row.update(seconds_per_sample=round(sec, 4), cpu_seconds_per_sample=round(cpu, 4),
                   nfe=round(float(nfe), 2),
                   **quality(evaluator, x_quality))
        rows.append(row)
        log(_format_row(row))
    return rows


def quality(evaluator, x: torch.Tensor) -> dict:
    """gen-PPL and mean entropy, with Monte-Carlo standard errors over the samples."""
    nll = torch.tensor([sum(evaluator.nll(row)) / (len(row) - 2) for row in x], dtype=torch.float64)
    ent = torch.tensor([text_eval.sample_entropy(row[None]) for row in x], dtype=torch.float64)
    def se(v):  # of the mean; for gen-PPL, of log PPL, i.e. PPL's relative error
        return round(float(v.std() / len(v) ** 0.5), 4) if len(v) > 1 else None

    return dict(gen_ppl=round(evaluator.perplexity(x), 3), gen_ppl_rel_se=se(nll),
                entropy=round(float(ent.mean()), 4), entropy_se=se(ent), samples=len(x))


def claims(rows: list[dict], length: int) -> dict:
    """The paper's claims as ratios measured in this run (float64 rows; the float32 entropy drop)."""
    def find(name, steps, precision="float64", cached=None):
        return next((r for r in rows if r["sampler"] == name and r["steps"] == steps
                     and r["precision"] == precision and r["cached"] == cached), None)

    fhs, out = find("first_hitting", length), {}
    for n in sorted({r["steps"] for r in rows if r["sampler"] == "mdlm"}):
        for cached in (True, False):
            base = find("mdlm", n, cached=cached)
            key = f"mdlm_{n}_{'cached' if cached else 'uncached'}"
            out[f"fhs_speedup_vs_{key}"] = round(base["seconds_per_sample"] / fhs["seconds_per_sample"], 2)
            out[f"fhs_cpu_speedup_vs_{key}"] = round(base["cpu_seconds_per_sample"]
                                                     / fhs["cpu_seconds_per_sample"], 2)
        base = find("mdlm", n, cached=True)
        out[f"fhs_gen_ppl_change_vs_mdlm_{n}_pct"] = round(100 * (fhs["gen_ppl"] / base["gen_ppl"] - 1), 2)
        out[f"fhs_entropy_change_vs_mdlm_{n}_pct"] = round(100 * (fhs["entropy"] / base["entropy"] - 1), 2)
    for name, n, cached in [("first_hitting", length, None)] + [("mdlm", r["steps"], True) for r in rows
                                                                if r["sampler"] == "mdlm" and r["cached"]
                                                                and r["precision"] == "float64"]:
        r64, r32 = find(name, n, "float64", cached), find(name, n, "float32", cached)
        key = name if name == "first_hitting" else f"mdlm_{n}"
        out[f"float32_entropy_change_{key}"] = round(r32["entropy"] - r64["entropy"], 4)
        out[f"float32_gen_ppl_change_{key}_pct"] = round(100 * (r32["gen_ppl"] / r64["gen_ppl"] - 1), 2)
    return out


def with_rerun(rows: list[dict], length: int, lengths, samples: int, quick: bool) -> dict:
    """The stored full result with this partial run under `reruns` (its own first_hitting row, so its
    ratios are measured in one run); an earlier rerun of the same lengths is replaced."""
    path = RESULTS / ("masked_quick.json" if quick else "masked.json")
    result = json.loads(path.read_text()) if path.exists() else {"rows": []}
    rerun = {"lengths": sorted(lengths), "rows": rows, "claims": claims(rows, length), "samples_per_row": samples,
             "batch": BATCH, "threads": 1, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for key, value in rerun["claims"].items():
        print(f"  {key}: {value}")
    result["reruns"] = [r for r in result.get("reruns", []) if r["lengths"] != rerun["lengths"]] + [rerun]
    return result


def _format_row(r: dict) -> str:
    cached = "-" if r["cached"] is None else ("yes" if r["cached"] else "no")
    return (f"{r['sampler']:<14}{r['steps']:>6}  {r['precision']:<8} {cached:<7}"
            f"{r['seconds_per_sample']:>10.3f}{r['cpu_seconds_per_sample']:>10.3f}{r['nfe']:>9.1f}"
            f"{r['gen_ppl']:>10.2f}{r['entropy']:>9.3f}")


def plot(rows, reference, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['sampler'][:5]} {r['steps']} {r['precision'][-2:]}"
              + ("" if r["cached"] is None else (" c" if r["cached"] else " u")) for r in rows]
    ax1.barh(labels, [r["seconds_per_sample"] for r in rows], color=[
        "tab:green" if r["sampler"] == "first_hitting" else "tab:blue" if r["cached"] else "tab:gray"
        for r in rows])
    ax1.set_xscale("log")
    ax1.set_xlabel("seconds per 128-token sample (log)")
    ax1.invert_yaxis()
    for r in rows:
        if r["cached"] is False:
            continue
        marker = "o" if r["precision"] == "float64" else "x"
        color = "tab:green" if r["sampler"] == "first_hitting" else "tab:blue"
        ax2.errorbar(r["entropy"], r["gen_ppl"], xerr=r["entropy_se"],
                     yerr=None if r["gen_ppl_rel_se"] is None else r["gen_ppl"] * r["gen_ppl_rel_se"],
                     marker=marker, color=color, capsize=2, linestyle="none")
        ax2.annotate(f"{r['sampler'][:5]} {r['steps']} {r['precision'][-2:]}", (r["entropy"], r["gen_ppl"]),
                     fontsize=7)
    ax2.text(0.02, 0.02, f"held-out text: gen-PPL {reference['gen_ppl']:.1f}, entropy {reference['entropy']:.3f}",
             transform=ax2.transAxes, fontsize=8)
    ax2.set_xlabel("mean per-sample token entropy (nats)")
    ax2.set_ylabel("gen-PPL (KN trigram; bars: 1 standard error)")
    fig.suptitle("text-mdm: FHS vs MDLM ancestral, float64 (o) vs float32 (x)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench masked")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="only first_hitting and mdlm at these N (e.g. --lengths 1280): the rows are added to "
                             "bench/results/masked.json under `reruns`, its other rows kept")
    return parser.parse_args(argv or [])


def main(quick: bool = False, argv=None) -> dict:
    lengths = parse(argv).lengths
    torch.set_num_threads(1)
    lm = load_masked_lm(ZOO)
    evaluator = text_eval.KneserNeyTrigram(text_data.token_stream(lm.tokenizer, "train"), lm.vocab_size,
                                           exclude=lm.forbidden)
    held = text_data.heldout_chunks(lm.tokenizer, lm.length)
    reference = quality(evaluator, held)
    seeds = list(range(2 if quick else 64))
    print(f"text-mdm, {len(seeds)} samples of {lm.length} tokens per row, batches of {BATCH}, "
          f"1 CPU thread; gen-PPL under a Kneser-Ney trigram fitted on the training split")
    print(f"{'sampler':<14}{'steps':>6}  {'dtype':<8} {'cached':<7}{'s/sample':>10}{'cpu s':>10}{'NFE':>9}"
          f"{'gen-PPL':>10}{'entropy':>9}")
    rows = run_rows(lm, evaluator, seeds, quick, lengths=lengths)
    print(f"{'held-out text':<37}{'':>29}{reference['gen_ppl']:>10.2f}{reference['entropy']:>9.3f}")
    if lengths:
        return with_rerun(rows, lm.length, lengths, len(seeds), quick)
    result = {"rows": rows, "reference": reference, "claims": claims(rows, lm.length),
              "samples_per_row": len(seeds), "batch": BATCH, "threads": 1}
    for key, value in result["claims"].items():
        print(f"  {key}: {value}")
    RESULTS.mkdir(exist_ok=True)
    plot(rows, reference, RESULTS / ("masked_quick.png" if quick else "masked.png"))
    return result
