"""DiffusionGemma (transformers' native `DiffusionGemmaForBlockDiffusion`) as a block-diffusion model.

The class ships with transformers (>= 5.24 here), so the checkpoint loads with no remote code: safetensors only,
`local_files_only=True`. The network conditions a bidirectional decoder over a canvas of `canvas_length`
tokens on a causal encoding of the context (prompt + earlier canvases) and on the previous step's logits
(self-conditioning); `canvas_logits` is that one forward, returning soft-capped float32 logits over the canvas.
Unlike diffusers' pipeline, which keeps a per-request KV cache of the context, each call here re-encodes the
context: a call is then a pure function of per-sample tensors, so calls of different requests batch into one
forward (at the price of encoder work proportional to the context on every step).
Prompts go through the checkpoint's processor (or tokenizer) chat template.
"""

from __future__ import annotations

from pathlib import Path

import torch

from samplers.calls import NetworkCall

from .masked_lm import CheckpointError, _check_weights
from .padded import PaddedTokens


class DiffusionGemmaLM:
    """A loaded DiffusionGemma with its processor: the `canvas_logits` contract of samplers/block_diffusion.py."""

    def __init__(self, model, processor=None):
        text = model.config.get_text_config()
        self.model = model
        self.processor = processor
        self.canvas_length = int(model.config.canvas_length)
        self.vocab_size = int(text.vocab_size)
        self.length = int(text.max_position_embeddings)
        eos = text.eos_token_id
        self.eos_id = eos[0] if isinstance(eos, list) else eos
        self.pad_id = int(text.pad_token_id) if text.pad_token_id is not None else 0
        self.device = next(model.parameters()).device

    def canvas_logits(self, context: torch.Tensor, canvas: torch.Tensor, sc_logits: torch.Tensor,
                      sc_mask: torch.Tensor) -> torch.Tensor:
        """(B, P) context, (B, C) canvas, (B, C, V) previous logits, (B,) which rows have them -> (B, C, V)."""
        dev = self.device
        p = context.shape[1]
        positions = torch.arange(p, p + canvas.shape[1], device=dev)[None].expand(len(canvas), -1)
        with torch.inference_mode():
            out = self.model(input_ids=context.to(dev), attention_mask=torch.ones_like(context, device=dev),
                             decoder_input_ids=canvas.to(dev), self_conditioning_logits=sc_logits.to(dev),
                             self_conditioning_mask=sc_mask.to(dev), decoder_position_ids=positions)
        return out.logits.float().cpu()

    def canvas_call(self, context: torch.Tensor, canvas: torch.Tensor, sc_logits: torch.Tensor,
                    sc_mask: torch.Tensor) -> NetworkCall:
        """The network call of `canvas_logits`: calls with other context lengths join it left-padded."""
        return NetworkCall(self.padded_canvas_logits,
                           (PaddedTokens.of(context, self.pad_id, left=True), canvas, sc_logits, sc_mask))

    def padded_canvas_logits(self, context: PaddedTokens, canvas: torch.Tensor, sc_logits: torch.Tensor,
                             sc_mask: torch.Tensor) -> torch.Tensor:
        """`canvas_logits` over left-padded contexts: padded keys masked in the encoder and the decoder, each
        row's positions shifted so its real tokens sit where they would alone."""
        keys = context.key_mask()
        if keys is None:
            return self.canvas_logits(context.ids, canvas, sc_logits, sc_mask)
        dev, width = self.device, context.ids.shape[1]
        shift = (width - context.lengths)[:, None]
        positions = (torch.arange(width)[None] - shift).clamp(min=0)
        canvas_positions = context.lengths[:, None] + torch.arange(canvas.shape[1])[None]
        decoder_keys = torch.cat([keys, torch.ones_like(canvas, dtype=torch.bool)], 1)
        with torch.inference_mode():
            out = self.model(input_ids=context.ids.to(dev), attention_mask=keys.long().to(dev),
                             position_ids=positions.to(dev), decoder_input_ids=canvas.to(dev),
                             self_conditioning_logits=sc_logits.to(dev), self_conditioning_mask=sc_mask.to(dev),
                             decoder_attention_mask=decoder_keys.to(dev), decoder_position_ids=canvas_positions.to(dev))
        return out.logits.float().cpu()

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Prompt ids of a chat through the processor's chat template, with the generation prompt."""
        if self.processor is None:
            raise CheckpointError("this DiffusionGemma checkpoint has no processor / tokenizer")
        enc = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True, return_tensors="pt")
        return enc["input_ids"][0].tolist()

    def prompt_ids(self, prompt: str) -> list[int]:
        """A user prompt's ids: through the chat template when the processor has one, else the plain text
        (with the tokenizer's special tokens, BOS for Gemma)."""
        if self.processor is None:
            raise CheckpointError("this DiffusionGemma checkpoint has no processor / tokenizer")
        if getattr(self.processor, "chat_template", None):
            return self.chat_ids([{"role": "user", "content": prompt}])
        return list(self._tokenizer()(prompt, add_special_tokens=True)["input_ids"])

    def _tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def decode(self, ids) -> str:
        """Text up to (not including) the first EOS."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self._tokenizer().decode(ids, skip_special_tokens=True)


def load_diffusion_gemma(path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32
                         ) -> DiffusionGemmaLM:
    """Load a DiffusionGemma checkpoint directory: transformers' own class, safetensors only, no remote code."""
    from transformers import AutoProcessor, AutoTokenizer, DiffusionGemmaForBlockDiffusion

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path.name}: no config.json")
    _check_weights(path)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                            trust_remote_code=False, dtype=dtype).to(device)
    model.eval().requires_grad_(False)
    processor = None
    for loader in (AutoProcessor, AutoTokenizer):
        try:
            processor = loader.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            break
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return DiffusionGemmaLM(model, processor)


def random_diffusion_gemma(*, vocab_size: int, hidden_size: int, layers: int, canvas_length: int, seed: int = 0,
                           std: float = 0.05):
    """A random-weight DiffusionGemma of the published layout (sliding + full layers, MoE, tiny vision tower):
    for tests and benchmarks, where no checkpoint can be downloaded."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, Gemma4VisionConfig
    from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaTextConfig

    heads = max(1, hidden_size // 32)
    text = DiffusionGemmaTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=1, head_dim=32, global_head_dim=32, sliding_window=64,
        layer_types=(["sliding_attention"] * (layers - 1)) + ["full_attention"], num_experts=2, top_k_experts=1,
        moe_intermediate_size=hidden_size, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1,
        bos_token_id=2)
    vision = Gemma4VisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
                                num_key_value_heads=1)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(text_config=text, vision_config=vision,
                                                                 canvas_length=canvas_length))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and "scale" not in name:
                p.normal_(0, std)
    return model.eval().requires_grad_(False)


def word_tokenizer(vocab_size: int):
    """A word-level fast tokenizer over ids <pad>=0, <eos>=1, <bos>=2, w0.. with a plain chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>"] + [f"w{i}" for i in range(vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}")
