"""The loaded form of every latent family: conditioning stage, latent denoiser, decoder and time grid."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from samplers.errors import InvalidRequest

from .common import LatentDenoiser, TextConditioner, VaeDecoder
from .schedule import Schedule

MAX_BINNED_SIDE = 4096  # a binned request is resized back to its own size: bound what that may allocate


@dataclass(frozen=True, eq=False)
class LatentPipeline:
    """One served latent model, read-only after loading (per-request state lives in the request machine).

    `text` is None for class-conditional families (DiT), whose cond is {"class_labels": (N,)}.
    `extra_cond(height, width, n)` adds per-sample conditioning that depends on the request (SDXL's
    time ids, FLUX's distilled guidance, PixArt's resolution); with `zero_negative` a request without a
    negative prompt gets zero text embeddings as its unconditional half (SDXL's
    force_zeros_for_empty_prompt) instead of the empty string's."""

    name: str
    family: str
    text: TextConditioner | None
    denoiser: LatentDenoiser
    decoder: VaeDecoder
    schedule: Schedule
    factor: int  # image pixels per latent pixel
    default_size: tuple[int, int]
    default_steps: int = 50
    default_guidance: float | None = 7.5
    patch: int = 1  # latent pixels per token (dynamic shift counts tokens)
    num_classes: int | None = None
    extra_cond: Callable[[int, int, int, dict], dict] | None = None
    zero_negative: bool = False
    info: dict = field(default_factory=dict)

    @property
    def takes_prompt(self) -> bool:
        return self.text is not None

    def check_size(self, height: int, width: int) -> None:
        if self.info.get("bins"):  # any size: generated at its aspect-ratio bin, resized back
            for key, value in (("height", height), ("width", width)):
                if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_BINNED_SIDE:
                    raise InvalidRequest(f"{key}: {value!r} must be an integer in [1, {MAX_BINNED_SIDE}] for model "
                                         f"{self.name!r}")
            return
        sizes = self.info.get("sizes")
        if sizes is not None and [height, width] not in [list(s) for s in sizes]:
            raise InvalidRequest(f"height, width: model {self.name!r} generates only at {sizes} (got "
                                 f"{height}x{width})")
        step = self.factor * self.patch
        top = self.info.get("max_side")
        for key, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < step or value % step:
                raise InvalidRequest(f"{key}: {value!r} must be a positive multiple of {step} for model "
                                     f"{self.name!r}")
            if top is not None and value > top:
                raise InvalidRequest(f"{key}: {value!r} exceeds {top}, the largest side model {self.name!r} "
                                     "can generate")

    def generation_size(self, height: int, width: int) -> tuple[int, int]:
        """The size the model generates a (height, width) request at: the nearest aspect-ratio bin where the
        family bins resolutions (PixArt's use_resolution_binning; the first of equally near bins, as
        diffusers' min over its table), else the request's own size."""
        bins = self.info.get("bins")
        if not bins:
            return height, width
        ratio = height / width
        h, w = bins[min(bins, key=lambda r: abs(float(r) - ratio))]
        return int(h), int(w)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return self.denoiser.latent_shape(height, width)

    def image_seq_len(self, height: int, width: int) -> int:
        return (height // self.factor // self.patch) * (width // self.factor // self.patch)

    def grid(self, steps: int, sampler: str, height: int, width: int) -> torch.Tensor:
        """Noise levels (VE kappa, decreasing, ending at 0 or the table's minimum) for one request."""
        return self.schedule.grid(steps, sampler, self.image_seq_len(height, width))

    def describe(self) -> dict:
        """What ListModels / GetModel say about this model: inputs, sizes, defaults."""
        step = self.factor * self.patch
        return {"family": self.family, "kind": self.denoiser.kind, "takes_prompt": self.takes_prompt,
                "num_classes": self.num_classes, "null_class": self.info.get("null_class"),
                "default_height": self.default_size[0], "default_width": self.default_size[1],
                "size_multiple": 1 if self.info.get("bins") else step, "sizes": self.info.get("sizes"),
                "resolution_binning": bool(self.info.get("bins")), "default_steps": self.default_steps,
                "default_guidance": self.default_guidance,
                "distilled_guidance": bool(self.info.get("distilled_guidance", False)),
                "latent_channels": self.denoiser.shape[0] if self.denoiser.shape else None}
