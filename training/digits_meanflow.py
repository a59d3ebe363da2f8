"""digits-meanflow: a class-conditional MeanFlow average-velocity model (Geng et al. 2025, arXiv 2505.13447).

    python -m training.digits_meanflow [--quick] [--out DIR] [--steps N] [--eval-only]
        [--tr-sampler v1|v0|jax|uniform] [--omega W] [--kappa K] [--p P] [--init-from DIR]
        [--teacher DIR] [--time-scale S]

The zoo model: ``python -m training.digits_meanflow --teacher zoo/digits-flow`` (3000 steps from scratch,
about 33 minutes on one CPU core; the teacher-free default reaches the same 1-NFE quality, docs/models.md).

Network: :class:`models.meanflow_net.MeanFlowNet` (the digits U-Net conditioned on t, on h = t - r through a
separate embedding, and on a class label 0..9 / 10 = null). t and h are multiplied by ``--time-scale``
(default 1, as the official PyTorch code feeds raw t) before their sinusoidal embeddings. The target contains
the network's own du/dt; with the 1000 t convention of diffusion U-Nets (and of digits-flow) the network is
rough in t and the target grows without bound (measured here, fine-tuning from digits-flow with t sampled
uniformly: per-pixel target MSE 100-1000 within 300 steps, 1-NFE digits-FD stuck at the flow model's
one-step ~1.0).

``--teacher DIR`` (optional) replaces v = eps - x by a frozen flow model's velocity, E[eps - x | z_t, c].

Path z_t = (1 - t) x + t eps (t = 0 data, t = 1 noise), v = eps - x. Per batch:

1. (t, r) from the chosen sampler (default ``v1``, the "improved" sampler of the official PyTorch code:
   t ~ logit-normal(-0.6, 1.6), r ~ logit-normal(-4.0, 1.6); a fraction ``1 - ratio`` = 25% of the batch gets
   r = t (plain flow matching); then r = min(r, t)). ``v0``: t, r ~ logit-normal(-2, 2), sorted, 25% r = t.
   ``jax``: t, r ~ logit-normal(-0.4, 1), sorted, 75% r = t.
2. Label dropout 0.1 to the null class.
3. Classifier-free guidance baked into the target (as in the official code): for kept labels
   v_g = omega v + kappa u(z_t, t, t | c) + (1 - omega - kappa) u(z_t, t, t | null), the u's evaluated with
   the current net under no_grad; dropped labels keep v_g = v. Default omega = 1, kappa = 0: **no guidance
   baked in**, because on these digits guidance only worsens digits-FD (digits-ddpm, DDIM-50: FD 0.10 at
   w = 1, 0.18 at w = 1.5, 0.25 at w = 2) while w = 1 already gives ~98% class accuracy. The label dropout
   still trains the null class, so ordinary CFG (two calls per step) remains possible at inference.
   extra CFG call.
4. u, du/dt = ``torch.func.jvp(u_fn, (z, t, r), (v_g, 1, 0))`` with u_fn(z, t, r) = net(z, t, t - r, c).
   u_tgt = stopgrad(v_g - (t - r) du/dt).
5. Per-sample squared error summed over pixels, adaptive weight w = 1 / stopgrad(err + c)^p, p = 0.75,
   c = 1e-3 (the CIFAR-10 defaults of the official PyTorch code); loss = mean(w * err).

AdamW lr 1e-3 (warm-up + cosine), batch 128, grad-clip 1, EMA 0.999 (saved). ``--init-from`` copies a
digits-flow U-Net into the net before training (the zero-initialised h-branch makes the start exactly that
flow model); the default trains from scratch.

Sampling (card numbers): the served ``meanflow`` sampler (z_r = z_t - (t - r) u(z_t, r, t) on a uniform grid;
1 NFE: z_0 = z_1 - u(z_1, 0, 1)) through :mod:`training.evaluate`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from models.meanflow_net import MeanFlowNet, save_meanflow_net
from training.common import (
    ZOO,
    Logger,
    classifier_b_dir,
    command_line,
    dir_size_mb,
    env_summary,
    label_dropout,
    n_params,
    read_json,
    resolve_out,
    seed_everything,
    train_loop,
    write_json,
)
from training.digits_data import SPLIT_SEED, train_split
from training.evaluate import EvalConfig, eval_header, evaluate, format_rows, load_for_eval, sample

NAME = "digits-meanflow"
FULL_STEPS = 3000
QUICK_STEPS = 3
BATCH = 128
LR = 1e-3
P_UNCOND = 0.1
NULL_CLASS = 10
ADAPTIVE_C = 1e-3
PROBE_SEED = 777


def _logit_normal(n: int, mean: float, std: float) -> torch.Tensor:
    return torch.sigmoid(torch.randn(n) * std + mean)


def sample_tr(n: int, kind: str = "v1") -> tuple[torch.Tensor, torch.Tensor]:
    """(t, r) with 0 <= r <= t <= 1, as in the official MeanFlow code (see the module docstring)."""
    if kind == "v1":
        t = _logit_normal(n, -0.6, 1.6)
        r = _logit_normal(n, -4.0, 1.6)
        r = torch.where(torch.rand(n) < 0.25, t, r)
        r = torch.minimum(r, t)
    elif kind in ("v0", "jax"):
        mean, std, frac_eq = (-2.0, 2.0, 0.25) if kind == "v0" else (-0.4, 1.0, 0.75)
        a, b = _logit_normal(n, mean, std), _logit_normal(n, mean, std)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        r = torch.where(torch.rand(n) < frac_eq, t, r)
    elif kind == "uniform":
        t = torch.rand(n)
        u = torch.rand(n)
        r = torch.where(u < 0.25, t, torch.where(u < 0.625, torch.zeros(n), torch.rand(n) * t))
    else:
        raise ValueError(f"unknown (t, r) sampler {kind!r}; use {', '.join(sorted(TR_DESC))}")
    return t, r


def meanflow_dudt(net: MeanFlowNet, z, t, r, v, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, du/dt) where du/dt = v . d_z u + d_t u, by forward-mode AD with tangents (v, 1, 0) on (z, t, r)."""

    def u_fn(z_, t_, r_):
        return net(z_, t_, t_ - r_, labels)

    return torch.func.jvp(u_fn, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))


