"""Hugging Face masked language models as MaskedDenoisers: AutoModelForMaskedLM + tokenizer, safetensors only.

A masked LM trained with the MDLM objective is a (time-agnostic) masked diffusion model, so any
`AutoModelForMaskedLM` checkpoint serves the masked samplers in samplers/masked.py. Everything is read
from one local directory (`local_files_only=True`, no remote code). The mask token and the ids that must
never be sampled (mask, padding and every other special token, plus embedding rows the tokenizer has no
token for) come from the tokenizer's configuration.
"""

from __future__ import annotations

from pathlib import Path

import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_SANE_LENGTH = 1_000_000  # tokenizers without a limit report model_max_length as ~1e30


class CheckpointError(ValueError):
    """A checkpoint directory cannot be served: missing files, pickles, or an unusable tokenizer."""


class HFMaskedLM:
    """A loaded transformers masked LM with its tokenizer; read-only, eval mode, time-agnostic."""

    def __init__(self, model, tokenizer, mask_id: int, forbidden: tuple[int, ...], length: int):
        self.model = model
        self.tokenizer = tokenizer
        self.mask_id = mask_id
        self.forbidden = forbidden
        self.length = length
        self.vocab_size = int(model.config.vocab_size)
        self.device = next(model.parameters()).device

    def logits(self, tokens: torch.Tensor, cond=None) -> torch.Tensor:
        """(B, L) ids -> (B, L, V) float32 logits on the CPU. `cond` is unused (unconditional LMs)."""
        ids = tokens.to(self.device)
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        return out.float().cpu()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens; the mask token's text becomes the mask id."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


def _check_weights(path: Path) -> None:
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"{path.name}: found only pickle weights ({', '.join(pickles)}). Loading a pickle can run "
            "arbitrary code, so diffserve reads safetensors only. Convert once, in an environment you "
            "trust: AutoModelForMaskedLM.from_pretrained(DIR, use_safetensors=False).save_pretrained(DIR) "
            "writes model.safetensors; then delete the pickle.")
    raise CheckpointError(f"{path.name}: no *.safetensors weights in the directory")


def special_ids(tokenizer, vocab_size: int) -> tuple[int, tuple[int, ...]]:
    """(mask id, forbidden ids) from the tokenizer's configuration; CheckpointError when undeterminable."""
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise CheckpointError("tokenizer has no mask token: set \"mask_token\" in tokenizer_config.json")
    if not 0 <= mask_id < vocab_size:
        raise CheckpointError(f"mask token id {mask_id} is outside the vocabulary (size {vocab_size})")
    forbidden = {mask_id, *(i for i in tokenizer.all_special_ids if i is not None)}
    if tokenizer.pad_token_id is not None:
        forbidden.add(tokenizer.pad_token_id)
    forbidden.update(range(len(tokenizer), vocab_size))  # embedding rows that no token decodes to
    if len(forbidden) >= vocab_size:
        raise CheckpointError("every token id is special: nothing could ever be sampled")
    return mask_id, tuple(sorted(i for i in forbidden if i < vocab_size))


def model_length(tokenizer, config) -> int:
    """The longest sequence: the tokenizer's model_max_length, capped by the position embeddings."""
    limits = (tokenizer.model_max_length, getattr(config, "max_position_embeddings", None))
    candidates = [int(n) for n in limits if n is not None and 0 < n < MAX_SANE_LENGTH]
    if not candidates:
        raise CheckpointError("cannot determine the model's sequence length: set model_max_length in "
                              "tokenizer_config.json")
    return min(candidates)


def load_masked_lm(path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32
                   ) -> HFMaskedLM:
    """Load a transformers masked LM and its tokenizer from a local directory (safetensors only)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path.name}: no config.json")
    _check_weights(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path.name}: cannot load the tokenizer ({e})") from e
    model = AutoModelForMaskedLM.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                 dtype=dtype).to(device)
    model.eval().requires_grad_(False)
    mask_id, forbidden = special_ids(tokenizer, int(model.config.vocab_size))
    return HFMaskedLM(model, tokenizer, mask_id, forbidden, model_length(tokenizer, model.config))
