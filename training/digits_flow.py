"""digits-flow: class-conditional rectified flow (velocity prediction) on the 8x8 digits (diffusers format).

    python -m training.digits_flow [--quick] [--out DIR] [--steps N] [--eval-only]

Same ``UNet2DModel`` as digits-ddpm (:mod:`models.digits_unet`, ``num_class_embeds=11``, 10 = null).
Path: x_t = (1 - t) x0 + t eps (t = 0 data, t = 1 noise), target velocity v = eps - x0, the network's
timestep input is 1000 t -- the convention of diffusers' ``FlowMatchEulerDiscreteScheduler`` (sigma = t,
timestep = 1000 sigma, x_next = x + (sigma_next - sigma) v). Training t ~ logit-normal(0, 1) (SD3-style)
mixed 50/50 with U(0, 1) so the ends of the path are not starved. Label dropout 0.15 for classifier-free
guidance: v = v(x, null) + w (v(x, c) - v(x, null)). AdamW lr 1e-3, warm-up + cosine, batch 128,
grad-clip 1, EMA 0.999 (saved).

Writes ``unet/`` (safetensors), ``scheduler/`` (``FlowMatchEulerDiscreteScheduler``, shift 1.0, 1000 train
timesteps), ``train_info.json``, ``metrics.json``, README.md. The card's numbers come from the served samplers
(:mod:`training.evaluate`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

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

NAME = "digits-flow"
FULL_STEPS = 3000
QUICK_STEPS = 4
BATCH = 128
LR = 1e-3
P_UNCOND = 0.15
TIMESTEP_SCALE = 1000.0


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def sample_t(n: int) -> torch.Tensor:
    """Half logit-normal(0, 1), half uniform on (0, 1)."""
    ln = torch.sigmoid(torch.randn(n))
    un = torch.rand(n)
    return torch.where(torch.rand(n) < 0.5, ln, un)


def flow_loss(model: UNet2DModel, x0: torch.Tensor, y: torch.Tensor):
    t = sample_t(x0.shape[0])
    eps = torch.randn_like(x0)
    tt = t.view(-1, 1, 1, 1)
    xt = (1 - tt) * x0 + tt * eps
    pred = model(xt, t * TIMESTEP_SCALE, class_labels=label_dropout(y, P_UNCOND, NULL_CLASS)).sample
    return F.mse_loss(pred, eps - x0), {}


def eval_configs(quick: bool) -> list[EvalConfig]:
    if quick:
        return [("euler", 2, 2.0)]
    return [("euler", 50, w) for w in (1.0, 1.5, 2.0)] + [("euler", s, 1.0) for s in (1, 2, 4, 10)]


def run_eval(out: Path, quick: bool, n_eval: int | None, log: Logger) -> dict:
    return evaluate(out, "flow", eval_configs(quick), quick=quick, n_eval=n_eval, log=log)


CARD = """# digits-flow

Class-conditional rectified-flow model (velocity prediction) on the scikit-learn 8x8 digits, in diffusers
format.

- **Data**: `sklearn.datasets.load_digits`, scaled to [-1, 1], shape (1, 8, 8). Trained on the fixed
  stratified 80% split of `training/digits_data.py` (1438 images, split seed {split_seed}); the 20%
  held-out split (359 images) is never trained on and is the FD reference.
- **Architecture**: diffusers `UNet2DModel` (`unet/config.json`), the same as digits-ddpm: block_out_channels
  {boc}, layers_per_block {lpb}, no attention, `num_class_embeds=11` (labels 0..9, **10 = null** for
  classifier-free guidance); **{params:,} parameters** ({size_mb:.1f} MB on disk).
- **Process**: x_t = (1 - t) x0 + t eps (t = 0 data, t = 1 noise); the network predicts v = eps - x0 and gets
  timestep 1000 t. `scheduler/` is a `FlowMatchEulerDiscreteScheduler` config (shift 1.0, 1000 train
  timesteps): sigma = t, x_next = x + (sigma_next - sigma) v.
- **Recipe**: `{cmd}` (seeded, `--quick` for a CI smoke run). t ~ 50/50 mix of logit-normal(0, 1) and U(0, 1);
  MSE on v; label dropout {p_uncond}; AdamW lr {lr} (warm-up + cosine), batch {batch_size}, grad-clip 1,
  **{train_steps} steps, {train_seconds} s** ({env}); EMA {ema_decay} weights saved.
- **Guidance**: v = v(x, null) + w (v(x, c) - v(x, null)); w = 1 is plain conditional sampling.
  Default **w = {default_w}** (best digits-FD at 50 Euler steps below).

The served defaults in `zoo/models.toml` (sampler, steps, guidance) may differ from the FD-best setting here,
e.g. w = 2 for cleaner, more prototypical digits. Per-NFE numbers for every sampler, and diffusers'
own schedulers on the same weights: `python -m bench quality`.

## Measured quality

{header}

{rows}

## Loading

```python
from diffusers import UNet2DModel, FlowMatchEulerDiscreteScheduler
unet = UNet2DModel.from_pretrained("zoo/digits-flow/unet")
sched = FlowMatchEulerDiscreteScheduler.from_pretrained("zoo/digits-flow/scheduler")
v = unet(x_t, 1000 * t, class_labels=labels).sample                 # labels: 0..9, 10 = null
```
"""


def write_card(out: Path, info: dict, metrics: dict) -> None:
    unet_cfg = read_json(out / "unet" / "config.json")
    best50 = [r for r in metrics["rows"] if r["steps"] == 50 and "fd" in r]
    default_w = min(best50, key=lambda r: r["fd"])["guidance"] if best50 else "n/a"
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
            default_w=default_w,
            header=eval_header(metrics),
            rows=format_rows(metrics),
            **{k: info[k] for k in ("lr", "batch_size", "train_steps", "train_seconds", "ema_decay")},
        )
    )


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(NAME, "Train the class-conditional rectified-flow model of the digits zoo.", argv)
    out = resolve_out(args, NAME)
    log = Logger()
    seed_everything(args.seed, args.threads)
    log(f"{NAME}: writing to {out}; {env_summary()}")
    if args.eval_only:
        info = read_json(out / "train_info.json")
    else:
        steps = args.steps or (QUICK_STEPS if args.quick else FULL_STEPS)
        x, y = train_split()
        model = build_digits_unet()
        log(f"UNet2DModel {n_params(model)} params, config {DIGITS_UNET_CONFIG}")
        ema_model, info = train_loop(
            model,
            flow_loss,
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
        make_scheduler().save_pretrained(out / "scheduler")
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
