"""One entry point for text diffusion checkpoints: pick the loader from config.json's model_type.

    llada            -> models.llada.load_llada            (kind "masked", default sampler "llada")
    mdlm             -> models.mdlm_dit.load_mdlm_dit      (kind "masked", default sampler "first_hitting")
    bd3lm            -> models.mdlm_dit.load_mdlm_dit      (kind "masked", default sampler "block_first_hitting")
    diffusion_gemma  -> models.diffusion_gemma.load_diffusion_gemma (kind "block_diffusion", "block_refinement")
    anything else    -> models.masked_lm.load_masked_lm    (transformers AutoModelForMaskedLM, "first_hitting")

A models-config entry of these kinds that leaves out default_sampler / default_steps gets its family's
(models/config.py); this module imports no torch until a loader runs, so reading a config stays light.

None of them executes code from the checkpoint directory: the first three are our own modules (or
transformers' built-in class) fed from safetensors, and `auto_map` entries are never followed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Family:
    kind: str  # the sampler kind: "masked" (samplers/masked.py contract) or "block_diffusion"
    default_sampler: str
    loader: str  # "module:function"
    default_steps: int = 10  # samplers that take steps (one step per mask for first_hitting: unused)


FAMILIES = {
    "llada": Family("masked", "llada", "models.llada:load_llada", 128),  # steps = answer length: LLaDA's best
    "mdlm": Family("masked", "first_hitting", "models.mdlm_dit:load_mdlm_dit"),
    "bd3lm": Family("masked", "block_first_hitting", "models.mdlm_dit:load_mdlm_dit"),
    "diffusion_gemma": Family("block_diffusion", "block_refinement", "models.diffusion_gemma:load_diffusion_gemma",
                              48),  # steps per canvas: diffusers' pipeline default
}
HF_MASKED_LM = Family("masked", "first_hitting", "models.masked_lm:load_masked_lm")


def family_of(path: str | Path) -> Family:
    """The family of a checkpoint directory, from config.json's model_type."""
    from .masked_lm import CheckpointError

    config = Path(path) / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{Path(path).name}: no config.json")
    model_type = json.loads(config.read_text()).get("model_type")
    return FAMILIES.get(model_type, HF_MASKED_LM)


def load_text_diffusion(path: str | Path, *, device: str = "cpu", dtype=None):
    """Load any supported text diffusion checkpoint (float32 unless `dtype`); returns the model object its
    samplers take."""
    import importlib

    import torch

    dtype = torch.float32 if dtype is None else dtype
    module, function = family_of(path).loader.split(":")
    return getattr(importlib.import_module(module), function)(path, device=device, dtype=dtype)
