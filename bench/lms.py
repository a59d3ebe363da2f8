"""Diffusion LMs (LLaDA, MDLM DiT, DiffusionGemma): our step-machine samplers vs the official algorithms' loops.

Every row runs one sampler and the loop its authors publish, on the same random-weight module, the same
prompts and the same number of new tokens, and reports tokens per second for both (batch of BATCH
sequences: 2 in --quick, 1 in the full run; one CPU thread). The reference loops, written here from the
published algorithms:
- LLaDA `llada` (low-confidence remasking, temperature 0, blocks of 32): LLaDA's `generate` loop (a full-length
  confidence vector and a per-row top-k each step). Same tokens as ours (checked: `same` column).
- `first_hitting` on LLaDA and on the MDLM DiT: BD3-LM's first-hitting step (float64 categorical draws for
  every position of the sequence, then one uniformly chosen masked position is kept).
- `mdlm` (N = L steps, cached): MDLM's `_ddpm_caching_update` in float64 (a categorical over V + 1 for every
  position of the sequence at each step, network skipped when nothing changed).
- DiffusionGemma `block_refinement` / `discrete_ddim` / `entropy_bound`: diffusers' DiffusionGemmaPipeline with
  the matching scheduler (encoder KV cache per request; ours re-encodes the context each step so that calls of
  different requests batch). Adaptive stopping and EOS stopping off in both, so both run every step.
Models are small random-weight versions of each family's architecture (LLaDA keeps its 126,464-token
vocabulary, MDLM its 50,258, DiffusionGemma a 32,768 one), sized for 2 CPU cores; `full_size_forward`
times one forward of LLaDA-8B's published width (one layer, bfloat16) to extrapolate the 8B model.
"""

from __future__ import annotations

import time

import torch

from models.diffusion_gemma import DiffusionGemmaLM
from models.llada import LLaDAConfig, LLaDALM, LLaDAModel
from models.mdlm_dit import DiTConfig, DiTMaskedLM, MDLMDiT
from samplers import bd3lm, block_diffusion, llada  # noqa: F401  (register their samplers)
from samplers.block_diffusion import run_block_diffusion
from samplers.masked import run_masked_sampler
from samplers.noise import SampleNoise
from samplers.registry import CallCounter

BATCH = 2  # sequences per run (main sets 1 for the full run)
LLADA_MASK = 126336


