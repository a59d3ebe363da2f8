"""Turn a models-config entry into a loaded, read-only model the samplers can use (one loader per kind)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from samplers.meanflow import AverageVelocity

from .config import ConfigError, ModelEntry
from .diffusers_loader import load_unet_denoiser
from .safety import require_safetensors


@dataclass(frozen=True)
class LoadedModel:
    """A served model: its sampler-facing callable plus the defaults the config gives it."""

    entry: ModelEntry
    model: Any  # Denoiser | AverageVelocity | masked model
    shift: float = 1.0
    backend: str = "torch"  # what runs the network, as GetModel reports it (models/backends.py)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def kind(self) -> str:
        return self.entry.kind


def _load_unet(entry: ModelEntry, device: str) -> LoadedModel:
    denoiser, mapping = load_unet_denoiser(entry.directory, device=device, null_class=entry.null_class,
                                          model=entry.name)
    if mapping.kind != entry.kind:
        raise ValueError(f"model {entry.name!r}: config says kind {entry.kind!r} but its scheduler config is "
                         f"a {mapping.kind} model")
    return LoadedModel(entry, denoiser, mapping.shift)


def _load_meanflow(entry: ModelEntry, device: str) -> LoadedModel:
    from .meanflow_net import load_meanflow_net

    require_safetensors(entry.directory, f"model {entry.name!r}")
    net = load_meanflow_net(entry.directory, device=device)
    null = entry.null_class

    def u(z, r, t, labels=None):
        n = z.shape[0]
        labels = torch.full((n,), -1) if labels is None else torch.as_tensor(labels)
        labels = torch.where(labels < 0, torch.full_like(labels, null if null is not None else 0), labels)
        with torch.inference_mode():
            out = net.u(z.float().to(device), r.float().to(device), t.float().to(device), labels.to(device))
        return out.to(z.device, z.dtype)

    num_classes = None if null is None else null
    shape = (net.unet.config.in_channels, net.unet.config.sample_size, net.unet.config.sample_size)
    return LoadedModel(entry, AverageVelocity(u, shape, num_classes))


def _load_masked(entry: ModelEntry, device: str) -> LoadedModel:
    """Text diffusion checkpoints by config.json's model_type: LLaDA, MDLM / BD3-LM, DiffusionGemma, HF masked LMs."""
    from .diffusion_lms import family_of, load_text_diffusion

    family = family_of(entry.directory)
    if family.kind != entry.kind:
        raise ValueError(f"model {entry.name!r}: config says kind {entry.kind!r} but its checkpoint is a "
                         f"{family.kind} model")
    return LoadedModel(entry, load_text_diffusion(entry.directory, device=entry.device or device,
                                                  dtype=getattr(torch, entry.dtype)))


LOADERS: dict[str, Callable[[ModelEntry, str], LoadedModel]] = {
    "diffusion": _load_unet, "flow": _load_unet, "meanflow": _load_meanflow, "masked": _load_masked,
    "block_diffusion": _load_masked}


def _load_pipeline(entry: ModelEntry, device: str) -> LoadedModel:
    """A diffusers pipeline directory (model_index.json) as a LatentPipeline (models/pipelines)."""
    from .pipelines import load_pipeline

    return LoadedModel(entry, load_pipeline(entry.directory, entry.name, entry.dtype, entry.device or device))


def load_model(entry: ModelEntry, device: str = "cpu") -> LoadedModel:
    from .backends import apply_backend

    if entry.family is not None:  # torch only: exported backends serve single networks, not pipelines
        backend = entry.extra.get("backend", "torch")
        if backend != "torch":
            raise ConfigError(f"model {entry.name!r}: backend {backend!r} is not available for latent pipelines "
                              f"({entry.family}); they run on torch")
        return _load_pipeline(entry, device)
    return apply_backend(LOADERS[entry.kind](entry, device), device)
