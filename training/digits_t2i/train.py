"""Training of digits-t2i: the VAE first, then the UNet and the CLIP text encoder jointly through the eps loss."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.digits_t2i._compat import EMA, BatchSampler, Logger, warmup_cosine
from training.digits_t2i.data import CaptionBank


@dataclass(frozen=True)
class Budget:
    vae_steps: int
    vae_batch: int
    unet_steps: int
    unet_batch: int
    lr: float = 1e-3
    vae_lr: float = 1e-3
    kl_weight: float = 1e-5  # on the KL summed over the 256 latent dims; small, as in SD's VAE
    p_empty: float = 0.1
    ema_decay: float = 0.999
    log_every: int = 100
    save_every: int = 500


FULL = Budget(vae_steps=600, vae_batch=32, unet_steps=2500, unet_batch=64)
QUICK = Budget(vae_steps=3, vae_batch=16, unet_steps=3, unet_batch=16, log_every=1)


def _optimise(params, lr: float, steps: int):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    return opt, warmup_cosine(opt, warmup=min(200, max(1, steps // 10)), total=steps)


def _step(opt, sched, params, loss: torch.Tensor, step: int) -> float:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
    if not np.isfinite(gnorm):
        raise FloatingPointError(f"non-finite gradient norm at step {step}")
    opt.step()
    sched.step()
    return gnorm


def train_vae(vae, x16: torch.Tensor, b: Budget, seed: int, log: Logger) -> tuple[nn.Module, dict]:
    """MSE reconstruction of a posterior sample + kl_weight * KL(q(z|x) || N(0, I)); EMA weights returned."""
    params = list(vae.parameters())
    opt, sched = _optimise(params, b.vae_lr, b.vae_steps)
    ema = EMA(vae, b.ema_decay)
    batches = BatchSampler(x16, torch.zeros(len(x16)), b.vae_batch, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    t0, hist, run = time.time(), [], np.zeros(2)
    vae.train()
    for step in range(1, b.vae_steps + 1):
        xb, _ = next(batches)
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = F.mse_loss(vae.decode(z).sample, xb)
        kl = post.kl().mean()
        _step(opt, sched, params, rec + b.kl_weight * kl, step)
        ema.update(vae)
        run += (rec.item(), kl.item())
        if step % b.log_every == 0 or step == b.vae_steps:
            n = b.log_every if step % b.log_every == 0 else step % b.log_every
            rec_m, kl_m = run / n
            run[:] = 0
            hist.append({"step": step, "seconds": round(time.time() - t0, 1), "mse": rec_m, "kl": kl_m})
            log(f"vae step {step}/{b.vae_steps} mse {rec_m:.5f} kl {kl_m:.1f} ({(time.time() - t0) / step:.2f} s/step)")
    info = {"vae_steps": b.vae_steps, "vae_batch": b.vae_batch, "vae_seconds": round(time.time() - t0, 1)}
    return ema.model, {**info, "vae_history": hist}


class TextToImage(nn.Module):
    """The jointly trained pair, so that one optimiser, one EMA and one clip cover both."""

    def __init__(self, unet, text_encoder) -> None:
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, z: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = self.text_encoder(ids).last_hidden_state  # what StableDiffusionPipeline.encode_prompt feeds the UNet
        return self.unet(z, t, encoder_hidden_states=h).sample


def train_unet(
    model: TextToImage,
    z0: torch.Tensor,
    bank: CaptionBank,
    abar: torch.Tensor,
    b: Budget,
    seed: int,
    log: Logger,
    save=None,
) -> tuple[TextToImage, dict]:
    """eps-prediction loss on the DDPM process over scaled latents; captions drawn per step from the bank.

    ``save(ema_model, step)`` (optional) runs every ``b.save_every`` steps, so a long run always leaves a model.
    """
    params = list(model.parameters())
    opt, sched = _optimise(params, b.lr, b.unet_steps)
    ema = EMA(model, b.ema_decay)
    batches = BatchSampler(z0, torch.arange(len(z0)), b.unet_batch, seed=seed)
    g = torch.Generator().manual_seed(seed + 2)
    t0, hist, run = time.time(), [], 0.0
    model.train()
    for step in range(1, b.unet_steps + 1):
        zb, idx = next(batches)
        ids = bank.sample(idx, g)
        t = torch.randint(0, len(abar), (len(zb),), generator=g)
        eps = torch.randn(zb.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(model(a.sqrt() * zb + (1 - a).sqrt() * eps, t, ids), eps)
        _step(opt, sched, params, loss, step)
        ema.update(model)
        run += loss.item()
        if step % b.log_every == 0 or step == b.unet_steps:
            n = b.log_every if step % b.log_every == 0 else step % b.log_every
            el = time.time() - t0
            hist.append({"step": step, "seconds": round(el, 1), "loss": run / n})
            log(
                f"unet step {step}/{b.unet_steps} loss {run / n:.4f} "
                f"lr {sched.get_last_lr()[0]:.1e} ({el / step:.2f} s/step)"
            )
            run = 0.0
        if save is not None and step % b.save_every == 0 and step < b.unet_steps:
            save(ema.model, step)
    info = {
        "unet_steps": b.unet_steps,
        "unet_batch": b.unet_batch,
        "unet_seconds": round(time.time() - t0, 1),
        "lr": b.lr,
        "p_empty": b.p_empty,
        "ema_decay": b.ema_decay,
    }
    return ema.model, {**info, "unet_history": hist}