def _init(model, std=0.05, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and "scale" not in name:
                p.normal_(0, std)
    return model.eval().requires_grad_(False)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# --- the official loops ---

def reference_llada(net, prompt, gen_length, steps, block_length, mask_id, on_step=None):
    """LLaDA's generate(): low-confidence remasking, temperature 0, semi-autoregressive blocks.
    (`on_step`, in every reference loop: called after each step; the full-size rows stop a loop with it.)"""
    x = torch.cat([prompt, torch.full((len(prompt), gen_length), mask_id)], 1)
    p_len = prompt.shape[1]
    blocks = gen_length // block_length
    per_block = steps // blocks
    for b in range(blocks):
        block_mask = x[:, p_len + b * block_length:p_len + (b + 1) * block_length] == mask_id
        n = block_mask.sum(1, keepdim=True)
        counts = n // per_block + (torch.arange(per_block)[None] < n % per_block).long()
        for i in range(per_block):
            mask_index = x == mask_id
            logits = net(x).float()
            logits[..., mask_id] = -torch.inf  # trained LLaDA never predicts the mask; random weights must be told
            x0 = logits.argmax(-1)
            x0_p = torch.softmax(logits.double(), -1).gather(-1, x0[..., None])[..., 0]
            x0_p[:, p_len + (b + 1) * block_length:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(len(x)):
                transfer[j, torch.topk(confidence[j], k=int(counts[j, i])).indices] = True
            x[transfer] = x0[transfer]
            if on_step is not None:
                on_step()
    return x


def reference_first_hitting(net, x, mask_id, gen, on_step=None):
    """BD3-LM's first-hitting loop: full float64 categorical over every position, keep one masked position."""
    x = x.clone()
    while (x == mask_id).any():
        logits = net(x).double()
        logits[..., mask_id] = -torch.inf
        p = logits.softmax(-1)
        e = -torch.log(torch.rand(p.shape, dtype=torch.float64, generator=gen) + 1e-10) + 1e-10
        x0 = (p / e).argmax(-1)
        for j in range(len(x)):
            masked = (x[j] == mask_id).nonzero()[:, 0]
            if len(masked):
                k = masked[torch.randint(len(masked), (1,), generator=gen)]
                x[j, k] = x0[j, k]
        if on_step is not None:
            on_step()
    return x


def reference_mdlm(net, x, mask_id, steps, gen, on_step=None):
    """MDLM's ddpm_cache loop in float64: categorical over V + 1 for every position at each of N steps."""
    x = x.clone()
    p_x0 = None
    times = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    for i in range(steps):
        t, s = float(times[i]), float(times[i + 1])
        if p_x0 is None:
            logits = net(x).double()
            logits[..., mask_id] = -torch.inf
            p_x0 = logits.softmax(-1)
        q = p_x0 * (t - s)
        q[..., mask_id] = s
        e = -torch.log(torch.rand(q.shape, dtype=torch.float64, generator=gen) + 1e-10) + 1e-10
        new = torch.where(x == mask_id, (q / e).argmax(-1), x)
        if not torch.equal(new, x):
            p_x0 = None
        x = new
        if on_step is not None:
            on_step()
    return x


def reference_diffusion_gemma(model, processor, name, prompt, gen_length, steps):
    from diffusers import BlockRefinementScheduler, DiffusionGemmaPipeline, DiscreteDDIMScheduler, EntropyBoundScheduler

    scheduler = {"block_refinement": BlockRefinementScheduler, "discrete_ddim": DiscreteDDIMScheduler,
                 "entropy_bound": EntropyBoundScheduler}[name]()
    _adapt_decoder_mask(model)
    pipe = DiffusionGemmaPipeline(model=model, scheduler=scheduler, processor=processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=[prompt] * BATCH, gen_length=gen_length, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(0), output_type="seq", confidence_threshold=None,
                eos_early_stop=False).sequences


def _adapt_decoder_mask(model):
    """diffusers 0.42.1 calls the mask builder with `past_key_values=`, renamed `cache` in transformers 5.24."""
    decoder = type(model.model.decoder)
    build = decoder.__dict__["create_diffusion_decoder_attention_mask"].__func__
    if getattr(build, "adapted", False):
        return

    def adapted(*, past_key_values=None, cache=None, **kwargs):
        return build(cache=cache if cache is not None else past_key_values, **kwargs)
    adapted.adapted = True
    decoder.create_diffusion_decoder_attention_mask = staticmethod(adapted)


# --- rows ---

def llada_rows(new_tokens: int, prompt_len: int, config: LLaDAConfig):
    net = _init(LLaDAModel(config))
    lm = LLaDALM(net)
    mask = config.mask_token_id
    prompt = torch.randint(0, mask, (BATCH, prompt_len), generator=torch.Generator().manual_seed(1))
    tokens = torch.cat([prompt, torch.full((BATCH, new_tokens), mask)], 1)
    seeds = SampleNoise(list(range(BATCH)))
    opts = {"block_length": 32, "temperature": 0.0}
    with torch.inference_mode():
        net(tokens), net(tokens)  # warm-up, untimed
        counter = CallCounter(lm)
        (ours, _), sec = _timed(lambda: run_masked_sampler("llada", counter, tokens, steps=new_tokens, noise=seeds,
                                                           options=opts))
        ref, ref_sec = _timed(lambda: reference_llada(net, prompt, new_tokens, new_tokens, 32, mask))
        yield "LLaDA", "llada", new_tokens, counter.rows / BATCH, sec, ref_sec, bool(torch.equal(ours, ref))
        yield from masked_rows("LLaDA", lm, net, tokens, new_tokens)


def masked_rows(family, lm, net, tokens, new_tokens):
    """first_hitting and mdlm rows; NFE: the mean per sequence (rows the network received / BATCH)."""
    gen = torch.Generator().manual_seed(0)
    fhs, mdlm = CallCounter(lm), CallCounter(lm)
    _, sec = _timed(lambda: run_masked_sampler("first_hitting", fhs, tokens, noise=SampleNoise(list(range(BATCH)))))
    _, ref_sec = _timed(lambda: reference_first_hitting(net, tokens, lm.mask_id, gen))
    yield family, "first_hitting", new_tokens, fhs.rows / BATCH, sec, ref_sec, None
    _, sec = _timed(lambda: run_masked_sampler("mdlm", mdlm, tokens, steps=new_tokens,
                                               noise=SampleNoise(list(range(BATCH)))))
    _, ref_sec = _timed(lambda: reference_mdlm(net, tokens, lm.mask_id, new_tokens, gen))
    yield family, "mdlm", new_tokens, mdlm.rows / BATCH, sec, ref_sec, None


def mdlm_rows(new_tokens: int, config: DiTConfig):
    net = _init(MDLMDiT(config))
    lm = DiTMaskedLM(net)
    tokens = torch.full((BATCH, new_tokens), lm.mask_id)
    with torch.inference_mode():
        net(tokens), net(tokens)  # warm-up, untimed
        yield from masked_rows("MDLM-DiT", lm, net, tokens, new_tokens)


def dg_rows(new_tokens: int, steps: int, quick: bool):
    from models.diffusion_gemma import random_diffusion_gemma, word_tokenizer

    vocab = 4096 if quick else 32768
    model = random_diffusion_gemma(vocab_size=vocab, hidden_size=64 if quick else 128, layers=2,
                                   canvas_length=16 if quick else 32)
    lm = DiffusionGemmaLM(model, word_tokenizer(vocab))
    prompt = " ".join(f"w{i}" for i in range(3, 19))
    ids = torch.tensor([lm.chat_ids([{"role": "user", "content": prompt}])] * BATCH)
    opts = {"gen_length": new_tokens, "confidence_threshold": 0.0, "eos_early_stop": False}
    for name in ("block_refinement", "discrete_ddim", "entropy_bound"):
        counter = CallCounter(lm)

        def ours(name=name, steps=steps, opts=opts, counter=counter):
            return run_block_diffusion(name, counter, ids, steps=steps, noise=SampleNoise(list(range(BATCH))),
                                       options=opts)

        def reference(name=name, steps=steps, length=new_tokens):
            return reference_diffusion_gemma(model, lm.processor, name, prompt, length, steps)

        with torch.inference_mode():
            ours(steps=1, opts={**opts, "gen_length": 1}), reference(steps=1, length=1)  # warm-up, untimed
            warm = counter.rows
            _, sec = _timed(ours)
            _, ref_sec = _timed(reference)
        yield "DiffusionGemma", name, new_tokens, (counter.rows - warm) / BATCH, sec, ref_sec, None


class _Stop(Exception):
    """Ends a loop after its measured steps."""


class _ForwardClock:
    """Seconds of every forward pass of `net` (module hooks), whichever loop calls it."""

    def __init__(self, net):
        self.seconds: list[float] = []
        self._t0 = 0.0
        net.register_forward_pre_hook(lambda *_: setattr(self, "_t0", time.perf_counter()))
        net.register_forward_hook(lambda *_: self.seconds.append(time.perf_counter() - self._t0))


def _first_steps(clock: _ForwardClock, run, steps: int) -> dict:
    """Run `run(on_step)` until `steps` steps are done: seconds in all, forward passes and their seconds."""
    done, before = [0], len(clock.seconds)

    def on_step(*_):
        done[0] += 1
        if done[0] == steps:
            raise _Stop
    t0 = time.perf_counter()
    try:
        run(on_step)
    except _Stop:
        pass
    forwards = clock.seconds[before:]
    return {"seconds": time.perf_counter() - t0, "forwards": len(forwards), "forward_seconds": sum(forwards)}


class _Uniform:
    """A toy masked network (uniform logits) for counting cached mdlm's network calls."""

    mask_id, vocab_size, forbidden = 7, 8, (7,)

    def __init__(self, length):
        self.length, self.calls = length, 0

    def logits(self, tokens, cond=None):
        return torch.zeros(*tokens.shape, self.vocab_size)

    def __call__(self, x):
        self.calls += 1
        return self.logits(x)


def mdlm_calls(prompt_len: int, new_tokens: int) -> tuple[int, int]:
    """Network calls of cached mdlm (N = new_tokens, seed 0), ours and MDLM's loop: whether a step changes the
    sequence has probability 1 - (s/t)^n whatever the network predicts, so a toy network gives the count."""
    toy = _Uniform(prompt_len + new_tokens)
    tokens = torch.cat([torch.zeros(1, prompt_len, dtype=torch.long), torch.full((1, new_tokens), toy.mask_id)], 1)
    counter = CallCounter(toy)
    run_masked_sampler("mdlm", counter, tokens, steps=new_tokens, noise=SampleNoise([0]))
    reference_mdlm(toy, tokens, toy.mask_id, new_tokens, torch.Generator().manual_seed(0))
    return counter.calls, toy.calls


def full_size_model(layers: int) -> LLaDAModel:
    """LLaDA-8B's published configuration with `layers` blocks, random weights, built directly in bfloat16."""
    from models.llada import LLADA_8B

    with torch.device("meta"):
        net = LLaDAModel(LLaDAConfig(**{**LLADA_8B.__dict__, "n_layers": layers}))
    net = net.to(torch.bfloat16).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0) if p.ndim == 1 else p.normal_(0, 0.02, generator=gen)  # RMSNorm weights: 1
    return net.eval().requires_grad_(False)


def layers_that_fit(margin_gb: float = 4.5) -> int:
    """LLaDA-8B's 32 blocks, or as many as the free memory holds (bfloat16 + margin_gb for the rest)."""
    free = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemAvailable")) / 2**20
    embedding_and_head, block = 2 * 126464 * 4096 * 2 / 2**30, (4 * 4096**2 + 3 * 4096 * 12288) * 2 / 2**30
    return max(1, min(32, int((free - margin_gb - embedding_and_head) / block)))


def full_size_rows(measured_steps: int = 3, prompt_len: int = 32, new_tokens: int = 256) -> list[dict]:
    """tokens/s for 256 new tokens per sampler at LLaDA-8B's size, ours vs the published loop, from the first
    `measured_steps` steps of each (2 CPU threads). A step's cost is the forward pass (the same module and input
    for both loops: their pooled median is used) plus the loop's own work (its measured time minus its forward
    passes); the full answer takes NFE forwards and 256 steps of own work."""
    layers = layers_that_fit()
    net = full_size_model(layers)
    lm, clock, mask = LLaDALM(net), _ForwardClock(net), LLADA_MASK
    params = sum(p.numel() for p in net.parameters())
    prompt = torch.randint(0, mask, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    tokens = torch.cat([prompt, torch.full((1, new_tokens), mask)], 1)
    ours_mdlm, ref_mdlm = mdlm_calls(prompt_len, new_tokens)
    opts = {"block_length": 32, "temperature": 0.0}
    loops = {  # sampler: (NFE ours, NFE reference, ours(on_step), reference(on_step))
        "llada": (new_tokens, new_tokens,
                  lambda h: run_masked_sampler("llada", lm, tokens, steps=new_tokens, noise=SampleNoise([0]), hook=h,
                                               options=opts),
                  lambda h: reference_llada(net, prompt, new_tokens, new_tokens, 32, mask, h)),
        "first_hitting": (new_tokens, new_tokens,
                          lambda h: run_masked_sampler("first_hitting", lm, tokens, noise=SampleNoise([0]), hook=h),
                          lambda h: reference_first_hitting(net, tokens, mask, torch.Generator().manual_seed(0), h)),
        "mdlm": (ours_mdlm, ref_mdlm,
                 lambda h: run_masked_sampler("mdlm", lm, tokens, steps=new_tokens, noise=SampleNoise([0]), hook=h),
                 lambda h: reference_mdlm(net, tokens, mask, new_tokens, torch.Generator().manual_seed(0), h)),
    }
    with torch.inference_mode():
        net(tokens)  # warm-up, untimed
        clock.seconds.clear()
        measured = {name: (_first_steps(clock, ours, measured_steps), _first_steps(clock, ref, measured_steps))
                    for name, (_, _, ours, ref) in loops.items()}
    forward = float(torch.tensor(clock.seconds).median())
    family = "LLaDA-8B" if layers == 32 else f"LLaDA-8B config, {layers} of 32 layers"
    rows = []
    for name, (nfe, ref_nfe, _, _) in loops.items():
        own = [(m["seconds"] - m["forward_seconds"]) / measured_steps for m in measured[name]]
        total = [n * forward + new_tokens * o for n, o in zip((nfe, ref_nfe), own, strict=True)]
        rows.append({"family": family, "sampler": name, "new_tokens": new_tokens, "nfe": nfe,
                     "tokens_per_s": round(new_tokens / total[0], 5),
                     "reference_tokens_per_s": round(new_tokens / total[1], 5),
                     "reference_nfe": ref_nfe, "extrapolated": True, "measured_steps": measured_steps,
                     "layers": layers, "parameters": params, "dtype": "bfloat16", "threads": torch.get_num_threads(),
                     "seconds_per_forward_median": round(forward, 3), "forwards_timed": len(clock.seconds),
                     "own_seconds_per_step": round(own[0], 4), "reference_own_seconds_per_step": round(own[1], 4),
                     "measured": [{k: round(v, 3) for k, v in m.items()} for m in measured[name]]})
    return rows


def run_full_size(measured_steps: int) -> dict:
    """The full-size rows, merged into bench/results/lms.json (rows of other families kept)."""
    import json
    from pathlib import Path

    torch.set_num_threads(2)
    rows = full_size_rows(measured_steps)
    for r in rows:
        print(f"{r['family']:<16}{r['sampler']:<18}{r['new_tokens']:>5}{r['nfe']:>7}{r['tokens_per_s']:>12.4f}"
              f"{r['reference_tokens_per_s']:>11.4f}{r['tokens_per_s'] / r['reference_tokens_per_s']:>7.2f}  "
              f"forward {r['seconds_per_forward_median']} s, own work {r['own_seconds_per_step']} s / "
              f"{r['reference_own_seconds_per_step']} s per step", flush=True)
    path = Path(__file__).resolve().parent / "results" / "lms.json"
    result = json.loads(path.read_text()) if path.exists() else {"rows": []}
    result["rows"] = [r for r in result["rows"] if not r["family"].startswith("LLaDA-8B")] + rows
    return result


def main(quick: bool = False, argv=None) -> dict:
    global BATCH
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench lms")
    parser.add_argument("--full-size", action="store_true",
                        help="only the LLaDA-8B rows (about 17 GB: run under flock /tmp/bigmem.lock); merged into "
                             "bench/results/lms.json")
    parser.add_argument("--measured-steps", type=int, default=3, help="steps timed per loop in --full-size")
    args = parser.parse_args(argv or [])
    if args.full_size:
        return run_full_size(args.measured_steps)
    torch.set_num_threads(1)
    BATCH = 2 if quick else 1  # the full run is long on 2 shared cores; one sequence per row
    if quick:  # smoke run: small vocabularies, 32 new tokens
        new_tokens, prompt_len = 32, 8
        llada_config = LLaDAConfig(d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=192, vocab_size=4096,
                                   embedding_size=4096, max_sequence_length=4096, mask_token_id=4095)
        dit_config = DiTConfig(vocab_size=4096, model_length=new_tokens, hidden_dim=64, cond_dim=32, n_blocks=2,
                               n_heads=4)
    else:
        new_tokens, prompt_len = 256, 32
        llada_config = LLaDAConfig(d_model=128, n_layers=2, n_heads=4, mlp_hidden_size=384, vocab_size=126464,
                                   embedding_size=126464, max_sequence_length=4096, mask_token_id=LLADA_MASK)
        dit_config = DiTConfig(model_length=new_tokens, hidden_dim=128, cond_dim=64, n_blocks=2, n_heads=4)
    rows, table = [], []
    header = f"{'family':<16}{'sampler':<18}{'new':>5}{'NFE':>7}{'tok/s ours':>12}{'tok/s ref':>11}{'x':>7}  same"
    print(f"batch {BATCH}, 1 CPU thread, random weights; reference = the published algorithm's loop")
    print(header)
    sources = [llada_rows(new_tokens, prompt_len, llada_config), mdlm_rows(new_tokens, dit_config),
               dg_rows(32 if quick else 128, 8 if quick else 32, quick)]
    for source in sources:
        for family, sampler, n, nfe, sec, ref_sec, same in source:
            row = {"family": family, "sampler": sampler, "new_tokens": n, "nfe": round(float(nfe), 2),
                   "tokens_per_s": round(n * BATCH / sec, 2), "reference_tokens_per_s": round(n * BATCH / ref_sec, 2)}
            rows.append(row)
            line = (f"{family:<16}{sampler:<18}{n:>5}{row['nfe']:>7.0f}{row['tokens_per_s']:>12.2f}"
                    f"{row['reference_tokens_per_s']:>11.2f}{ref_sec / sec:>7.2f}  {'' if same is None else same}")
            table.append(line)
            print(line, flush=True)
    return {"rows": rows}
