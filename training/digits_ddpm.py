"""digits-ddpm: class-conditional eps-prediction DDPM on the 8x8 digits (diffusers format).

    python -m training.digits_ddpm [--quick] [--out DIR] [--steps N] [--eval-only]

Model: ``UNet2DModel`` of :mod:`models.digits_unet` with ``num_class_embeds=11`` (label 10 = null).
Process: DDPM, linear betas 1e-4..0.02, 1000 training timesteps, x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps,
the network predicts eps (MSE). Labels are replaced by the null class with probability 0.15 so that
classifier-free guidance works: eps = eps(x, null) + w (eps(x, c) - eps(x, null)) (w = 1: no guidance).
AdamW lr 1e-3, warm-up 200 steps + cosine, batch 128, grad-clip 1, EMA 0.999 (the EMA weights are saved).

Writes ``unet/`` (``save_pretrained(..., safe_serialization=True)``), ``scheduler/`` (``DDPMScheduler``
config, prediction_type epsilon, clip_sample False), ``train_info.json``, ``metrics.json`` and README.md.
The card's numbers come from the served samplers (:mod:`training.evaluate`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from models.digits_unet import DIGITS_UNET_CONFIG, NULL_CLASS, build_digits_unet
from training.common import (
    Logger,
    command_line,
    dir_size_mb,
    env_summary,
    label_dropout,
    n_params,
    parse_args,
    read_json,
    resolve_out,
    seed_everything,
    train_loop,
    write_json,
)
from training.digits_data import SPLIT_SEED, train_split
from training.evaluate import EvalConfig, eval_header, evaluate, format_rows

NAME = "digits-ddpm"
FULL_STEPS = 3000
QUICK_STEPS = 4
BATCH = 128
LR = 1e-3
P_UNCOND = 0.15


def make_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="epsilon",
        clip_sample=False,
    )


def ddpm_loss(abar: torch.Tensor):
    def loss_fn(model: UNet2DModel, x0: torch.Tensor, y: torch.Tensor):
        t = torch.randint(0, len(abar), (x0.shape[0],))
        eps = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = model(xt, t, class_labels=label_dropout(y, P_UNCOND, NULL_CLASS)).sample
        return F.mse_loss(pred, eps), {}

    return loss_fn


def eval_configs(quick: bool) -> list[EvalConfig]:
    if quick:
        return [("ddim", 2, 2.0)]
    return [("ddim", 50, w) for w in (1.0, 1.5, 2.0)] + [("ddim", 10, 1.0), ("ddpm", 100, 1.0)]


def run_eval(out: Path, quick: bool, n_eval: int | None, log: Logger) -> dict:
    return evaluate(out, "diffusion", eval_configs(quick), quick=quick, n_eval=n_eval, log=log)


CARD = """# digits-ddpm

Class-conditional DDPM (epsilon prediction) on the scikit-learn 8x8 digits, in diffusers format.

- **Data**: `sklearn.datasets.load_digits`, scaled to [-1, 1], shape (1, 8, 8). Trained on the fixed
  stratified 80% split of `training/digits_data.py` (1438 images, split seed {split_seed}); the 20%
  held-out split (359 images) is never trained on and is the FD reference.
- **Architecture**: diffusers `UNet2DModel` (`unet/config.json`): block_out_channels {boc}, layers_per_block
  {lpb}, DownBlock2D/UpBlock2D, no attention, GroupNorm 8, `num_class_embeds=11` (labels 0..9, **10 = null**
  for classifier-free guidance); **{params:,} parameters** ({size_mb:.1f} MB on disk).
- **Process**: `scheduler/` is a `DDPMScheduler` config: linear betas 1e-4..0.02, 1000 train timesteps,
  `prediction_type="epsilon"`, `clip_sample=false` (data range is [-1, 1]; clamp final samples).
- **Recipe**: `{cmd}` (seeded, `--quick` for a CI smoke run). Loss: MSE on eps, t ~ U{{0..999}}; label dropout
  {p_uncond} to the null class; AdamW lr {lr} (warm-up + cosine), batch {batch_size}, grad-clip 1,
  **{train_steps} steps, {train_seconds} s** ({env}); EMA {ema_decay} weights saved.
- **Guidance**: eps = eps(x, null) + w (eps(x, c) - eps(x, null)); w = 1 is plain conditional sampling.
  Default **w = {default_w}** (best digits-FD below); larger w raises class accuracy and lowers diversity.

The served defaults in `zoo/models.toml` (sampler, steps, guidance) may differ from the FD-best setting here,
e.g. w = 2 for cleaner, more prototypical digits. Per-NFE numbers for every sampler, and diffusers'
own schedulers on the same weights: `python -m bench quality`.

## Measured quality

{header}

{rows}

## Loading

```python
from diffusers import UNet2DModel, DDPMScheduler
unet = UNet2DModel.from_pretrained("zoo/digits-ddpm/unet")        # safetensors
sched = DDPMScheduler.from_pretrained("zoo/digits-ddpm/scheduler")
eps = unet(x_t, t, class_labels=labels).sample                    # labels: 0..9, 10 = null
```
"""


def write_card(out: Path, info: dict, metrics: dict) -> None:
    unet_cfg = read_json(out / "unet" / "config.json")
    (out / "README.md").write_text(
        CARD.format(
            split_seed=SPLIT_SEED,
            boc=tuple(unet_cfg.get("block_out_channels", ())),
            lpb=unet_cfg.get("layers_per_block"),
            params=info["params"],
            size_mb=dir_size_mb(out / "unet"),
            cmd=command_line(NAME),
            p_uncond=P_UNCOND,
            env=info.get("env", ""),
            default_w=metrics.get("best", {}).get("guidance", "n/a"),
            header=eval_header(metrics),
            rows=format_rows(metrics),
            **{k: info[k] for k in ("lr", "batch_size", "train_steps", "train_seconds", "ema_decay")},
        )
    )


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(NAME, "Train the class-conditional DDPM of the digits zoo.", argv)
    out = resolve_out(args, NAME)
    log = Logger()
    seed_everything(args.seed, args.threads)
    log(f"{NAME}: writing to {out}; {env_summary()}")
    scheduler = make_scheduler()
    abar = scheduler.alphas_cumprod.float()
    if args.eval_only:
        info = read_json(out / "train_info.json")
    else:
        steps = args.steps or (QUICK_STEPS if args.quick else FULL_STEPS)
        x, y = train_split()
        model = build_digits_unet()
        log(f"UNet2DModel {n_params(model)} params, config {DIGITS_UNET_CONFIG}")
        ema_model, info = train_loop(
            model,
            ddpm_loss(abar),
            x,
            y,
            steps=steps,
            batch_size=BATCH if not args.quick else 32,
            lr=LR,
            seed=args.seed,
            log=log,
            log_every=100 if not args.quick else 1,
        )
        model = ema_model
        model.save_pretrained(out / "unet", safe_serialization=True)
        scheduler.save_pretrained(out / "scheduler")
        info.update(
            {"params": n_params(model), "p_uncond": P_UNCOND, "null_class": NULL_CLASS, "env": env_summary()}
        )
        write_json(out / "train_info.json", info)
    metrics = run_eval(out, args.quick, args.n_eval, log)
    write_json(out / "metrics.json", metrics)
    write_card(out, info, metrics)
    log(f"done -> {out}")
    return out


if __name__ == "__main__":
    main()
