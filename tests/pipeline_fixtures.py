"""Tiny random-weight pipelines of the real diffusers / transformers classes, saved as safetensors.

Scaled-down configs in the manner of diffusers' own fast tests; the CLIP tokenizer is a byte-level BPE
with a handful of merges written to disk here (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

PROMPTS = ["abc a cat", "a dog on abc"]


def load_served(root: Path, name: str, directory: str, **fields):
    """The model root/models.toml with one entry (`name` -> root/`directory`, plus `fields`) loads, as the
    server and the CLI load it."""
    from models.config import load_config
    from models.loading import load_model

    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items())
    path = Path(root) / "models.toml"
    path.write_text(f'model_roots = ["."]\n[[models]]\nname = "{name}"\ndirectory = "{directory}"\n{extra}')
    return load_model(load_config(path)[name])


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


def tiny_sd3(directory: Path, seed: int = 0, shift: float = 3.0, t5: bool = False):
    """A StableDiffusion3Pipeline, without T5 (diffusers then feeds zeros) unless `t5`: 1 layer, patch 2."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=64, pooled_projection_dim=64, out_channels=4)
    vae = AutoencoderKL(block_out_channels=[8, 8], in_channels=3, out_channels=3, layers_per_block=1,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae.eval(),
        text_encoder=CLIPTextModelWithProjection(clip_text_config(projection=32)).eval(),
        tokenizer=clip_tokenizer(directory / "_tok"),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(projection=32)).eval(),
        tokenizer_2=clip_tokenizer(directory / "_tok2"), text_encoder_3=tiny_t5(64) if t5 else None,
        tokenizer_3=t5_tokenizer() if t5 else None)
    pipe.save_pretrained(directory, safe_serialization=True)
    return pipe


def t5_tokenizer():
    """A unigram T5 tokenizer over letters and a few words (pad 0, eos 1, unk 2)."""
    from transformers import T5Tokenizer

    words = ["a", "cat", "dog", "on", "abc", "b"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab += [("▁", -2.0)] + [("▁" + w, -0.5) for w in words]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5(width: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=40, d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0)).eval()


def tiny_flux(directory: Path, seed: int = 0, guidance_embeds: bool = True):
    """A FluxPipeline (dev-style with guidance_embeds, or schnell-style without): 1 + 1 blocks."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance_embeds)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    pipe = FluxPipeline(transformer=transformer.eval(), scheduler=scheduler,
                        vae=tiny_vae(latent_channels=4, use_quant_conv=False, use_post_quant_conv=False,
                                     shift_factor=0.0609, scaling_factor=1.5035).eval(),
                        text_encoder=CLIPTextModel(clip_text_config()).eval(),
                        tokenizer=clip_tokenizer(directory / "_tok"), text_encoder_2=tiny_t5(),
                        tokenizer_2=t5_tokenizer())
    pipe.save_pretrained(directory, safe_serialization=True)
    return pipe


def tiny_sdxl(directory: Path, seed: int = 0, force_zeros: bool = True):
    """A StableDiffusionXLPipeline: text_time added embeddings (6 time ids x 8 + pooled 32)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
                                cross_attention_dim=64, norm_num_groups=4)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        unet=unet.eval(), scheduler=scheduler, vae=tiny_vae(scaling_factor=0.13025).eval(),
        text_encoder=CLIPTextModel(clip_text_config()).eval(), tokenizer=clip_tokenizer(directory / "_tok"),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(projection=32)).eval(),
        tokenizer_2=clip_tokenizer(directory / "_tok2"), force_zeros_for_empty_prompt=force_zeros)
    pipe.save_pretrained(directory, safe_serialization=True)
    return pipe


def tiny_dit(directory: Path, seed: int = 0):
    """A DiTPipeline: 2-layer DiTTransformer2DModel with learned sigma (8 output channels), 1000 classes."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                        num_attention_heads=2, in_channels=4, out_channels=8,
                                        activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                        norm_type="ada_norm_zero", norm_elementwise_affine=False)
    pipe = DiTPipeline(transformer=transformer.eval(), vae=tiny_vae().eval(),
                       scheduler=DDIMScheduler(clip_sample=False))
    pipe.save_pretrained(directory, safe_serialization=True)
    return pipe


def tiny_pixart(directory: Path, seed: int = 0, sample_size: int = 8):
    """A PixArtSigmaPipeline: 2-layer PixArtTransformer2DModel (learned sigma) over a tiny T5 (sample size 32:
    diffusers' 256 aspect-ratio bins apply)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(sample_size=sample_size, num_layers=2, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=3, caption_channels=32, in_channels=4,
                                           cross_attention_dim=24, out_channels=8, attention_bias=True,
                                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False,
                                           norm_eps=1e-6)
    pipe = PixArtSigmaPipeline(transformer=transformer.eval(), vae=tiny_vae().eval(), text_encoder=tiny_t5(),
                               tokenizer=t5_tokenizer(), scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(directory, safe_serialization=True)
    return pipe


def tiny_anyflow(directory: Path, seed: int = 0, shift: float = 3.0, deltatime_type: str = "r"):
    """An AnyFlowPipeline (flow-map): 2-layer AnyFlowTransformer3DModel, tiny UMT5 and AutoencoderKLWan (8x)."""
    from diffusers import AnyFlowPipeline, AnyFlowTransformer3DModel, AutoencoderKLWan, FlowMapEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    transformer = AnyFlowTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                            in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                            num_layers=2, rope_max_seq_len=32, deltatime_type=deltatime_type)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    text = UMT5EncoderModel(UMT5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                       relative_attention_num_buckets=8))
    pipe = AnyFlowPipeline(tokenizer=t5_tokenizer(), text_encoder=text.eval(), transformer=transformer.eval(),
                           vae=vae.eval(), scheduler=FlowMapEulerDiscreteScheduler(shift=shift))
    pipe.save_pretrained(directory, safe_serialization=True)
    return pipe
