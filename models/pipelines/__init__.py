"""Diffusers pipeline directories (model_index.json + components) normalized into our stage contracts.

`detect_family(directory)` reads model_index.json's `_class_name`; `load_pipeline(directory, model, dtype,
device)` loads it through the family's module (one per family) into a `LatentPipeline`.  Safetensors only,
local files only, no checkpoint code is run; unsupported components are errors naming them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from ..diffusers_loader import UnsupportedConfig
from .common import read_model_index
from .pipeline import LatentPipeline

# model_index.json `_class_name` -> family
FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "DiTPipeline": "dit",
    "PixArtSigmaPipeline": "pixart",
    "AnyFlowPipeline": "flowmap",
}
FAMILY_KINDS = {"sd": "diffusion", "sdxl": "diffusion", "sd3": "flow", "flux": "flow", "dit": "diffusion",
                "pixart": "diffusion", "flowmap": "meanflow"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def detect_family(directory: str | Path) -> str:
    """The family of a pipeline directory, from model_index.json alone (no weights are read)."""
    cls = read_model_index(Path(directory)).get("_class_name")
    if cls not in FAMILIES:
        raise UnsupportedConfig(f"model_index.json: pipeline class {cls!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[cls]


def _loaders() -> dict[str, Callable[..., LatentPipeline]]:
    from . import sd

    loaders = {"sd": sd.load}
    for family, module in (("sd3", "sd3"), ("flux", "flux"), ("sdxl", "sdxl"), ("dit", "dit"),
                           ("pixart", "pixart"), ("flowmap", "flowmap")):
        try:
            mod = __import__(f"{__name__}.{module}", fromlist=["load"])
        except ImportError:
            continue
        loaders[family] = mod.load
    return loaders


def load_pipeline(directory: str | Path, model: str, dtype: str | torch.dtype = "float32",
                  device: str = "cpu") -> LatentPipeline:
    """Load the pipeline directory as model `model` (the name errors carry)."""
    directory = Path(directory)
    family = detect_family(directory)
    loaders = _loaders()
    if family not in loaders:
        raise UnsupportedConfig(f"model {model!r}: the {family} family is not supported yet")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UnsupportedConfig(f"model {model!r}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    pipeline = loaders[family](directory, model, dtype=dtype, device=device)
    if pipeline.schedule.data_clip is None:
        return pipeline
    return replace(pipeline, denoiser=replace(pipeline.denoiser, data_clip=pipeline.schedule.data_clip))
