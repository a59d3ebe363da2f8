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

def reference_llada(net, prompt, gen_length, steps, block_length, mask_id):
    """LLaDA's generate(): low-confidence remasking, temperature 0, semi-autoregressive blocks."""
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
    return x


def reference_first_hitting(net, x, mask_id, gen):
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
    return x


def reference_mdlm(net, x, mask_id, steps, gen):
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
        (ours, nfe), sec = _timed(lambda: run_masked_sampler("llada", lm, tokens, steps=new_tokens, noise=seeds,
                                                             options=opts))
        ref, ref_sec = _timed(lambda: reference_llada(net, prompt, new_tokens, new_tokens, 32, mask))
        yield "LLaDA", "llada", new_tokens, nfe, sec, ref_sec, bool(torch.equal(ours, ref))
        yield from masked_rows("LLaDA", lm, net, tokens, new_tokens)


def masked_rows(family, lm, net, tokens, new_tokens):
    gen = torch.Generator().manual_seed(0)
    (out, nfe), sec = _timed(lambda: run_masked_sampler("first_hitting", lm, tokens,
                                                        noise=SampleNoise(list(range(BATCH)))))
    _, ref_sec = _timed(lambda: reference_first_hitting(net, tokens, lm.mask_id, gen))
    yield family, "first_hitting", new_tokens, nfe, sec, ref_sec, None
    (out, nfe), sec = _timed(lambda: run_masked_sampler("mdlm", lm, tokens, steps=new_tokens,
                                                        noise=SampleNoise(list(range(BATCH)))))
    _, ref_sec = _timed(lambda: reference_mdlm(net, tokens, lm.mask_id, new_tokens, gen))
    yield family, "mdlm", new_tokens, nfe, sec, ref_sec, None


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
        def ours(name=name, steps=steps, opts=opts):
            return run_block_diffusion(name, lm, ids, steps=steps, noise=SampleNoise(list(range(BATCH))),
                                       options=opts)

        def reference(name=name, steps=steps, length=new_tokens):
            return reference_diffusion_gemma(model, lm.processor, name, prompt, length, steps)

        with torch.inference_mode():
            ours(steps=1, opts={**opts, "gen_length": 1}), reference(steps=1, length=1)  # warm-up, untimed
            (_, nfe), sec = _timed(ours)
            _, ref_sec = _timed(reference)
        yield "DiffusionGemma", name, new_tokens, nfe, sec, ref_sec, None


def full_size_forward(prompt_len: int = 32, new_tokens: int = 256) -> dict:
    """One forward of LLaDA-8B's width (d_model 4096, MLP 12288, vocab 126,464) with one layer, bfloat16."""
    from models.llada import LLADA_8B

    config = LLaDAConfig(**{**LLADA_8B.__dict__, "n_layers": 1})
    net = LLaDAModel(config).to(torch.bfloat16).eval().requires_grad_(False)
    ids = torch.randint(0, 126000, (1, prompt_len + new_tokens))
    with torch.inference_mode():
        net(ids[:, :8])
        _, one_layer = _timed(lambda: net(ids))
        net.blocks = net.blocks[:0]
        _, no_layer = _timed(lambda: net(ids))
    per_layer = one_layer - no_layer
    forward_8b = no_layer + LLADA_8B.n_layers * per_layer
    return {"sequence": prompt_len + new_tokens, "seconds_embedding_and_head": round(no_layer, 3),
            "seconds_per_layer": round(per_layer, 3), "seconds_per_forward_8b_extrapolated": round(forward_8b, 2),
            "tokens_per_s_8b_extrapolated_llada_steps_equal_tokens": round(new_tokens / (new_tokens * forward_8b), 4)}


def main(quick: bool = False) -> dict:
    global BATCH
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
            row = {"family": family, "sampler": sampler, "new_tokens": n, "nfe": round(float(nfe.double().mean()), 2),
                   "tokens_per_s": round(n * BATCH / sec, 2), "reference_tokens_per_s": round(n * BATCH / ref_sec, 2)}
            rows.append(row)
            line = (f"{family:<16}{sampler:<18}{n:>5}{row['nfe']:>7.0f}{row['tokens_per_s']:>12.2f}"
                    f"{row['reference_tokens_per_s']:>11.2f}{ref_sec / sec:>7.2f}  {'' if same is None else same}")
            table.append(line)
            print(line, flush=True)
    if not quick:
        print("full size (LLaDA-8B width, 1 layer, bfloat16, extrapolated to 32 layers):", full_size_forward())
    return {"rows": rows}
