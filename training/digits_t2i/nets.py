"""The four components of digits-t2i, built from diffusers / transformers configs (Stable Diffusion layout)."""

from __future__ import annotations

from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from training.digits_t2i.data import MAX_LENGTH

IMAGE_SIZE = 16
LATENT_CHANNELS = 4
TEXT_DIM = 64


def build_vae(quick: bool = False) -> AutoencoderKL:
    """16x16x1 <-> 8x8x4: one downsampling stage."""
    ch = (16, 32) if quick else (32, 64)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=ch,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def build_text_encoder(tokenizer, quick: bool = False) -> CLIPTextModel:
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=2 * TEXT_DIM,
        num_hidden_layers=1 if quick else 2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(cfg)


def build_unet(quick: bool = False, width: int = 32) -> UNet2DConditionModel:
    """8x8x4 latents, cross-attention to the text states at 8x8 and 4x4 and in the middle block."""
    ch = (16, 32) if quick else (width, 2 * width)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=ch,
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def scheduler_config() -> dict:
    """DDPM's linear betas (1e-4..0.02, 1000 steps; near-zero terminal SNR suits 256-d latents), eps prediction."""
    return dict(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="epsilon",
        steps_offset=1,  # what StableDiffusionPipeline rewrites it to; unused by "linspace" spacing
    )


def build_scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(**scheduler_config(), algorithm_type="dpmsolver++", solver_order=2)