def make_loss(
    tr_sampler: str, omega: float, kappa: float, p: float, c: float = ADAPTIVE_C, teacher: MeanFlowNet | None = None
):
    """The MeanFlow loss. With ``teacher`` (a frozen flow model as a MeanFlowNet, h = 0), the conditional
    velocity v = eps - x is replaced by the teacher's marginal velocity v(z_t, t | c) = E[eps - x | z_t, c].
    The target u_tgt = v - (t - r)(v . d_z u + d_t u) is affine in v, so this is its conditional expectation
    given (z_t, r, t, c): the minimiser of the squared loss is unchanged (up to the teacher's error), only
    the variance of the regression target drops (Rao-Blackwellisation)."""

    def loss_fn(net: MeanFlowNet, x: torch.Tensor, y: torch.Tensor):
        n = x.shape[0]
        t, r = sample_tr(n, tr_sampler)
        eps = torch.randn_like(x)
        tt = t.view(-1, 1, 1, 1)
        z = (1 - tt) * x + tt * eps
        labels = label_dropout(y, P_UNCOND, NULL_CLASS)
        if teacher is None:
            v = eps - x
        else:
            with torch.no_grad():
                v = teacher(z, t, torch.zeros_like(t), labels)
        if omega != 1.0 or kappa != 0.0:
            with torch.no_grad():
                zero = torch.zeros_like(t)
                null = torch.full_like(labels, NULL_CLASS)
                if kappa != 0.0:
                    both = net(
                        torch.cat([z, z]),
                        torch.cat([t, t]),
                        torch.cat([zero, zero]),
                        torch.cat([labels, null]),
                    )
                    u_c, u_null = both.chunk(2)
                else:
                    u_c, u_null = 0.0, net(z, t, zero, null)
                v_guided = omega * v + kappa * u_c + (1 - omega - kappa) * u_null
            dropped = (labels == NULL_CLASS).view(-1, 1, 1, 1)
            v_g = torch.where(dropped, v, v_guided)
        else:
            v_g = v
        u, dudt = meanflow_dudt(net, z, t, r, v_g, labels)
        u_tgt = (v_g - (tt - r.view(-1, 1, 1, 1)) * dudt).detach()
        err = (u - u_tgt).pow(2).flatten(1).sum(1)
        w = 1.0 / (err.detach() + c).pow(p)
        loss = (w * err).mean()
        return loss, {"mse": float(err.detach().mean()) / x[0].numel()}

    return loss_fn


def load_flow_init(net: MeanFlowNet, flow_dir: Path) -> None:
    """Copy a digits-flow UNet2DModel (with nn.Embedding class embedding) into the MeanFlowNet."""
    from diffusers import UNet2DModel

    flow = UNet2DModel.from_pretrained(Path(flow_dir) / "unet")
    sd = flow.state_dict()
    net.class_embedding.weight.data.copy_(sd.pop("class_embedding.weight"))
    missing, unexpected = net.unet.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"--init-from {flow_dir}: U-Net mismatch (missing {missing}, unexpected {unexpected})"
        )


