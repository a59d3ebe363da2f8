"""Token sequences of different lengths in one forward pass: padding with a key mask.

A masked LM's network call carries its (B, L) ids as `PaddedTokens`; the engine's layout (server/layout.py)
joins the calls of requests with different L by padding every row to the longest and keeping each row's
length, and the model masks the padded positions as attention keys. Real positions keep their rotary
positions (padding is on the right) and never see a padded key, so their logits are the unpadded ones up to
float rounding of the longer reductions; each call then keeps its own first L positions. A batch whose rows
all have the same length runs unmasked, exactly as a request alone. A causal context (DiffusionGemma's
encoder) pads on the left instead (`left=True`), so that its last tokens stay last; the model then shifts
each row's positions by its padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from samplers.calls import NetworkCall


@dataclass(frozen=True, eq=False)
class PaddedTokens:
    """(B, L) ids of one or more calls, padded with `pad_id` to L (on the right; on the left when `left`);
    `lengths` (B,) the real lengths."""

    ids: torch.Tensor
    lengths: torch.Tensor
    pad_id: int
    left: bool = False

    @classmethod
    def of(cls, ids: torch.Tensor, pad_id: int, *, left: bool = False) -> PaddedTokens:
        return cls(ids, torch.full((ids.shape[0],), ids.shape[1], dtype=torch.int64), pad_id, left)

    def batch_rows(self) -> int:
        return self.ids.shape[0]

    def batch_layout(self) -> tuple:
        """Calls join whatever their lengths: the layout leaves L out."""
        return ("padded", self.ids.dtype, self.pad_id, self.left)

    @classmethod
    def batch_join(cls, items: list[PaddedTokens]) -> PaddedTokens:
        width = max(item.ids.shape[1] for item in items)
        left = items[0].left
        ids = torch.cat([F.pad(item.ids, (width - item.ids.shape[1], 0) if left else (0, width - item.ids.shape[1]),
                               value=item.pad_id) for item in items])
        return cls(ids, torch.cat([item.lengths for item in items]), items[0].pad_id, left)

    def key_mask(self) -> torch.Tensor | None:
        """(B, L) bool, True at real positions; None when no row is padded (the unmasked path)."""
        width = self.ids.shape[1]
        if bool((self.lengths == width).all()):
            return None
        if self.left:
            return torch.arange(width)[None, :] >= (width - self.lengths)[:, None]
        return torch.arange(width)[None, :] < self.lengths[:, None]


def padded_logits_call(network, tokens: torch.Tensor, pad_id: int) -> NetworkCall:
    """A masked LM's batchable logits call: `network(PaddedTokens)` over these (B, L) ids, joined with the calls
    of other lengths right-padded with `pad_id`; the call keeps its own first L positions."""
    length = tokens.shape[1]
    return NetworkCall(network, (PaddedTokens.of(tokens, pad_id),), lambda out: out[:, :length])
