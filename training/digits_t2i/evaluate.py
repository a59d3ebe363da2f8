"""Evaluation of digits-t2i through diffusers' own StableDiffusionPipeline on the saved directory."""

from __future__ import annotations

from pathlib import Path

import torch

from training.digits_t2i._compat import Logger

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.0


def load_pipeline(path: Path):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    seeds: list[int],
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    negative: str | None = None,
    chunk: int = 500,
) -> torch.Tensor:
    """Images (N, 1, 16, 16) in [-1, 1]; sample k depends only on (prompt k, seed k)."""
    outs = []
    for i in range(0, len(prompts), chunk):
        ps = prompts[i : i + chunk]
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + chunk]]
        img = pipe(
            ps,
            negative_prompt=None if negative is None else [negative] * len(ps),
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="pt",
        ).images
        outs.append(img * 2 - 1)
    return torch.cat(outs)


def run(out: Path, quick: bool, log: Logger) -> dict:
    pipe = load_pipeline(out)
    if quick:
        x = generate(pipe, ["a bold seven", ""], [0, 1], steps=2)
        log(f"quick check: generated {tuple(x.shape)}, finite {bool(torch.isfinite(x).all())}")
        return {"shape": list(x.shape)}
    raise NotImplementedError