def eval_configs(quick: bool) -> list[EvalConfig]:
    return [("meanflow", 1, None)] if quick else [("meanflow", k, None) for k in (1, 2, 4, 8)]


def run_eval(out: Path, quick: bool, n_eval: int | None, log: Logger) -> dict:
    return evaluate(out, "meanflow", eval_configs(quick), quick=quick, n_eval=n_eval, log=log)


def make_probe(n: int = 500):
    """Quick 1- and 2-NFE digits-FD of the EMA net during training (n samples; a learning curve for the card),
    sampled like the card's numbers: the net is saved to a scratch directory and loaded as the server would."""
    if not (classifier_b_dir() / "model.safetensors").is_file():
        return None
    from training.digits_fd import frechet_distance, get_classifier_b

    clf = get_classifier_b(classifier_b_dir())

    def probe(step: int, ema_net: MeanFlowNet) -> dict:
        with tempfile.TemporaryDirectory(prefix="meanflow-probe-") as tmp:
            save_meanflow_net(ema_net, tmp)
            loaded = load_for_eval(Path(tmp), "meanflow")
            return {
                f"fd_{k}nfe_n{n}": round(
                    frechet_distance(sample(loaded, "meanflow", k, None, n, seed=PROBE_SEED)[0].clamp(-1, 1),
                                     classifier=clf)["fd"], 4)
                for k in (1, 2)
            }

    return probe


CARD = """# digits-meanflow

Class-conditional **MeanFlow** average-velocity model (Geng et al. 2025, arXiv 2505.13447) on the scikit-learn
8x8 digits: one network call generates a digit.

- **Data**: `sklearn.datasets.load_digits`, scaled to [-1, 1], shape (1, 8, 8). Trained on the fixed
  stratified 80% split of `training/digits_data.py` (1438 images, split seed {split_seed}); the 20%
  held-out split (359 images) is never trained on and is the FD reference.
- **Architecture**: `models.meanflow_net.MeanFlowNet`: the digits `UNet2DModel` shape (block_out_channels
  {boc}, layers_per_block {lpb}, no attention) with `class_embed_type="identity"`; the wrapper adds, to
  the U-Net's time embedding of **t**, a separate sinusoidal + MLP embedding of **h = t - r** and a class
  embedding (labels 0..9, **10 = null**); t and h enter their sinusoidal embeddings multiplied by
  **{time_scale:g}**. **{params:,} parameters** ({size_mb:.1f} MB on disk).
  Network call: `net(z, t, h, labels)`; `net.u(z, r, t, labels)` = u(z_t, r, t).
- **Convention**: z_t = (1 - t) x + t eps (t = 0 data, t = 1 noise), v = eps - x; u(z_t, r, t) is the
  average of v over [r, t]. Sampling step z_r = z_t - (t - r) u(z_t, r, t); 1 NFE: z_0 = z_1 - u(z_1, 0, 1).
- **Recipe**: `{cmd}` (seeded; `--quick` for a CI smoke run). MeanFlow identity target
  u_tgt = sg(v_g - (t - r) du/dt), du/dt by `torch.func.jvp` with tangents (v_g, 1, 0) on (z, t, r);
  (t, r) sampler `{tr_sampler}` ({tr_desc}); adaptive weight 1/sg(err + {c})^{p}; label dropout {p_uncond};
  {teacher_line}
  {cfg_line}
  AdamW lr {lr} (warm-up + cosine), batch {batch_size}, grad-clip 1, EMA {ema_decay};
  **{train_steps} steps, {train_seconds} s** of training ({env}){init_note}.
- **Guidance**: {guidance_line}

## Measured quality

{header}

{rows}

{comparison}

{curve}

## Loading

```python
from models.meanflow_net import load_meanflow_net
net = load_meanflow_net("zoo/digits-meanflow")                 # config.json + model.safetensors
u = net.u(z, r, t, labels)                                      # u(z_t, r, t); labels: 0..9, 10 = null
```

Served by the `meanflow` sampler: `diffserve generate --model digits-meanflow --sampler meanflow --steps 1`.
"""

