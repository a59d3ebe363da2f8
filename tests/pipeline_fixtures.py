"""Tiny random-weight pipelines of the real diffusers / transformers classes, saved as safetensors.

Scaled-down configs in the manner of diffusers' own fast tests; the CLIP tokenizer is a byte-level BPE
with a handful of merges written to disk here (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

PROMPTS = ["abc a cat", "a dog on abc"]


def clip_tokenizer(directory: Path, max_length: int = 16):
    """A byte-level CLIP BPE tokenizer with 516 tokens (bos 514, eos/pad 515)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    directory.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    for token in ("ab", "abc</w>", "<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\na b\nab c</w>\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_length)


def clip_text_config(projection: int | None = None, hidden: int = 32, layers: int = 2):
    from transformers import CLIPTextConfig

    extra = {} if projection is None else {"projection_dim": projection}
    return CLIPTextConfig(bos_token_id=514, eos_token_id=515, pad_token_id=515, hidden_size=hidden,
                          intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4,
                          num_hidden_layers=layers, vocab_size=516, max_position_embeddings=16, **extra)


def tiny_vae(latent_channels: int = 4, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 8], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=latent_channels, norm_num_groups=2, layers_per_block=1, **kw)


def tiny_sd(directory: Path, scheduler=None, seed: int = 0, prediction_type: str = "epsilon"):
    """A StableDiffusionPipeline with a 2-level UNet (cross-attention 32), a 2-layer CLIP and a 2x VAE."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=4, attention_head_dim=4)
    scheduler = scheduler or PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           skip_prk_steps=True, steps_offset=1, prediction_type=prediction_type,
                                           set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(unet=unet.eval(), scheduler=scheduler, vae=tiny_vae().eval(),
                                   text_encoder=CLIPTextModel(clip_text_config()).eval(),
                                   tokenizer=clip_tokenizer(directory / "_tok"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(directory, safe_serialization=True)
    _public_scheduler_fields(directory)
    return pipe


def _public_scheduler_fields(directory: Path) -> None:
    """Write `clip_sample: false` as SD 1.x's public scheduler config does (DDIM defaults it to true)."""
    path = directory / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config.setdefault("clip_sample", False)
    path.write_text(json.dumps(config, indent=2))
