"""MDLM's and BD3-LM's DiT backbone as a MaskedDenoiser: our module, their published weights, no remote code.

MDLM (Sahoo et al. 2024, arXiv 2406.07524) and BD3-LM (Arriola et al. 2025, arXiv 2503.09573) publish
Hugging Face checkpoints (`kuleshov-group/mdlm-owt`, `kuleshov-group/bd3lm-owt-block_size*`) whose model
class runs only with `trust_remote_code`. The network is a diffusion transformer over tokens:

    x = E[ids]; c = silu(TimestepEmbedder(sigma))             (sigma = 0: the published models ignore time)
    per block: x += gate1 * W_out attn(rotary(W_qkv modulate(LN(x), shift1, scale1)))
               x += gate2 * MLP_gelu_tanh(modulate(LN(x), shift2, scale2))   (shift/scale/gate from adaLN(c))
    logits = linear(modulate(LN(x), shift, scale))

with LN a weight-only LayerNorm computed in float32, modulate(x, s, k) = x (1 + k) + s, rotary in the
rotate-half layout over each head. Attention is bidirectional for MDLM; for BD3-LM it is block-causal
(a block sees itself and the blocks before it), which at sampling time is what its KV cache computes.
config.json fields (MDLMConfig / BD3LMConfig): vocab_size, model_length, hidden_dim, cond_dim, n_blocks,
n_heads, time_conditioning, and for BD3-LM block_size and adaln. Weight names are ours with the prefix
`backbone.` (vocab_embed.embedding, sigma_map.mlp.{0,2}, blocks.{i}.{norm1, attn_qkv, attn_out, norm2,
mlp.{0,2}, adaLN_modulation}, output_layer.{norm_final, linear, adaLN_modulation}); a stored
`rotary_emb.inv_freq` buffer is checked against ours. The mask token is the last id (GPT-2's 50257).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from samplers.calls import NetworkCall

from .masked_lm import CheckpointError, _check_weights
from .padded import PaddedTokens, padded_logits_call

PREFIX = "backbone."
MODEL_TYPES = ("mdlm", "bd3lm")


@dataclass(frozen=True)
class DiTConfig:
    """MDLM-OWT's published architecture by default (GPT-2 vocabulary plus the mask)."""

    vocab_size: int = 50258
    model_length: int = 1024
    hidden_dim: int = 768
    cond_dim: int = 128
    n_blocks: int = 12
    n_heads: int = 12
    time_conditioning: bool = False
    block_size: int | None = None  # BD3-LM: block-causal attention over blocks of this size
    adaln: bool = True
    mask_token_id: int | None = None  # default: vocab_size - 1

    @property
    def mask_id(self) -> int:
        return self.vocab_size - 1 if self.mask_token_id is None else self.mask_token_id


def layer_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.float(), x.shape[-1:]).to(weight.dtype) * weight


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class LayerNormWeight(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return layer_norm(x, self.weight)


class EmbeddingLayer(nn.Module):
    def __init__(self, dim: int, vocab: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab, dim).normal_(0, 0.02))

    def forward(self, ids):
        return self.embedding[ids]


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of sigma (256, cos then sin) -> Linear -> SiLU -> Linear (DiT's t-embedder)."""

    def __init__(self, dim: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, sigma):
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma[:, None].float() * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], -1).to(self.mlp[0].weight.dtype))


class DDiTBlock(nn.Module):
    def __init__(self, c: DiTConfig):
        super().__init__()
        d = c.hidden_dim
        self.n_heads = c.n_heads
        self.norm1 = LayerNormWeight(d)
        self.attn_qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = LayerNormWeight(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        self.adaLN_modulation = nn.Linear(c.cond_dim, 6 * d) if c.adaln else None

    def forward(self, x, c, sin, cos, attn_mask):
        b, n, d = x.shape
        if self.adaLN_modulation is not None:
            shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, -1)
            h = modulate(self.norm1(x), shift1, scale1)
        else:
            h = self.norm1(x)
        q, k, v = self.attn_qkv(h).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, sin, cos), rotate(k, sin, cos)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(b, n, d)
        if self.adaLN_modulation is None:
            x = x + self.attn_out(att)
            return x + self.mlp(self.norm2(x))
        x = x + gate1[:, None] * self.attn_out(att)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


def rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, -1)
    return x * cos + torch.cat((-second, first), -1) * sin


class DDitFinalLayer(nn.Module):
    def __init__(self, c: DiTConfig):
        super().__init__()
        self.norm_final = LayerNormWeight(c.hidden_dim)
        self.linear = nn.Linear(c.hidden_dim, c.vocab_size)
        self.adaLN_modulation = nn.Linear(c.cond_dim, 2 * c.hidden_dim) if c.adaln else None

    def forward(self, x, c):
        if self.adaLN_modulation is None:
            return self.linear(self.norm_final(x))
        shift, scale = self.adaLN_modulation(c).chunk(2, -1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MDLMDiT(nn.Module):
    """The DiT backbone: ids (B, L) and sigma (B,) -> logits (B, L, V)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        head_dim = config.hidden_dim // config.n_heads
        self.vocab_embed = EmbeddingLayer(config.hidden_dim, config.vocab_size)
        self.sigma_map = TimestepEmbedder(config.cond_dim) if config.adaln else None
        self.head_dim = head_dim
        self.blocks = nn.ModuleList(DDiTBlock(config) for _ in range(config.n_blocks))
        self.output_layer = DDitFinalLayer(config)

    def attention_mask(self, n: int, device, key_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """The (L, L) block-causal mask (None: bidirectional), and with `key_mask` (B, L) the padded keys
        hidden too: (B, 1, L, L)."""
        mask = None
        if self.config.block_size is not None:
            block = torch.arange(n, device=device) // self.config.block_size
            mask = block[:, None] >= block[None, :]  # query block >= key block
        if key_mask is None:
            return mask
        keys = key_mask.to(device).bool()[:, None, None, :]
        return keys if mask is None else keys & mask

    def forward(self, ids: torch.Tensor, sigma: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`key_mask` (B, L), True = attend: right-padding is ignored (our addition; the published code has none)."""
        n = ids.shape[1]
        x = self.vocab_embed(ids)
        c = None  # adaln=False (a BD3-LM ablation): no conditioning at all
        if self.sigma_map is not None:
            if sigma is None or not self.config.time_conditioning:
                sigma = torch.zeros(ids.shape[0], device=ids.device)
            c = F.silu(self.sigma_map(sigma))
        positions = torch.arange(n, device=ids.device, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq(self.head_dim).to(ids.device))
        angles = torch.cat((angles, angles), -1)
        sin, cos = angles.sin().to(x.dtype), angles.cos().to(x.dtype)
        mask = self.attention_mask(n, ids.device, key_mask)
        for block in self.blocks:
            x = block(x, c, sin, cos, mask)
        return self.output_layer(x, c)


def inv_freq(head_dim: int) -> torch.Tensor:
    """Rotary frequencies, base 10000, in float32."""
    return 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def read_config(path: Path) -> DiTConfig:
    raw = json.loads((path / "config.json").read_text())
    if raw.get("model_type") not in MODEL_TYPES:
        raise CheckpointError(f"{path.name}: config.json model_type {raw.get('model_type')!r} is not one of "
                              f"{list(MODEL_TYPES)}")
    if raw.get("causal") or raw.get("causal_attention"):
        raise CheckpointError(f"{path.name}: causal (autoregressive) DiT checkpoints are not masked models")
    known = {f.name for f in fields(DiTConfig)}
    config = DiTConfig(**{k: v for k, v in raw.items() if k in known and v is not None})
    if raw["model_type"] == "mdlm" and config.block_size is not None:
        config = DiTConfig(**{**asdict(config), "block_size": None})  # MDLM attends bidirectionally
    if config.hidden_dim % config.n_heads:
        raise CheckpointError(f"{path.name}: hidden_dim {config.hidden_dim} is not divisible by n_heads")
    return config


def read_weights(path: Path, model: MDLMDiT) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    _check_weights(path)
    wanted = {PREFIX + k: k for k in model.state_dict()}
    state, unexpected = {}, []
    for shard in sorted(path.glob("*.safetensors")):
        for name, tensor in load_file(shard).items():
            if name in wanted:
                state[wanted[name]] = tensor
            elif name == PREFIX + "rotary_emb.inv_freq":
                if not torch.allclose(tensor.float(), inv_freq(model.head_dim)):
                    raise CheckpointError(f"{path.name}: rotary_emb.inv_freq differs from base-10000 rotary")
            else:
                unexpected.append(name)
    missing = sorted(set(wanted) - {PREFIX + k for k in state})
    if missing or unexpected:
        raise CheckpointError(f"{path.name}: weights do not match the DiT config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    return state


class DiTMaskedLM:
    """A loaded MDLM / BD3-LM backbone as a MaskedDenoiser (time-agnostic: sigma = 0), plus its tokenizer."""

    def __init__(self, model: MDLMDiT, tokenizer=None):
        c = model.config
        self.model = model
        self.tokenizer = tokenizer
        self.mask_id = c.mask_id
        self.vocab_size = c.vocab_size
        self.length = c.model_length
        self.block_size = c.block_size
        self.forbidden = (c.mask_id,)  # SUBS: the mask is never predicted; EOS is a real token in OWT
        self.device = next(model.parameters()).device

    def logits(self, tokens: torch.Tensor, cond=None) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(tokens.to(self.device)).float().cpu()

    def logits_call(self, tokens: torch.Tensor, cond=None) -> NetworkCall:
        """The network call of `logits`: calls of other lengths join it right-padded (models/padded.py)."""
        return padded_logits_call(self.padded_logits, tokens, self.mask_id)

    def padded_logits(self, tokens: PaddedTokens) -> torch.Tensor:
        mask = tokens.key_mask()
        with torch.inference_mode():
            return self.model(tokens.ids.to(self.device), key_mask=mask).float().cpu()

    @property
    def eos_id(self) -> int | None:
        return getattr(self.tokenizer, "eos_token_id", None)

    def encode(self, text: str) -> list[int]:
        return self._tok().encode(text, add_special_tokens=False)

    def prompt_ids(self, prompt: str) -> list[int]:
        """A prompt's ids: MDLM / BD3-LM are not chat models, so the plain text after BOS (their sequences
        start with it), which the answer continues."""
        bos = getattr(self._tok(), "bos_token_id", None)
        return ([bos] if bos is not None else []) + self.encode(prompt)

    def decode(self, ids) -> str:
        """Text of ids after any leading BOS, stopping at the first EOS (end of text).  GPT-2's tokenizer
        (MDLM-OWT) uses one id for both, and a sample often starts with it: that one opens the text."""
        ids = [int(i) for i in ids]
        bos = getattr(self.tokenizer, "bos_token_id", None)
        while bos is not None and ids and ids[0] == bos:
            ids = ids[1:]
        if self.eos_id is not None and self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self._tok().decode(ids)

    def _tok(self):
        if self.tokenizer is None:
            raise CheckpointError("this MDLM / BD3-LM checkpoint has no tokenizer.json")
        return self.tokenizer


def load_mdlm_dit(path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> DiTMaskedLM:
    """Load an MDLM / BD3-LM Hugging Face checkpoint directory (safetensors only; its .py files never run)."""
    from .llada import load_tokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path.name}: no config.json")
    config = read_config(path)
    with torch.device("meta"):
        model = MDLMDiT(config)
    state = read_weights(path, model)
    model.load_state_dict(state, assign=True)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return DiTMaskedLM(model, load_tokenizer(path))


def save_mdlm_dit(model: MDLMDiT, path: str | Path, *, model_type: str = "mdlm", extra_config: dict | None = None
                  ) -> None:
    """Write `model` in the published layout (config.json + backbone.* safetensors): for tests and benches."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    raw = {"model_type": model_type, "architectures": ["MDLM" if model_type == "mdlm" else "BD3LM"],
           **{k: v for k, v in asdict(model.config).items() if v is not None}, **(extra_config or {})}
    (path / "config.json").write_text(json.dumps(raw, indent=1))
    state = {PREFIX + k: v.contiguous() for k, v in model.state_dict().items()}
    state[PREFIX + "rotary_emb.inv_freq"] = inv_freq(model.head_dim)
    save_file(state, path / "model.safetensors")