TR_DESC = {
    "v1": "t ~ logit-normal(-0.6, 1.6), r ~ logit-normal(-4, 1.6), 25% r = t, r = min(r, t)",
    "v0": "t, r ~ logit-normal(-2, 2), sorted, 25% r = t",
    "jax": "t, r ~ logit-normal(-0.4, 1), sorted, 75% r = t",
    "uniform": "t ~ U(0, 1); 25% r = t, 37.5% r = 0 (the intervals one step spans), 37.5% r ~ U(0, t)",
}


def _comparison(metrics: dict) -> str:
    flow = read_json(ZOO / "digits-flow" / "metrics.json")
    one = [r for r in metrics["rows"] if r["nfe"] == 1 and "fd" in r]
    if not flow or not one:
        return ""
    e50 = [r for r in flow.get("rows", []) if r["sampler"] == "euler" and r["steps"] == 50 and "fd" in r]
    if not e50:
        return ""
    best = min(e50, key=lambda r: r["fd"])
    lines = [
        "**Against digits-flow** (same noise, labels, classifier B; from `zoo/digits-flow/metrics.json`):",
        "",
    ]
    for r in e50:
        lines.append(
            f"- flow, Euler 50 steps, w = {r['guidance']}: FD {r['fd']:.3f}, class acc {r['class_acc']:.3f}"
        )
    ratio = one[0]["fd"] / best["fd"]
    verdict = "within" if ratio <= 1.5 else "NOT within"
    lines.append(
        f"- MeanFlow 1 NFE: FD {one[0]['fd']:.3f} = **{ratio:.2f}x** the best 50-step Euler FD "
        f"({best['fd']:.3f}, w = {best['guidance']}): **{verdict}** the 1.5x target."
    )
    few = [
        r for r in flow.get("rows", []) if r["sampler"] == "euler" and r["steps"] in (1, 2, 4) and "fd" in r
    ]
    if few:
        lines.append(
            "- the flow model with 1/2/4 Euler steps for contrast: "
            + ", ".join(f"{r['steps']} step(s) w={r['guidance']}: {r['fd']:.2f}" for r in few)
        )
    return "\n".join(lines)


