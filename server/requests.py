"""Requests and results in plain Python: what every entry point turns its input into (server/plan.py checks them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from samplers.errors import InvalidRequest
from samplers.hooks import StepInfo
from samplers.noise import MAX_SEED

PLACEHOLDER = "\u2591"  # a text preview's still-masked position (light shade, never a token's text)


@dataclass(frozen=True)
class SearchRequest:
    """Test-time search instead of one sampler run: method, NFE budget per sample, verifier."""

    method: str
    budget_nfe: int
    verifier: str
    options: dict[str, Any] = field(default_factory=dict)
    verifier_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerateRequest:
    """A request in plain Python; every field is validated before any compute."""

    sampler: str
    steps: int | None
    n: int = 1
    seed: int = 0
    seeds: tuple[int, ...] | None = None
    class_label: int | None = None
    guidance: float | None = None
    grid: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: tuple[int, ...] | None = None  # masked models: -1 marks positions to sample
    prompt_text: str | None = None
    search: SearchRequest | None = None
    prompt: str | None = None  # text-to-image pipelines
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    distilled_guidance: float | None = None  # FLUX-dev's guidance input
    max_new_tokens: int | None = None  # text LMs (LLaDA, MDLM / BD3-LM, DiffusionGemma): tokens after the prompt

    def sample_seeds(self) -> list[int]:
        if self.seeds is not None:
            if len(self.seeds) != self.n:
                raise InvalidRequest(f"seeds: {len(self.seeds)} seeds given for {self.n} samples")
            seeds = list(self.seeds)
        else:
            seeds = [self.seed + k for k in range(self.n)]
        if any(not 0 <= s <= MAX_SEED for s in seeds):
            raise InvalidRequest("seeds: every seed must lie in [0, 2^63 - 1]")
        return seeds


@dataclass(frozen=True)
class GenerateResult:
    samples: torch.Tensor  # images in model coordinates, or token ids (n, L) for masked models
    nfe: int
    seeds: list[int]
    texts: list[str] | None = None
    rewards: list[float] | None = None


@dataclass(frozen=True)
class TextStep(StepInfo):
    """A text model's step: the StepInfo plus `previews()`, each sample's answer so far as text with
    PLACEHOLDER at every position still masked (rendered on demand, outside the step loop)."""

    render: Callable[[torch.Tensor], list[str]] | None = None

    def previews(self) -> list[str]:
        return [] if self.render is None else self.render(self.x)
