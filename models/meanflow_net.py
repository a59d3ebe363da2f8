"""MeanFlow average-velocity network for the digits zoo (Geng et al. 2025, arXiv 2505.13447).

Convention (as in the MeanFlow paper and the reference notes, ``shared/references/samplers.md`` s.3):
``z_t = (1 - t) x + t eps`` with t = 0 data and t = 1 noise, instantaneous velocity ``v = eps - x``.
The network predicts the *average* velocity ``u(z_t, r, t) = 1/(t - r) * int_r^t v(z_s, s) ds`` for
r <= t, so one sampling step is ``z_r = z_t - (t - r) * u(z_t, r, t)`` (1 NFE: ``z_0 = z_1 - u(z_1, 0, 1)``).

Architecture: :class:`MeanFlowNet` wraps a diffusers ``UNet2DModel`` built with
``class_embed_type="identity"``. The U-Net embeds ``t`` itself (sinusoidal projection of ``1000 t`` and
its time-embedding MLP). The wrapper owns two further embeddings that are summed and handed to the U-Net
through its identity "class embedding" slot, i.e. added to the time embedding:

* ``h_embedding``: a *separate* sinusoidal projection + MLP of the interval length ``h = t - r``
  (scaled by 1000 like t). Its last layer is zero-initialised, so an untrained h-branch leaves the
  network a plain flow-matching velocity model ``u(z, t, t) = v(z, t)``.
* ``class_embedding``: ``nn.Embedding(11, D)`` for labels 0..9 and 10 = null (unconditional).

So the network is conditioned on ``(t, h)`` -- not ``(r, t)`` -- as in the official code.

Files written by :func:`save_meanflow_net`: ``config.json`` (``{"_class_name": "MeanFlowNet",
"unet": <UNet2DModel config>, "h_embed_scale": 1000.0, "t_embed_scale": 1000.0, ...}``) and
``model.safetensors``. :func:`load_meanflow_net` reads them back (safetensors only; no pickle).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from safetensors.torch import load_file, save_file
from torch import nn

from models.digits_unet import DIGITS_UNET_CONFIG

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
NULL_CLASS = 10

# The shared digits U-Net shape (models/digits_unet.py); the class embedding is supplied by the wrapper.
DEFAULT_UNET_CONFIG: dict[str, Any] = dict(DIGITS_UNET_CONFIG)


class MeanFlowNet(nn.Module):
    """u_theta(z, r, t | class) conditioned on (t, h = t - r) and a class label (10 = null)."""

    def __init__(
        self,
        unet_config: dict[str, Any] | None = None,
        num_class_embeds: int = 11,
        t_embed_scale: float = 1000.0,
        h_embed_scale: float = 1000.0,
    ) -> None:
        super().__init__()
        cfg = dict(DEFAULT_UNET_CONFIG if unet_config is None else unet_config)
        # The wrapper supplies the extra embedding; the U-Net must add it unchanged.
        for k in ("num_class_embeds", "class_embed_type", "_class_name", "_diffusers_version"):
            cfg.pop(k, None)
        cfg["class_embed_type"] = "identity"
        self.unet = UNet2DModel(**cfg)
        ch = self.unet.config.block_out_channels[0]
        temb_dim = ch * 4  # UNet2DModel's time_embed_dim for positional time embeddings
        self.h_proj = Timesteps(
            ch,
            flip_sin_to_cos=self.unet.config.flip_sin_to_cos,
            downscale_freq_shift=self.unet.config.freq_shift,
        )
        self.h_embedding = TimestepEmbedding(ch, temb_dim)
        nn.init.zeros_(self.h_embedding.linear_2.weight)
        nn.init.zeros_(self.h_embedding.linear_2.bias)
        self.class_embedding = nn.Embedding(num_class_embeds, temb_dim)
        self.num_class_embeds = num_class_embeds
        self.t_embed_scale = float(t_embed_scale)
        self.h_embed_scale = float(h_embed_scale)

    @property
    def config(self) -> dict[str, Any]:
        unet_cfg = {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}
        unet_cfg = json.loads(json.dumps(unet_cfg))  # tuples -> lists
        return {
            "_class_name": "MeanFlowNet",
            "unet": unet_cfg,
            "num_class_embeds": self.num_class_embeds,
            "null_class": NULL_CLASS,
            "t_embed_scale": self.t_embed_scale,
            "h_embed_scale": self.h_embed_scale,
            "conditioning": "(t, h = t - r); z_t = (1 - t) x + t eps; u = average velocity of v = eps - x",
        }

    def forward(
        self, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor, class_labels: torch.Tensor
    ) -> torch.Tensor:
        """Average velocity for the interval [t - h, t]. ``t``, ``h``: shape (B,) or scalar, in [0, 1]."""
        b = z.shape[0]
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
        h = torch.as_tensor(h, dtype=z.dtype, device=z.device)
        t = t.expand(b) if t.dim() == 0 else t
        h = h.expand(b) if h.dim() == 0 else h
        h_emb = self.h_embedding(self.h_proj(h * self.h_embed_scale).to(z.dtype))
        extra = h_emb + self.class_embedding(class_labels).to(z.dtype)
        return self.unet(z, t * self.t_embed_scale, class_labels=extra).sample

    def u(
        self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor
    ) -> torch.Tensor:
        """u(z_t, r, t) in the paper's argument order; converts (r, t) to the network's (t, t - r)."""
        return self.forward(z, t, t - r, class_labels)


def save_meanflow_net(
    net: MeanFlowNet, out_dir: str | Path, extra_config: dict[str, Any] | None = None
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = net.config
    if extra_config:
        cfg.update(extra_config)
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    return out


def load_meanflow_net(model_dir: str | Path, device: str | torch.device = "cpu") -> MeanFlowNet:
    """Load a MeanFlowNet saved by :func:`save_meanflow_net` (config.json + model.safetensors); eval mode."""
    d = Path(model_dir)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found (expected a MeanFlowNet directory)")
    if not w_path.is_file():
        raise FileNotFoundError(f"{w_path} not found; MeanFlowNet weights are loaded from safetensors only")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("_class_name") != "MeanFlowNet":
        raise ValueError(f"{cfg_path}: _class_name is {cfg.get('_class_name')!r}, expected 'MeanFlowNet'")
    net = MeanFlowNet(
        unet_config=cfg["unet"],
        num_class_embeds=int(cfg.get("num_class_embeds", 11)),
        t_embed_scale=float(cfg.get("t_embed_scale", 1000.0)),
        h_embed_scale=float(cfg.get("h_embed_scale", 1000.0)),
    )
    net.load_state_dict(load_file(str(w_path)), strict=True)
    return net.to(device).eval().requires_grad_(False)