def _curve(info: dict) -> str:
    pts = [h for h in info.get("history", []) if "probe" in h]
    if not pts:
        return ""
    keys = list(pts[0]["probe"])
    lines = [
        "Learning curve (EMA net, " + ", ".join(keys) + "):",
        "",
        "| step | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for h in pts:
        lines.append(f"| {h['step']} | " + " | ".join(f"{h['probe'][k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


def _cfg_line(omega: float, kappa: float) -> str:
    if omega == 1.0 and kappa == 0.0:
        return (
            "**No CFG baked into training** (omega = 1, kappa = 0: v_g = v); label dropout trains the null "
            "class. Guidance only worsened digits-FD on these digits (see digits-ddpm / digits-flow cards)."
        )
    rest, eff = round(1 - omega - kappa, 4), round(omega / (1 - kappa), 4)
    return (
        f"**CFG baked into training**: v_g = {omega} v + {kappa} u(z_t, t, t | c) "
        f"+ {rest} u(z_t, t, t | null) "
        f"(effective scale {eff}; u's from the current net under no_grad; dropped labels keep v)."
    )


def _guidance_line(omega: float, kappa: float) -> str:
    if omega == 1.0 and kappa == 0.0:
        return (
            "default **none**: one conditional call per step (labels 0..9), which is what the numbers below "
            "use. Optional inference-time CFG u = u(null) + w (u(c) - u(null)) costs two calls per step."
        )
    return (
        f"baked in (scale {round(omega / (1 - kappa), 4)}); sample with one call per step, **no CFG at "
        "inference** (labels 0..9)."
    )


def write_card(out: Path, info: dict, metrics: dict) -> None:
    cfg = read_json(out / "config.json")
    omega, kappa = info["omega"], info["kappa"]
    (out / "README.md").write_text(
        CARD.format(
            split_seed=SPLIT_SEED,
            boc=tuple(cfg["unet"]["block_out_channels"]),
            lpb=cfg["unet"]["layers_per_block"],
            params=info["params"],
            size_mb=dir_size_mb(out)
            - sum(f.stat().st_size for f in out.glob("*.log")) / 1e6
            - sum(f.stat().st_size for f in out.glob("*.md")) / 1e6,
            cmd=info.get("command", command_line(NAME)),
            tr_sampler=info["tr_sampler"],
            time_scale=cfg.get("t_embed_scale", 1000.0),
            teacher_line=(
                f"v = the frozen teacher `{info['teacher']}`'s velocity v(z_t, t | c) (the conditional "
                "expectation of eps - x; same minimiser, lower-variance target);"
                if info.get("teacher")
                else "v = eps - x (no teacher);"
            ),
            tr_desc=TR_DESC[info["tr_sampler"]],
            c=info["adaptive_c"],
            p=info["adaptive_p"],
            p_uncond=P_UNCOND,
            cfg_line=_cfg_line(omega, kappa),
            guidance_line=_guidance_line(omega, kappa),
            env=info.get("env", ""),
            init_note=f"; initialised from `{info['init_from']}`"
            if info.get("init_from")
            else "; trained from scratch",
            header=eval_header(metrics),
            rows=format_rows(metrics),
            comparison=_comparison(metrics),
            curve=_curve(info),
            **{k: info[k] for k in ("lr", "batch_size", "train_steps", "train_seconds", "ema_decay")},
        )
    )


def main(argv: list[str] | None = None) -> Path:
    import argparse

    from training.common import parse_args

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--tr-sampler", default="v1", choices=sorted(TR_DESC))
    extra.add_argument("--omega", type=float, default=1.0)
    extra.add_argument("--kappa", type=float, default=0.0)
    extra.add_argument("--p", type=float, default=0.75, help="adaptive loss weight power")
    extra.add_argument("--lr", type=float, default=LR)
    extra.add_argument("--init-from", type=Path, default=None, help="a digits-flow directory to start from")
    extra.add_argument(
        "--teacher", type=Path, default=None, help="a digits-flow directory whose velocity replaces eps - x"
    )
    extra.add_argument(
        "--time-scale",
        type=float,
        default=None,
        help="t and h are multiplied by this before their sinusoidal embeddings (default 1: smooth in t, as the "
        "du/dt of the target needs; 1000, the digits-flow convention, with --init-from)",
    )
    extra.add_argument("--probe-every", type=int, default=500)
    ex, rest = extra.parse_known_args(argv)
    args = parse_args(NAME, "Train the class-conditional MeanFlow model of the digits zoo.", rest)
    out = resolve_out(args, NAME)
    log = Logger()
    seed_everything(args.seed, args.threads)
    log(f"{NAME}: writing to {out}; {env_summary()}; {vars(ex)}")
    if args.eval_only:
        info = read_json(out / "train_info.json")
    else:
        steps = args.steps or (QUICK_STEPS if args.quick else FULL_STEPS)
        x, y = train_split()
        time_scale = ex.time_scale or (1000.0 if ex.init_from is not None else 1.0)
        net = MeanFlowNet(t_embed_scale=time_scale, h_embed_scale=time_scale)
        if ex.init_from is not None:
            load_flow_init(net, ex.init_from)
        log(f"MeanFlowNet {n_params(net)} params")
        teacher = None
        if ex.teacher is not None:
            teacher = MeanFlowNet()  # 1000 t as digits-flow; the zero-initialised h-branch keeps it exactly that
            load_flow_init(teacher, ex.teacher)
            teacher.eval().requires_grad_(False)
        ema_net, info = train_loop(
            net,
            make_loss(ex.tr_sampler, ex.omega, ex.kappa, ex.p, teacher=teacher),
            x,
            y,
            steps=steps,
            batch_size=BATCH if not args.quick else 16,
            lr=ex.lr,
            seed=args.seed,
            log=log,
            log_every=100 if not args.quick else 1,
            probe=None if args.quick else make_probe(),
            probe_every=0 if args.quick else ex.probe_every,
        )
        net = ema_net
        info.update(
            {
                "params": n_params(net),
                "p_uncond": P_UNCOND,
                "null_class": NULL_CLASS,
                "env": env_summary(),
                "tr_sampler": ex.tr_sampler,
                "omega": ex.omega,
                "kappa": ex.kappa,
                "adaptive_p": ex.p,
                "adaptive_c": ADAPTIVE_C,
                "init_from": str(ex.init_from) if ex.init_from else None,
                "teacher": str(ex.teacher) if ex.teacher else None,
                "command": " ".join(
                    [command_line(NAME)] + (argv if argv is not None else __import__("sys").argv[1:])
                ),
            }
        )
        save_meanflow_net(
            net,
            out,
            extra_config={
                "training": {
                    k: info[k] for k in ("tr_sampler", "omega", "kappa", "adaptive_p", "train_steps")
                },
                "guidance_baked": round(ex.omega / (1 - ex.kappa), 4),
            },
        )
        write_json(out / "train_info.json", info)
    metrics = run_eval(out, args.quick, args.n_eval, log)
    write_json(out / "metrics.json", metrics)
    write_card(out, info, metrics)
    log(f"done -> {out}")
    return out


if __name__ == "__main__":
    main()
