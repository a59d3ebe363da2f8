"""Train text-mdm: a small ModernBERT masked LM trained as a masked diffusion model with the MDLM loss.

MDLM (Sahoo et al. 2024, eq. 10/11) with the log-linear schedule alpha_t = 1 - t: for each sequence draw
t ~ U(eps, 1) (stratified over the batch), mask every token independently with probability t, and
minimise the continuous-time NELBO  E_t [ (1/t) * sum over masked positions of -log p_theta(x^l | x_t) ],
divided by the length (nats per token). SUBS parameterisation: the mask token and the other special
tokens get logit -inf, so p_theta only ever puts mass on real tokens. The network never sees t (a
time-agnostic masked model, which is all an MDM needs: Zheng et al. 2024, arXiv 2409.02908).

    python -m training.text_mdm            # full run on one CPU thread, into zoo/text-mdm
    python -m training.text_mdm --quick    # a few steps into a temporary directory (CI)

Same seed, same torch build, one thread -> the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from training import text_data

ZOO_DIR = Path(__file__).resolve().parents[1] / "zoo" / "text-mdm"
SEED = 0
T_EPS = 1e-3  # smallest masking ratio: the 1/t weight is unbounded at 0 (MDLM samples t from [eps, 1])

FULL = dict(steps=3000, batch=16, lr=1e-3, warmup=50, eval_every=200)
QUICK = dict(steps=12, batch=8, lr=1e-3, warmup=2, eval_every=6)
# ModernBERT (rotary positions, pre-norm, no biases): layer 0 attends globally, layers 1-2 within a window
# of 16 tokens. A BERT of this size with learned absolute positions collapsed to an input-independent
# unigram predictor within a few hundred steps (every logit the same whatever the input) and stayed there
# for the 1200 steps we could afford; rotary positions and local windows make neighbouring tokens usable
# from the first steps.
ARCH = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256,
            global_attn_every_n_layers=3, local_attention=16, embedding_dropout=0.0, attention_dropout=0.0,
            mlp_dropout=0.0, reference_compile=False)


def build_model(tokenizer):
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    config = ModernBertConfig(vocab_size=len(tokenizer), max_position_embeddings=text_data.SEQ_LEN,
                              pad_token_id=tokenizer.pad_token_id, mask_token_id=tokenizer.mask_token_id,
                              bos_token_id=None, eos_token_id=None, cls_token_id=None, sep_token_id=None,
                              **ARCH)
    return ModernBertForMaskedLM(config)


def forbidden_mask(tokenizer, vocab_size: int) -> torch.Tensor:
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[list(tokenizer.all_special_ids)] = True
    return mask


def mdlm_loss(model, x: torch.Tensor, forbidden: torch.Tensor, mask_id: int, t: torch.Tensor,
              generator: torch.Generator) -> torch.Tensor:
    """MDLM NELBO in nats per token for clean tokens x (B, L) at masking ratios t (B,)."""
    masked = torch.rand(x.shape, generator=generator) < t[:, None]
    logits = model(input_ids=torch.where(masked, mask_id, x)).logits.masked_fill(forbidden, -math.inf)
    nll = F.cross_entropy(logits.transpose(1, 2), x, reduction="none")
    return (nll * masked / t[:, None]).sum() / x.numel()


def stratified_times(batch: int, generator: torch.Generator) -> torch.Tensor:
    """t in [eps, 1], one per sequence, stratified over the batch (MDLM's low-discrepancy sampler)."""
    u = (torch.arange(batch) + torch.rand((), generator=generator)) / batch
    return T_EPS + (1 - T_EPS) * u


@torch.no_grad()
def heldout_nelbo(model, chunks, forbidden, mask_id, repeats: int = 8) -> float:
    """Held-out NELBO (nats/token), averaged over `repeats` stratified masking ratios per chunk."""
    model.eval()
    g = torch.Generator().manual_seed(1234)
    total = 0.0
    for r in range(repeats):
        t = T_EPS + (1 - T_EPS) * ((torch.arange(len(chunks)) * 0.618034 + (r + 0.5) / repeats) % 1.0)
        total += float(mdlm_loss(model, chunks, forbidden, mask_id, t, g))
    return total / repeats


def train(cfg: dict, out: Path, log=print) -> dict:
    torch.manual_seed(SEED)
    start = time.time()
    tokenizer = text_data.train_tokenizer()
    stream = text_data.token_stream(tokenizer, "train")
    chunks = text_data.heldout_chunks(tokenizer)
    model = build_model(tokenizer)
    forbidden = forbidden_mask(tokenizer, model.config.vocab_size)
    mask_id = tokenizer.mask_token_id
    log(f"train tokens {len(stream)}, held-out chunks {tuple(chunks.shape)}, "
        f"params {sum(p.numel() for p in model.parameters())}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01, betas=(0.9, 0.98))
    # Linear warmup, then constant: a run stopped after k steps equals a run with steps=k (checkpoints).
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg["warmup"]))
    g = torch.Generator().manual_seed(SEED)
    history, running = [], 0.0
    model.train()
    for step in range(1, cfg["steps"] + 1):
        x = text_data.random_windows(stream, cfg["batch"], text_data.SEQ_LEN, g)
        loss = mdlm_loss(model, x, forbidden, mask_id, stratified_times(cfg["batch"], g), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            held = heldout_nelbo(model, chunks, forbidden, mask_id)
            n = step % cfg["eval_every"] or cfg["eval_every"]
            history.append(dict(step=step, train_nelbo=running / n, heldout_nelbo=held,
                                seconds=round(time.time() - start, 1)))
            log(f"step {step:5d}  train {running / n:.3f}  held-out {held:.3f} nats/token  "
                f"{time.time() - start:.0f} s")
            running = 0.0
            metrics = save(model, tokenizer, out, cfg, step, history, start, len(stream), chunks.numel())
            model.train()
    return metrics


def save(model, tokenizer, out: Path, cfg: dict, step: int, history: list, start: float, train_tokens: int,
         heldout_tokens: int) -> dict:
    """Write the checkpoint (safetensors), the tokenizer and training.json; returns the metrics."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    metrics = dict(steps=step, batch=cfg["batch"], lr=cfg["lr"], warmup=cfg["warmup"], seed=SEED,
                   params=sum(p.numel() for p in model.parameters()), arch=ARCH,
                   train_tokens=train_tokens, heldout_tokens=heldout_tokens,
                   heldout_nelbo=history[-1]["heldout_nelbo"],
                   heldout_ppl_bound=math.exp(history[-1]["heldout_nelbo"]),
                   seconds=round(time.time() - start, 1), history=history,
                   corpus_sha256=text_data.corpus_sha256(), python=platform.python_version(),
                   torch=torch.__version__, heldout_topics=list(text_data.split_topics()[1]))
    (out / "training.json").write_text(json.dumps(metrics, indent=1) + "\n")
    model_card(out, metrics)
    return metrics


CARD = """# text-mdm

A small masked diffusion model of English technical text: a {layers}-layer ModernBERT masked LM ({params:,}
parameters, hidden {hidden}, {heads} heads, rotary positions, layer 0 global attention and the others a
{window}-token window, sequence length 128, BPE vocabulary of {vocab} tokens) trained with the MDLM loss.
Time-agnostic (the network never sees t), so it serves the masked samplers `first_hitting` and `mdlm`.
Loaded by `models.masked_lm.load_masked_lm` (transformers `ModernBertForMaskedLM` +
`PreTrainedTokenizerFast`).

## Data

The documentation topics that ship with CPython (`pydoc_data.topics.topics`, the text of `help("assert")`
and friends; Python {python}, corpus sha256 `{sha}`). Split by topic (training/text_data.py): {n_held} topics
held out ({heldout_tokens:,} tokens in {chunks} chunks of 128), the other {n_train} for training
({train_tokens:,} tokens). The byte-level BPE tokenizer (`tokenizers`) is trained on the training text only.
Special tokens `<pad>`, `<unk>`, `<mask>` (ids 0-2) never occur in the text and are never sampled.

## Recipe

`python -m training.text_mdm` (`--quick` for a few steps into a temporary directory). MDLM loss with
the log-linear schedule: per sequence t ~ U(0.001, 1) stratified over the batch, each token masked with
probability t, loss = (1/t) * cross-entropy summed over the masked tokens / 128 (nats per token; the mask
and special tokens get logit -inf). AdamW (lr {lr}, betas 0.9/0.98, weight decay 0.01, {warmup} warmup
steps, then constant), gradient clipping 1.0, batch {batch} random 128-token windows of the training
stream, {steps} steps (`--steps {steps}` reproduces this checkpoint), seed {seed}, one CPU thread:
{minutes:.0f} minutes wall on a shared, busy 2-core machine.

## Numbers (measured)

| step | train NELBO | held-out NELBO (nats/token) |
|---|---|---|
{history}

Held-out NELBO {nelbo:.3f} nats/token, so held-out perplexity <= {ppl:.1f}. For scale: the unigram
entropy of the training tokens is 6.38 nats. Sample quality (gen-PPL under a Kneser-Ney trigram, entropy,
FHS vs MDLM, float32 vs float64) is in docs/masked.md (`python -m bench masked`).

## Limits

Trained for minutes on 100k tokens: samples are locally plausible fragments of Python-documentation text,
not coherent prose. For demonstrating and testing the masked samplers, not for any real use.
"""


def model_card(out: Path, m: dict) -> None:
    history = "\n".join(f"| {h['step']} | {h['train_nelbo']:.3f} | {h['heldout_nelbo']:.3f} |"
                        for h in m["history"])
    train_topics, held_topics = text_data.split_topics()
    (out / "README.md").write_text(CARD.format(
        params=m["params"], hidden=ARCH["hidden_size"], heads=ARCH["num_attention_heads"],
        layers=ARCH["num_hidden_layers"], window=ARCH["local_attention"],
        vocab=text_data.VOCAB_SIZE, python=m["python"], sha=m["corpus_sha256"][:16], n_held=len(held_topics),
        n_train=len(train_topics), heldout_tokens=m["heldout_tokens"], chunks=m["heldout_tokens"] // 128,
        train_tokens=m["train_tokens"], lr=m["lr"], warmup=m["warmup"], batch=m["batch"], steps=m["steps"],
        seed=m["seed"], minutes=m["seconds"] / 60, history=history, nelbo=m["heldout_nelbo"],
        ppl=m["heldout_ppl_bound"]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few steps into a temporary directory")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: zoo/text-mdm)")
    p.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # leave the other core to the rest of the machine; also makes runs repeatable
    cfg = dict(QUICK if args.quick else FULL)
    if args.steps:
        cfg["steps"] = args.steps
    out = args.out or (Path(tempfile.mkdtemp(prefix="text-mdm-")) if args.quick else ZOO_DIR)
    metrics = train(cfg, out, log=lambda s: print(s, flush=True))
    print(f"saved to {out}; held-out NELBO {metrics['heldout_nelbo']:.3f} nats/token "
          f"(PPL <= {metrics['heldout_ppl_bound']:.1f}) after {metrics['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
