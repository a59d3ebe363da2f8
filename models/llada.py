"""LLaDA (Nie et al. 2025, arXiv 2502.09992) as a MaskedDenoiser: our own module, published weights, no remote code.

LLaDA's network is a LLaMA-style transformer without the causal mask: token embedding, n pre-norm blocks
(RMSNorm -> multi-head attention with rotary positions over the whole sequence -> residual; RMSNorm ->
SwiGLU -> residual), a final RMSNorm and an untied output projection. Its checkpoints ship an
OLMo-derived modeling file that transformers runs only with `trust_remote_code`; we never import it.
This module reads the published `config.json` (OLMo field names: d_model, n_layers, n_heads,
mlp_hidden_size, ...) and the safetensors shards, and maps the published weight names

    model.transformer.wte.weight                      token embedding
    model.transformer.blocks.{i}.attn_norm.weight     RMSNorm before attention
    model.transformer.blocks.{i}.{q,k,v}_proj.weight  attention projections
    model.transformer.blocks.{i}.attn_out.weight      attention output projection
    model.transformer.blocks.{i}.ff_norm.weight       RMSNorm before the MLP
    model.transformer.blocks.{i}.ff_proj.weight       SwiGLU gate (goes through SiLU)
    model.transformer.blocks.{i}.up_proj.weight       SwiGLU up projection
    model.transformer.blocks.{i}.ff_out.weight        MLP down projection
    model.transformer.ln_f.weight                     final RMSNorm
    model.transformer.ff_out.weight                   output projection (absent when weight_tying)

onto ours by removing the `model.transformer.` prefix. Numerics follow the published code where they
matter: RMSNorm in float32 then cast back before the weight, rotary in float32 (`rope_full_precision`),
rotate-half (not interleaved) rotary layout. The tokenizer is read with the plain fast-tokenizer class
(`tokenizer.json` + `tokenizer_config.json`), never through an `auto_map`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from samplers.calls import NetworkCall

from .masked_lm import CheckpointError, _check_weights
from .padded import PaddedTokens, padded_logits_call

PREFIX = "model.transformer."
DEFAULT_MASK_ID = 126336  # <|mdm_mask|> in LLaDA's tokenizer


@dataclass(frozen=True)
class LLaDAConfig:
    """The fields of LLaDA's config.json that define the network (OLMo names)."""

    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    mlp_hidden_size: int | None = None
    mlp_ratio: int = 4
    vocab_size: int = 126464
    embedding_size: int | None = None
    max_sequence_length: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    weight_tying: bool = False
    include_bias: bool = False
    include_qkv_bias: bool = False
    scale_logits: bool = False
    input_emb_norm: bool = False
    mask_token_id: int = DEFAULT_MASK_ID
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden(self) -> int:
        return self.mlp_hidden_size or self.mlp_ratio * self.d_model

    @property
    def rows(self) -> int:
        """Rows of the embedding and the output projection (embedding_size may pad vocab_size)."""
        return self.embedding_size or self.vocab_size


# LLaDA-8B-Base / -Instruct as published (config.json).
LLADA_8B = LLaDAConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                       vocab_size=126464, embedding_size=126464, max_sequence_length=4096, rope_theta=500000.0,
                       mask_token_id=DEFAULT_MASK_ID, eos_token_id=126081, pad_token_id=126081)

# Published fields whose other values select architectures this module does not implement.
_REQUIRED = {"block_type": "llama", "layer_norm_type": "rms", "activation_type": "silu", "rope": True,
             "alibi": False, "attention_layer_norm": False, "multi_query_attention": None,
             "block_group_size": 1}


def read_config(path: Path) -> LLaDAConfig:
    """LLaDAConfig from a published config.json; refuses what this module would compute differently."""
    raw = json.loads((path / "config.json").read_text())
    for key, want in _REQUIRED.items():
        if key in raw and raw[key] != want and not (key == "multi_query_attention" and not raw[key]):
            raise CheckpointError(f"{path.name}: config.json has {key}={raw[key]!r}; diffserve's LLaDA module "
                                  f"implements {key}={want!r} only")
    if raw.get("layer_norm_with_affine") is False:
        raise CheckpointError(f"{path.name}: config.json has layer_norm_with_affine=false (not implemented)")
    known = {f.name for f in fields(LLaDAConfig)}
    config = LLaDAConfig(**{k: v for k, v in raw.items() if k in known and v is not None})  # null: default
    if config.d_model % config.n_heads or config.n_heads % config.kv_heads:
        raise CheckpointError(f"{path.name}: d_model {config.d_model} / n_heads {config.n_heads} / n_kv_heads "
                              f"{config.kv_heads} do not divide")
    return config


