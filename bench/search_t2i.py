"""`bench search` rows for digits-t2i: prompted search and Feynman-Kac products of prompts, as the server runs them.

Every row goes through the server's own plan (server.generation.generate), so it measures the searches,
verifiers and VAE decoding a client gets.  Prompts: one per digit, each with a thickness and a lean in the
trained phrasings ("a thin one, slanted left", "the digit 2, bold, slanted right", ...): two attributes at
once are rare under plain sampling, so the search does the work.
  * setting "prompt": guidance 1 (the model's conditional alone), T = 10 steps; "plain" is dpmpp_2m, one
    sample per seed (T NFE), "plain_cfg4" the same at the served default guidance 4; best_of_n, evosearch,
    rbf and fk_steering steered by the digit-prompt verifier (classifier A + soft attribute indicators)
    at budgets T x {1, 4, 8, 16, 32}.
  * setting "product": "a seven" x "bold 7" (the trained phrasing; "bold" alone is no caption) as a
    Feynman-Kac product (fkc target product, 20 steps, K = 8 particles, beta 1 and the annealed beta 2, with
    and without the weights), against plain CFG on the joint prompt "a bold seven" at guidance 1 and 4.
Measured per row: satisfied (fraction of samples whose held-out classifier B names the prompt's digit and
whose measured attributes lie beyond the prompt's thresholds), acc_b (classifier B names the digit),
reward_a / reward_b (mean digit-prompt reward under A, the guide, and held-out B), fd (digits-FD of the
pooled images against held-out digits), diversity (mean pairwise L2 between one prompt's samples), nfe,
seconds per search.
"""

from __future__ import annotations

import time

import torch

PROMPTS = ("a thin zero, slanted left", "the digit 1, bold, slanted right", "thin 2, slanted right",
           "a bold three, slanted left", "the digit 4, thin, slanted right", "bold 5, slanted left",
           "a thin six, slanted right", "the digit 7, bold, slanted left", "thin 8, slanted left",
           "a bold nine, slanted right")
STEPS = 10
MULTIPLES = (1, 4, 8, 16, 32)  # as the class-conditional rows
METHODS = (("best_of_n", "best_of_n", {}), ("evosearch", "evosearch", {}),
           ("rbf", "rollover_budget_forcing", {}), ("fk_steering", "fk_steering", {}))
PRODUCT = ("a seven", "bold 7", "a bold seven")
PRODUCT_STEPS, PRODUCT_PARTICLES = 20, 8


def _setup():
    from models.config import load_config
    from models.loading import load_model
    from server.app import load_resources
    from server.plan import train_info_thresholds

    loaded = load_model(load_config()["digits-t2i"])
    return loaded, load_resources("zoo/models.toml"), train_info_thresholds(str(loaded.entry.directory))


def _metrics(images: torch.Tensor, prompts: list[str], resources, thresholds) -> dict:
    from search.digit_prompt import DigitPromptReward, parse_digit_prompt, prompt_satisfied, to_classifier_input
    from training.digits_fd import frechet_distance

    satisfied, acc, ra, rb, div = [], [], [], [], []
    for p in dict.fromkeys(prompts):
        rows = images[[i for i, q in enumerate(prompts) if q == p]]
        satisfied.append(prompt_satisfied(rows, p, resources["classifier-b"], thresholds).float())
        x8 = to_classifier_input(rows)
        with torch.no_grad():
            acc.append((resources["classifier-b"](x8).argmax(-1) == parse_digit_prompt(p).digit).float())
        ra.append(DigitPromptReward.build(resources["classifier-a"], p, thresholds)(rows))
        rb.append(DigitPromptReward.build(resources["classifier-b"], p, thresholds)(rows))
        flat = rows.flatten(1).double()
        if len(flat) > 1:
            div.append(float(torch.cdist(flat, flat).sum() / (len(flat) * (len(flat) - 1))))
    x8 = to_classifier_input(images)
    return {"satisfied": float(torch.cat(satisfied).mean()), "acc_b": float(torch.cat(acc).mean()),
            "reward_a": float(torch.cat(ra).mean()), "reward_b": float(torch.cat(rb).mean()),
            "fd": frechet_distance(x8, backend="scipy")["fd"], "diversity": sum(div) / max(len(div), 1)}


