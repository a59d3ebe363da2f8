"""The model card of digits-t2i (zoo/digits-t2i/README.md), written from train_info.json and metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

CARD = """# digits-t2i

A latent text-to-image model of our own, in the **Stable Diffusion pipeline layout**, trained here on
scikit-learn's 8x8 digits: prompts like "a bold seven", "the digit 3, slanted left", "7" or "" (unconditional).
It loads unchanged in diffusers:

```python
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("zoo/digits-t2i", local_files_only=True)
img = pipe("a bold seven", num_inference_steps=20, guidance_scale=4.0, output_type="pt").images  # (1, 1, 16, 16)
```

![samples](samples.png)

*Rows 0-9; columns "a seven" x2, "a bold seven" x2, "a thin seven" x2, "a seven, slanted left", "a seven,
slanted right"; 20 DPM-Solver++ steps, guidance 4, seeds {seed0}+k (`samples.png`, 16x16 shown 4x).*

## What it is

| component | class | size |
|---|---|---|
{components}

{size_mb:.1f} MB of safetensors in all.

- **Data**: the 1438 digits of the training split (split seed {split_seed}; the 359 held-out digits are never
  trained on), upsampled to 16x16 by pixel repetition, so 2x2 averaging returns the original 8x8 digit exactly
  (that is how generated images reach the classifiers). Attributes are measured on each digit, with per-class
  thresholds from the training split: ink mass (mean ink) below the class's 1/3 quantile -> "thin", above 2/3
  -> "bold"; slant (the ink's shear, sum p dx dy / sum p dy^2 about its centroid) below the class's 1/4
  quantile -> "slanted left", above 3/4 -> "slanted right". Each image has every caption that is true of it
  ({cpi:.1f} on average: four phrasings, each with and without each of its attributes, e.g.
  {example}); one is drawn per image per step, and 10% of the captions are empty for classifier-free guidance.
- **Recipe**: `python -m training.digits_t2i` (seeded; `--quick` is the CI smoke run, tests/test_digits_t2i.py).
  VAE: MSE + {kl} x KL, {vae_steps} steps of batch {vae_batch} ({vae_seconds:.0f} s), held-out reconstruction
  MSE {vae_mse:.4f}. Then the UNet and the text encoder jointly through the eps loss on the DDPM process (no
  contrastive pre-training): AdamW lr {lr}, warm-up + cosine, batch {unet_batch}, grad clip 1, EMA
  {ema}, **{unet_steps} steps, {unet_seconds:.0f} s** ({env}). The EMA weights are saved.

## Measured quality

Everything below runs diffusers' `StableDiffusionPipeline` on these weights (`training/digits_t2i/evaluate.py`,
numbers in `metrics.json`): DPM-Solver++ 2M, per-sample generators seeded {seed0}+k; the 16x16 samples are averaged
2x2 to the classifiers' 8x8 input. **class acc**: held-out classifier B (`zoo/digit-classifier-b`) agrees with the
prompt's digit. **attr acc**: the sample's measured attribute lies on the prompt's side of the median of
real digits of its class ("bold": more ink than the median training digit of that class; a random real digit
scores 0.5); **strict**: it lies in the named tercile / quartile, the thresholds that wrote the captions
(random real digit: 1/3 for bold / thin, 1/4 for left / right). **digits-FD** between classifier-B features of
the samples and of the 359 held-out digits. Main set: {n_main} samples = 10 digits x 5 prompts ("a seven", "a bold
seven", "a thin seven", "a seven, slanted left", "a seven, slanted right") x {n_per} seeds.
Floor: digits-FD of {n_main} class-balanced real training digits {floor:.3f} (mean of 3 draws); the VAE's round
trip of the 1438 training digits: digits-FD {vae_fd:.3f} (the digits themselves: {real_fd:.3f}), class acc
{vae_acc:.3f}.

**The issue's target**: "a bold seven", 20 steps, guidance {gw}, 100 seeds: classifier B says 7 for
**{goal_acc:.0%}**; {goal_bold:.0%} have more ink than the median real 7 ({goal_strict:.0%} in the top third; mean
ink quantile among real 7s {goal_q:.2f}).

**Guidance sweep** (20 steps, main set):

{guidance_table}

**Steps** (guidance {gw}, main set):

{steps_table}

**Negative prompt** ("a zero" ... "a nine", {n_neg} seeds each, 20 steps, guidance {gw}): ink quantile = where a
sample's ink mass falls among the real training digits of its class (real digits: 0.50).

{neg_table}

**Other phrasings** (guidance {gw}, 10 seeds per digit): class acc {phrasings}.
"""


def _table(rows: dict, key_name: str) -> str:
    lines = [
        f"| {key_name} | class acc | acc: a seven / bold / thin / left / right | attr acc (strict) | "
        "bold / thin / left / right attr acc | digits-FD |",
        "|---|---|---|---|---|---|",
    ]
    for k, r in rows.items():
        per = " / ".join(f"{r[f'class_acc_{f}']:.2f}" for f in ("plain", "bold", "thin", "left", "right"))
        a = r["attributes"]
        attrs = " / ".join(f"{a[f]['acc']:.2f}" for f in ("bold", "thin", "left", "right"))
        lines.append(
            f"| {k} | {r['class_acc']:.3f} | {per} | {r['attr_acc']:.3f} ({r['attr_strict']:.3f}) | {attrs} | "
            f"{r['fd']:.3f} |"
        )
    return "\n".join(lines)


def _neg_table(neg: dict) -> str:
    lines = [
        "| negative prompt | class acc | ink quantile | mean ink | bold (top third) | thin (bottom third) |",
        "|---|---|---|---|---|---|",
    ]
    for k, r in neg.items():
        name = "(none)" if k == "none" else f'"{k}"'
        lines.append(
            f"| {name} | {r['class_acc']:.3f} | {r['ink_quantile']:.3f} | {r['ink_mass']:.3f} | "
            f"{r['frac_bold']:.2f} | {r['frac_thin']:.2f} |"
        )
    return "\n".join(lines)


COMPONENTS = [
    (
        "`tokenizer/`",
        "`CLIPTokenizer` generated from the caption vocabulary: the 256 byte symbols plus one merge chain per "
        'caption word ({n_words} words, so "seven" is one token), `model_max_length` 16',
        "{vocab} tokens",
    ),
    (
        "`text_encoder/`",
        "`CLIPTextModel`, hidden 64, 2 layers, 4 heads; the pipeline feeds its last hidden state to the UNet",
        "{p_te:,} params",
    ),
    (
        "`vae/`",
        "`AutoencoderKL` 16x16x1 -> 8x8x4 (blocks (32, 64), one downsampling), `scaling_factor` {scale:.4f} "
        "(1 / std of the latents)",
        "{p_vae:,} params",
    ),
    (
        "`unet/`",
        "`UNet2DConditionModel` on 8x8x4 latents, blocks (32, 64), cross-attention (dim 64) in both levels and "
        "the middle block, eps prediction",
        "{p_unet:,} params",
    ),
    (
        "`scheduler/`",
        "`DPMSolverMultistepScheduler` (DPM-Solver++ 2M) on DDPM's linear betas 1e-4..0.02, 1000 train steps, "
        "`linspace` spacing",
        "",
    ),
]


def write_card(out: Path, info: dict, m: dict) -> None:
    """The model card (README.md) from the training info and the metrics; `m["noise_seed"]` is the first seed."""
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 1e6
    vocab = len(json.loads((out / "tokenizer" / "vocab.json").read_text()))
    from training.digits_t2i.data import vocabulary_words

    gw = m["defaults"]["guidance"]
    goal = m["goal"]
    comp = {
        "n_words": len(vocabulary_words()),
        "vocab": vocab,
        "p_te": info["params"]["text_encoder"],
        "p_vae": info["params"]["vae"],
        "p_unet": info["params"]["unet"],
        "scale": info["scaling_factor"],
    }
    components = "\n".join(f"| {a} | {b.format(**comp)} | {c.format(**comp)} |" for a, b, c in COMPONENTS)
    text = CARD.format(
        components=components,
        seed0=m.get("noise_seed", 1234),
        size_mb=size,
        split_seed=info["split_seed"],
        cpi=info["train_attribute_counts"]["captions_per_image"],
        example=", ".join(f'"{c}"' for c in info["example_captions"][:4]),
        kl=1e-5,
        vae_steps=info["vae_steps"],
        vae_batch=info["vae_batch"],
        vae_seconds=info["vae_seconds"],
        vae_mse=info["heldout_mse_16"],
        lr=info["lr"],
        unet_batch=info["unet_batch"],
        ema=info["ema_decay"],
        unet_steps=info["unet_steps"],
        unet_seconds=info["unet_seconds"],
        env=info["env"],
        floor=m["floor"]["fd_real_n"],
        n_main=m["floor"]["n"],
        n_per=m["floor"]["n"] // 50,
        n_neg=m["negative"]["n_per"],
        real_fd=m["floor"]["real_train"]["fd"],
        vae_fd=m["vae"]["fd"],
        vae_acc=m["vae"]["class_acc"],
        gw=gw,
        goal_acc=goal["class_acc"],
        goal_bold=goal["attributes"]["bold"]["acc"],
        goal_strict=goal["attributes"]["bold"]["strict"],
        goal_q=goal["ink_quantile"],
        guidance_table=_table(m["guidance"], "guidance"),
        steps_table=_table(m["steps"], "steps"),
        neg_table=_neg_table(m["negative"]["rows"]),
        phrasings=", ".join(f'"{k}" {v:.2f}' for k, v in m["phrasings"].items()),
    )
    (out / "README.md").write_text(text)
