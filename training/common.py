"""Shared plumbing for the digits recipes: arguments, seeding, batches, EMA, LR schedule, logging, cards."""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
ZOO = REPO_ROOT / "zoo"


def parse_args(zoo_name: str, description: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m training.{zoo_name.replace('-', '_')}", description=description
    )
    p.add_argument("--quick", action="store_true", help="a handful of steps into a temp (or --out) directory")
    p.add_argument("--out", type=Path, default=None, help=f"output directory (default: zoo/{zoo_name}/)")
    p.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: cores are shared)")
    p.add_argument("--eval-only", action="store_true", help="skip training: re-evaluate the model in --out")
    p.add_argument("--n-eval", type=int, default=None, help="generated samples for the quality numbers")
    return p.parse_args(argv)


def resolve_out(args: argparse.Namespace, zoo_name: str) -> Path:
    if args.out is not None:
        out = Path(args.out)
    elif args.quick:
        out = Path(tempfile.mkdtemp(prefix=f"{zoo_name}-quick-"))
    else:
        out = ZOO / zoo_name
    out.mkdir(parents=True, exist_ok=True)
    return out


def seed_everything(seed: int, threads: int | None = None) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)


class BatchSampler:
    """Endless seeded minibatches over epochs of a fixed tensor dataset (no replacement within an epoch)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y, self.bs = x, y, batch_size
        self.g = torch.Generator().manual_seed(seed)
        self._perm = torch.empty(0, dtype=torch.long)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self._perm) < self.bs:
            self._perm = torch.cat([self._perm, torch.randperm(len(self.x), generator=self.g)])
        idx, self._perm = self._perm[: self.bs], self._perm[self.bs :]
        return self.x[idx], self.y[idx]


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int, final_frac: float = 0.05):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        prog = min(1.0, (step - warmup) / max(1, total - warmup))
        return final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * prog))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


class EMA:
    """Exponential moving average of parameters (and copied buffers) with the usual warm-up of the decay."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for pe, pm in zip(self.model.parameters(), model.parameters()):
            pe.lerp_(pm.detach(), 1 - d)
        for be, bm in zip(self.model.buffers(), model.buffers()):
            be.copy_(bm)


def label_dropout(
    y: torch.Tensor, p: float, null_class: int, g: torch.Generator | None = None
) -> torch.Tensor:
    drop = torch.rand(y.shape, generator=g) < p
    return torch.where(drop, torch.full_like(y, null_class), y)


class Logger:
    """Prints to stdout (which nohup sends to train.log) with elapsed seconds, flushed."""

    def __init__(self) -> None:
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:8.1f}s] {msg}", flush=True)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def command_line(zoo_name: str) -> str:
    return f"python -m training.{zoo_name.replace('-', '_')}"


def env_summary() -> str:
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), python {sys.version.split()[0]}"
    )


def classifier_b_dir() -> Path:
    return Path(os.environ.get("DIFFSERVE_CLASSIFIER_B", ZOO / "digit-classifier-b"))


def fmt(x: float | None, nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def train_loop(
    model: nn.Module,
    loss_fn,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log: Logger,
    warmup: int = 200,
    ema_decay: float = 0.999,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    log_every: int = 100,
    probe=None,
    probe_every: int = 0,
) -> tuple[nn.Module, dict[str, Any]]:
    """AdamW + warm-up/cosine + grad clipping + EMA. ``loss_fn(model, xb, yb) -> (loss, {name: float})``.

    ``probe(step, ema_model) -> dict`` (optional) runs every ``probe_every`` steps; its numbers are logged and
    kept in the history (e.g. a quick FD of the EMA model during training).

    Returns the EMA model (eval mode) and a summary dict (steps, seconds, last logged losses).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    sched = warmup_cosine(opt, warmup=min(warmup, max(1, steps // 10)), total=steps)
    ema = EMA(model, ema_decay)
    batches = BatchSampler(x, y, batch_size, seed=seed)
    t0 = time.time()
    model.train()
    running: dict[str, float] = {}
    history = []
    probe_secs = 0.0
    for step in range(1, steps + 1):
        xb, yb = next(batches)
        loss, stats = loss_fn(model, xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
        if not np.isfinite(gnorm):
            raise FloatingPointError(f"non-finite gradient norm at step {step}")
        opt.step()
        sched.step()
        ema.update(model)
        stats = {"loss": loss.item(), "grad_norm": gnorm, **stats}
        for k, v in stats.items():
            running[k] = running.get(k, 0.0) + v
        if step % log_every == 0 or step == steps:
            n = log_every if step % log_every == 0 else step % log_every
            avg = {k: v / n for k, v in running.items()}
            running = {}
            el = time.time() - t0
            history.append(
                {"step": step, "seconds": round(el, 1), **{k: round(v, 5) for k, v in avg.items()}}
            )
            msg = " ".join(f"{k} {v:.4f}" for k, v in avg.items())
            log(f"step {step}/{steps} {msg} lr {sched.get_last_lr()[0]:.2e} ({el / step * 1000:.0f} ms/step)")
        if probe is not None and probe_every and (step % probe_every == 0 or step == steps):
            tp = time.time()
            res = probe(step, ema.model)
            probe_secs += time.time() - tp
            log(f"probe step {step}: {res}")
            history.append({"step": step, "probe": res})
            model.train()
    secs = time.time() - t0 - probe_secs
    model.eval()
    return ema.model, {
        "train_steps": steps,
        "train_seconds": round(secs, 1),
        "probe_seconds": round(probe_secs, 1),
        "batch_size": batch_size,
        "lr": lr,
        "ema_decay": ema_decay,
        "weight_decay": weight_decay,
        "grad_clip": grad_clip,
        "seed": seed,
        "history": history,
    }