def _run(loaded, resources, prompts, seeds_per_prompt, **request):
    """One request per prompt (its seeds batched); the images in prompt order, NFE per sample, seconds."""
    from server.generation import generate
    from server.requests import GenerateRequest

    images, nfe, t0 = [], 0, time.perf_counter()
    for i, prompt in enumerate(prompts):
        out = generate(loaded, GenerateRequest(**request, n=seeds_per_prompt, seed=1000 * i, prompt=prompt),
                       resources=resources)
        images.append(out.samples)
        nfe = out.nfe
    per = (time.perf_counter() - t0) / (len(prompts) * seeds_per_prompt)
    return torch.cat(images), nfe, per


def rows(quick: bool = False, add=print) -> list[dict]:
    """The digits-t2i rows (each passed to `add` as it is measured)."""
    from server.requests import SearchRequest

    loaded, resources, thresholds = _setup()
    prompts = PROMPTS[:4] if quick else PROMPTS
    per_prompt = 2  # 20 searches per row, as the class-conditional rows (10 classes x 2 seeds)
    multiples = (1, 4) if quick else MULTIPLES
    labels = [p for p in prompts for _ in range(per_prompt)]
    out = []

    def row(method, setting, budget, images, nfe, seconds, row_prompts, **extra):
        r = {"method": method, "setting": setting, "model": "digits-t2i", "budget_nfe": budget, "nfe": nfe,
             **_metrics(images, row_prompts, resources, thresholds), "seconds": seconds, **extra}
        out.append(r)
        add(r)

    for name, guidance in (("plain", 1.0), ("plain_cfg4", 4.0)):
        images, nfe, sec = _run(loaded, resources, prompts, per_prompt, sampler="dpmpp_2m", steps=STEPS,
                                guidance=guidance)
        row(name, "prompt", nfe, images, nfe, sec, labels, guidance=guidance)
    for name, method, options in METHODS:
        for m in multiples:
            budget = m * STEPS
            opts = dict(options)
            if method == "rollover_budget_forcing" and budget < 2 * STEPS + 3:
                opts.update(particles=1, init_fraction=0.0, finish_steps=0)  # one chain, no finish
            images, nfe, sec = _run(loaded, resources, prompts, per_prompt, sampler="", steps=STEPS, guidance=1.0,
                                    search=SearchRequest(method, budget, "digit-prompt", opts, {}))
            row(name, "prompt", budget, images, nfe, sec, labels, guidance=1.0)
    first, second, joint = PRODUCT
    n_product = 8 if quick else 16
    joint_labels = [joint] * n_product
    for guidance in (1.0, 4.0):
        images, nfe, sec = _run(loaded, resources, [joint], n_product, sampler="dpmpp_2m", steps=PRODUCT_STEPS,
                                guidance=guidance)
        row(f"cfg_joint_{guidance:g}", "product", nfe, images, nfe, sec, joint_labels, guidance=guidance)
    budget = 2 * PRODUCT_STEPS * PRODUCT_PARTICLES
    for beta in (1.0, 2.0):
        for reweight in (True, False):
            options = {"target": "product", "beta": beta, "second_prompt": second, "reweight": reweight}
            images, nfe, sec = _run(loaded, resources, [first], n_product, sampler="", steps=PRODUCT_STEPS,
                                    guidance=1.0, search=SearchRequest("fkc", budget, "digit-prompt", options, {}))
            name = f"fkc_product_b{beta:g}" + ("" if reweight else "_unweighted")
            row(name, "product", budget, images, nfe, sec, joint_labels, beta=beta)
    return out
