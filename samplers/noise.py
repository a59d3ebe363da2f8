"""Per-sample noise from per-sample seeds (EDM's StackedRandomGenerator idea, Karras et al. 2022).

Sample k draws only from generator k, so its noise, and therefore its result, is the same whether it
runs alone or inside a batch of 64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MAX_SEED = 2**63 - 1


class SampleNoise:
    """One torch.Generator per sample; `randn(shape)` stacks one draw of `shape` per sample."""

    def __init__(self, seeds: Sequence[int], dtype: torch.dtype = torch.float32):
        self.seeds = [int(s) for s in seeds]
        for s in self.seeds:
            if not 0 <= s <= MAX_SEED:
                raise ValueError(f"seed {s} out of range [0, 2^63 - 1]")
        self.dtype = dtype
        self._generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def generator(self, k: int) -> torch.Generator:
        """Sample k's own generator, for draws the methods below do not cover (randint, multinomial)."""
        return self._generators[k]

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float64)
                            for g in self._generators]).to(self.dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self):
            raise ValueError(f"batch of {x.shape[0]} but {len(self)} noise streams")
        return self.randn(x.shape[1:]).to(x.dtype)

    def rand(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.stack([torch.rand(tuple(shape), generator=g, dtype=torch.float64)
                            for g in self._generators])

    def subset(self, index: Sequence[int]) -> SampleNoise:
        """The noise streams of some samples (same generator objects, so draws stay consistent)."""
        out = SampleNoise.__new__(SampleNoise)
        out.seeds = [self.seeds[i] for i in index]
        out.dtype = self.dtype
        out._generators = [self._generators[i] for i in index]
        return out


def initial_noise(model, noise: SampleNoise) -> torch.Tensor:
    """x at the start of sampling in VE coordinates: prior noise in model coordinates divided by alpha."""
    process = model.process
    scale = process.prior_std() / float(process.alpha(process.t_max))
    return noise.randn(model.shape) * scale