class RMSNorm(nn.Module):
    """x / rms(x) in float32, cast back, then times the weight (OLMo's RMSLayerNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin, cos) of shape (seq_len, head_dim) in float32, frequencies repeated over both halves."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), -1)
    return angles.sin(), angles.cos()


def apply_rotary(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of (B, H, L, D) in float32, returned in x's dtype."""
    x32 = x.float()
    first, second = x32.chunk(2, -1)
    return (x32 * cos + torch.cat((-second, first), -1) * sin).to(x.dtype)


class LLaDABlock(nn.Module):
    """Pre-norm bidirectional attention + SwiGLU MLP, parameter names as published."""

    def __init__(self, c: LLaDAConfig):
        super().__init__()
        head_dim = c.d_model // c.n_heads
        qkv_bias = c.include_bias or c.include_qkv_bias
        self.n_heads, self.kv_heads, self.head_dim = c.n_heads, c.kv_heads, head_dim
        self.attn_norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.q_proj = nn.Linear(c.d_model, c.d_model, bias=qkv_bias)
        self.k_proj = nn.Linear(c.d_model, c.kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(c.d_model, c.kv_heads * head_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(c.d_model, c.d_model, bias=c.include_bias)
        self.ff_norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.ff_proj = nn.Linear(c.d_model, c.hidden, bias=c.include_bias)
        self.up_proj = nn.Linear(c.d_model, c.hidden, bias=c.include_bias)
        self.ff_out = nn.Linear(c.hidden, c.d_model, bias=c.include_bias)

    def forward(self, x, sin, cos, key_mask=None):
        b, n, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, sin, cos), apply_rotary(k, sin, cos)
        if self.kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.kv_heads, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # no causal mask: bidirectional
        x = x + self.attn_out(att.transpose(1, 2).reshape(b, n, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDAModel(nn.Module):
    """The LLaDA mask predictor: ids (B, L) -> logits (B, L, rows)."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.rows, config.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers))
        self.ln_f = RMSNorm(config.d_model, config.rms_norm_eps)
        if not config.weight_tying:
            self.ff_out = nn.Linear(config.d_model, config.rows, bias=config.include_bias)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`attention_mask` (B, L), 1 = attend: padding keys are ignored (our addition; LLaDA has none)."""
        c = self.config
        x = self.wte(ids)
        if c.input_emb_norm:
            x = x * c.d_model**0.5
        sin, cos = rotary(ids.shape[1], c.d_model // c.n_heads, c.rope_theta, ids.device)
        key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for block in self.blocks:
            x = block(x, sin, cos, key_mask)
        x = self.ln_f(x)
        logits = F.linear(x, self.wte.weight) if c.weight_tying else self.ff_out(x)
        if c.scale_logits:
            logits = logits * (1 / math.sqrt(c.d_model))
        return logits


def published_name(ours: str) -> str:
    """The checkpoint's name of one of our parameters."""
    return PREFIX + ours


def published_state_dict(model: LLaDAModel) -> dict[str, torch.Tensor]:
    """Our weights under the published names (what a LLaDA checkpoint's safetensors hold)."""
    return {published_name(k): v for k, v in model.state_dict().items()}


def read_weights(path: Path, model: LLaDAModel) -> dict[str, torch.Tensor]:
    """Our state dict from the checkpoint's safetensors (one file or an index of shards), names mapped."""
    from safetensors.torch import load_file

    _check_weights(path)
    wanted = {published_name(k): k for k in model.state_dict()}
    state, unexpected = {}, []
    for shard in sorted(path.glob("*.safetensors")):
        for name, tensor in load_file(shard).items():
            if name in wanted:
                state[wanted[name]] = tensor
            else:
                unexpected.append(name)
    missing = sorted(set(wanted) - {published_name(k) for k in state})
    if missing or unexpected:
        raise CheckpointError(f"{path.name}: weights do not match the LLaDA config: missing "
                              f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                              f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    return state


class LLaDALM:
    """A loaded LLaDA: MaskedDenoiser (`logits`, `mask_id`, `vocab_size`, `length`, `forbidden`) + tokenizer."""

    def __init__(self, model: LLaDAModel, tokenizer=None):
        c = model.config
        self.model = model
        self.tokenizer = tokenizer
        self.config = c
        self.mask_id = c.mask_token_id
        self.vocab_size = c.rows
        self.length = c.max_sequence_length
        self.eos_id = c.eos_token_id
        # Only the mask can never be generated: LLaDA-Instruct fills the answer's tail with EOS / EOT.
        self.forbidden = (self.mask_id, *range(c.vocab_size, c.rows))
        self.device = next(model.parameters()).device

    def logits(self, tokens: torch.Tensor, cond=None) -> torch.Tensor:
        """(B, L) ids -> (B, L, V) float32 logits on the CPU; `cond` is unused (the prompt is in tokens)."""
        with torch.inference_mode():
            return self.model(tokens.to(self.device)).float().cpu()

    def logits_call(self, tokens: torch.Tensor, cond=None) -> NetworkCall:
        """The network call of `logits`: calls of other lengths join it right-padded (models/padded.py)."""
        return padded_logits_call(self.padded_logits, tokens, self.mask_id)

    def padded_logits(self, tokens: PaddedTokens) -> torch.Tensor:
        mask = tokens.key_mask()
        with torch.inference_mode():
            out = self.model(tokens.ids.to(self.device), None if mask is None else mask.to(self.device))
        return out.float().cpu()

    def prompt_ids(self, prompt: str) -> list[int]:
        """A user prompt's ids: through the chat template when the tokenizer has one (LLaDA-Instruct), else
        the plain text (the base model continues it)."""
        if self._tok().chat_template:
            return self.chat_ids([{"role": "user", "content": prompt}])
        return self.encode(prompt)

    def encode(self, text: str) -> list[int]:
        return self._tok().encode(text, add_special_tokens=False)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Prompt ids for chat messages through the tokenizer's chat template (LLaDA-Instruct)."""
        tok = self._tok()
        if not tok.chat_template:
            raise CheckpointError("this LLaDA checkpoint's tokenizer has no chat template")
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        """Text of generated ids, stopping at the first EOS (LLaDA pads its answer with EOS)."""
        ids = [int(i) for i in ids]
        if self.eos_id is not None and self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self._tok().decode(ids, skip_special_tokens=True)

    def _tok(self):
        if self.tokenizer is None:
            raise CheckpointError("this LLaDA checkpoint has no tokenizer.json")
        return self.tokenizer


def load_tokenizer(path: Path):
    """The fast tokenizer from tokenizer.json + tokenizer_config.json, or None; never an auto_map class."""
    from transformers import PreTrainedTokenizerFast

    if not (path / "tokenizer.json").is_file():
        return None
    return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)


def load_llada(path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LLaDALM:
    """Load a LLaDA checkpoint directory (config.json + safetensors [+ tokenizer]); no checkpoint code runs."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path.name}: no config.json")
    config = read_config(path)
    with torch.device("meta"):
        model = LLaDAModel(config)
    model.load_state_dict(read_weights(path, model), assign=True)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return LLaDALM(model, load_tokenizer(path))


def save_llada(model: LLaDAModel, path: str | Path, *, extra_config: dict | None = None) -> None:
    """Write `model` as a LLaDA checkpoint (published config fields and weight names): for tests and benches."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    raw = {"model_type": "llada", "architectures": ["LLaDAModelLM"], **_REQUIRED, **asdict(model.config),
           **(extra_config or {})}
    (path / "config.json").write_text(json.dumps(raw, indent=1))
    save_file({k: v.contiguous() for k, v in published_state_dict(model).items()}, path / "model.safetensors")
