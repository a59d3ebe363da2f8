"""Families: latent pipelines (SD, SDXL, SD3, FLUX, DiT, PixArt-Sigma) through models/pipelines vs diffusers.

Each row builds a random-weight pipeline of the real diffusers / transformers classes (tiny configs from
tests/pipeline_fixtures.py; `full` rows: SD 1.5's public config at 512x512), saves it as safetensors, loads it
through our loader and through diffusers' own pipeline, and measures on one torch thread, in CPU seconds of
the process (time.process_time: wall time on an idle machine, and immune to other jobs on a shared one):

- seconds per denoising step, ours (the request step machine driven in this thread, with its samplers and
  guidance wrapper) and diffusers' pipeline (same components, same scheduler), each as
  (T(S2 steps) - T(S1 steps)) / (S2 - S1) of whole requests (best of the repetitions), so text encoding,
  decoding and set-up cancel;
- our text-encode and VAE-decode stage times (one uncached request, from the network calls' timings);
- peak resident memory of the process (GiB, cumulative over the run: the full row dominates it);
- max |ours - diffusers| over the decoded images in [0, 1] from the same initial latents.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import torch

from models.pipelines import load_pipeline
from models.pipelines.generate import PipelineRequest, generate_machine
from tests import pipeline_fixtures as fx

PROMPTS = ["abc a cat", "a dog on abc"]
THREADS = 1
# CPU seconds of this process: with one torch thread they equal wall time on an idle machine, and unlike
# wall time they do not count the time other jobs on a shared box hold the cores.
CLOCK = time.process_time


def _tiny(family: str, directory: Path):
    """(diffusers pipeline, sampler, kwargs for the diffusers call) for a tiny family row."""
    import diffusers

    build = {"sd": fx.tiny_sd, "sdxl": fx.tiny_sdxl, "sd3": fx.tiny_sd3, "flux": fx.tiny_flux,
             "dit": fx.tiny_dit, "pixart": fx.tiny_pixart}[family]
    build(directory)
    cls = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
           "flux": "FluxPipeline", "dit": "DiTPipeline", "pixart": "PixArtSigmaPipeline"}[family]
    extra = {"sd3": dict(text_encoder_3=None, tokenizer_3=None, image_encoder=None, feature_extractor=None),
             "flux": dict(image_encoder=None, feature_extractor=None),
             "sdxl": dict(image_encoder=None, feature_extractor=None)}.get(family, {})
    theirs = getattr(diffusers, cls).from_pretrained(directory, local_files_only=True, **extra)
    theirs.set_progress_bar_config(disable=True)
    return theirs


def _full_sd15(directory: Path):
    """SD 1.5's public component configs (values written here, random weights), PNDM's public scheduler."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", bos_token_id=514, eos_token_id=515,
                                        pad_token_id=515))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(),
                                   tokenizer=fx.clip_tokenizer(directory / "_tok", max_length=77),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(directory, safe_serialization=True)
    fx._public_scheduler_fields(directory)
    del pipe, unet, vae, text
    theirs = StableDiffusionPipeline.from_pretrained(directory, local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    return theirs


def _request(family: str, ours, height: int, width: int, steps: int, latents) -> PipelineRequest:
    sampler = "euler" if family in ("sd3", "flux", "sdxl") else "dpmpp_2m"
    if family == "dit":
        return PipelineRequest(seeds=[0, 1], class_labels=[3, 917], steps=steps, sampler=sampler, guidance=4.0,
                               latents=latents)
    guidance = 4.0 if family != "flux" else 1.0
    return PipelineRequest(seeds=list(range(len(latents))), prompts=PROMPTS[: len(latents)], height=height,
                           width=width, steps=steps, sampler=sampler, guidance=guidance, latents=latents,
                           distilled_guidance=3.5 if family == "flux" else None)


def _theirs_call(family: str, theirs, height: int, width: int, steps: int, latents):
    from diffusers import DPMSolverMultistepScheduler

    if family in ("sd", "dit", "pixart"):
        theirs.scheduler = DPMSolverMultistepScheduler.from_config(theirs.scheduler.config)
    if family == "dit":
        return theirs(class_labels=[3, 917], guidance_scale=4.0, num_inference_steps=steps,
                      generator=torch.Generator().manual_seed(2), output_type="pt").images
    kw = dict(prompt=PROMPTS[: len(latents)], height=height, width=width, num_inference_steps=steps,
              output_type="pt")
    if family == "flux":
        from models.pipelines.flux import pack

        return theirs(latents=pack(latents.clone()), guidance_scale=3.5, **kw).images
    if family == "pixart":
        kw.update(use_resolution_binning=False, clean_caption=False)
    return theirs(latents=latents.clone(), guidance_scale=4.0, **kw).images


def _drive_timed(ours, request) -> tuple[torch.Tensor, dict[str, float]]:
    """Drive our request machine in this thread, timing each stage's network calls."""
    stages = {"encode": 0.0, "decode": 0.0}
    machine = generate_machine(ours, request)
    start = CLOCK()
    try:
        call = next(machine)
        while True:
            t0 = CLOCK()
            out = call.run()
            stage = "encode" if ours.text is not None and call.network is ours.text.encode else \
                "decode" if call.network is ours.decoder else None
            if stage:
                stages[stage] += CLOCK() - t0
            call = machine.send(out)
    except StopIteration as stop:
        stages["total"] = CLOCK() - start
        return stop.value.images, stages


def _best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return min(times)


def _row(family: str, config: str, quick: bool, work: Path) -> dict:
    directory = work / f"{family}-{config}"
    theirs = _full_sd15(directory) if config == "full" else _tiny(family, directory)
    ours = load_pipeline(directory, f"{family}-{config}")
    height, width = (512, 512) if config == "full" else ((16, 16) if family == "dit" else (32, 24))
    n = 1 if config == "full" else 2
    shape = ours.latent_shape(height, width)
    latents = torch.randn(n, *shape, generator=torch.Generator().manual_seed(2))
    s1, s2 = (1, 3) if config == "full" else ((2, 6) if quick else (4, 12))
    reps = 1 if config == "full" else (2 if quick else 4)

    def run_ours(steps):
        if ours.text is not None:
            ours.text.cache._rows.clear()
        return _drive_timed(ours, _request(family, ours, height, width, steps, latents))

    def ours_t(steps):
        return _best(lambda: run_ours(steps), reps)

    def theirs_t(steps):
        return _best(lambda: _theirs_call(family, theirs, height, width, steps, latents), reps)

    images, stages = run_ours(s1)  # warm-up, and the uncached stage times
    expected = _theirs_call(family, theirs, height, width, s1, latents)
    diff = float((images / 2 + 0.5 - expected).abs().max())
    ours_step = (ours_t(s2) - ours_t(s1)) / (s2 - s1)
    theirs_step = (theirs_t(s2) - theirs_t(s1)) / (s2 - s1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"family": family, "config": config, "height": height, "width": width, "steps": s2,
            "ours_s_per_step": round(ours_step, 5), "diffusers_s_per_step": round(theirs_step, 5),
            "encode_s": round(stages["encode"], 5), "decode_s": round(stages["decode"], 5),
            "peak_gib": round(peak, 3), "max_abs_diff": diff}


def main(quick: bool = False) -> dict:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as work:
            plan = [(f, "tiny") for f in ("sd", "sdxl", "sd3", "flux", "dit", "pixart")]
            if not quick:
                plan.append(("sd", "full"))
            for family, config in plan:
                row = _row(family, config, quick, Path(work))
                rows.append(row)
                print(f"{family:7s} {config:5s} {row['height']:4d}x{row['width']:<4d} "
                      f"ours {row['ours_s_per_step']:.4f} s/step  diffusers {row['diffusers_s_per_step']:.4f} s/step  "
                      f"encode {row['encode_s']:.4f} s  "
                      f"decode {row['decode_s']:.4f} s  peak {row['peak_gib']:.2f} GiB  "
                      f"max|diff| {row['max_abs_diff']:.2e}", flush=True)
    finally:
        torch.set_num_threads(threads)
    return {"rows": rows}
