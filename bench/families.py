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

import argparse
import json
import resource
import sys
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


def _full_sd3():
    """SD3-medium's public component configs with random weights, built once in memory (T5-XXL dropped:
    diffusers then feeds zeros in its place, as for a pipeline saved without it).  Returns (diffusers
    pipeline, our pipeline) over the SAME modules: nothing is loaded twice."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from models.pipelines import sd3
    from models.pipelines.schedule import map_schedule

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                        caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                        pos_embed_max_size=192).eval()
    clip = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=514, eos_token_id=515, pad_token_id=515)
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                        num_attention_heads=12, projection_dim=768,
                                                        hidden_act="quick_gelu", **clip)).eval()
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                        num_attention_heads=20, projection_dim=1280,
                                                        hidden_act="gelu", **clip)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, sample_size=1024,
                        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=1.5305,
                        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False).eval()
    with tempfile.TemporaryDirectory() as tok:
        tokenizer = fx.clip_tokenizer(Path(tok), max_length=77)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    for module in (transformer, clip_l, clip_g, vae):
        module.requires_grad_(False)
    theirs = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip_l,
                                      tokenizer=tokenizer, text_encoder_2=clip_g, tokenizer_2=tokenizer,
                                      text_encoder_3=None, tokenizer_3=None)
    theirs.set_progress_bar_config(disable=True)
    schedule = map_schedule(dict(scheduler.config, _class_name=type(scheduler).__name__), "sd3-full")
    ours = sd3.assemble("sd3-full", schedule, dict(theirs.components), torch.float32)
    return theirs, ours


def _request(family: str, ours, height: int, width: int, steps: int, latents, guidance=4.0) -> PipelineRequest:
    sampler = "euler" if family in ("sd3", "flux", "sdxl") else "dpmpp_2m"
    if family == "dit":
        return PipelineRequest(seeds=[0, 1], class_labels=[3, 917], steps=steps, sampler=sampler, guidance=4.0,
                               latents=latents)
    guidance = guidance if family != "flux" else 1.0
    return PipelineRequest(seeds=list(range(len(latents))), prompts=PROMPTS[: len(latents)], height=height,
                           width=width, steps=steps, sampler=sampler, guidance=guidance, latents=latents,
                           distilled_guidance=3.5 if family == "flux" else None)


def _theirs_call(family: str, theirs, height: int, width: int, steps: int, latents, guidance=4.0):
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
    return theirs(latents=latents.clone(), guidance_scale=guidance, **kw).images


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


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return min(times)


def _row(family: str, config: str, quick: bool, work: Path) -> dict:
    directory = work / f"{family}-{config}"
    guidance, first_is_s1 = 4.0, False
    if (family, config) == ("sd3", "full"):
        # ~2.5 TFLOP per forward on one thread: no CFG, and the first (warm-up) runs are the S1 timings
        (theirs, ours), guidance, first_is_s1 = _full_sd3(), 1.0, True
    else:
        theirs = _full_sd15(directory) if config == "full" else _tiny(family, directory)
        ours = load_pipeline(directory, f"{family}-{config}")
    height, width = (512, 512) if config == "full" else ((16, 16) if family == "dit" else (32, 24))
    n = 1 if config == "full" else 2
    shape = ours.latent_shape(height, width)
    latents = torch.randn(n, *shape, generator=torch.Generator().manual_seed(2))
    s1, s2 = ((1, 2) if first_is_s1 else (1, 3)) if config == "full" else ((2, 6) if quick else (4, 12))
    reps = 1 if config == "full" else (2 if quick else 4)

    def run_ours(steps):
        if ours.text is not None:
            ours.text.cache._rows.clear()
        return _drive_timed(ours, _request(family, ours, height, width, steps, latents, guidance))

    def run_theirs(steps):
        return _theirs_call(family, theirs, height, width, steps, latents, guidance)

    def ours_t(steps):
        return _best(lambda: run_ours(steps), reps)

    def theirs_t(steps):
        return _best(lambda: run_theirs(steps), reps)

    images, stages = run_ours(s1)  # warm-up, and the uncached stage times
    t0 = CLOCK()
    expected = run_theirs(s1)
    theirs_first = CLOCK() - t0
    diff = float((images / 2 + 0.5 - expected).abs().max())
    _log(f"{family} {config}: S1 runs done, max|diff| {diff:.2e}, ours {stages['total']:.1f} s, "
         f"diffusers {theirs_first:.1f} s")
    ours_s1 = stages["total"] if first_is_s1 else ours_t(s1)
    ours_step = (ours_t(s2) - ours_s1) / (s2 - s1)
    _log(f"{family} {config}: ours {ours_step:.2f} s/step")
    theirs_s1 = theirs_first if first_is_s1 else theirs_t(s1)
    theirs_step = (theirs_t(s2) - theirs_s1) / (s2 - s1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"family": family, "config": config, "height": height, "width": width, "steps": s2,
            "ours_s_per_step": round(ours_step, 5), "diffusers_s_per_step": round(theirs_step, 5),
            "encode_s": round(stages["encode"], 5), "decode_s": round(stages["decode"], 5),
            "peak_gib": round(peak, 3), "max_abs_diff": diff}


ROWS = [(f, "tiny") for f in ("sd", "sdxl", "sd3", "flux", "dit", "pixart")] + [("sd", "full"), ("sd3", "full")]
RESULT = Path(__file__).resolve().parent / "results" / "families.json"


def main(quick: bool = False, argv=None) -> dict:
    """All rows (`--quick`: the tiny ones), or only `--rows sd3-full,...`, merged into the last full result
    (bench/results/families.json: rows of the same family and config are replaced, the others kept)."""
    import diffusers
    import transformers

    parser = argparse.ArgumentParser(prog="python -m bench families")
    parser.add_argument("--rows", default=None, help="comma-separated FAMILY-CONFIG rows, e.g. sd3-full")
    args = parser.parse_args(argv or [])
    if args.rows:
        plan = [tuple(r.split("-", 1)) for r in args.rows.split(",")]
        unknown = [r for r in plan if r not in ROWS]
        if unknown:
            parser.error(f"--rows: unknown rows {unknown}; known: {['-'.join(r) for r in ROWS]}")
    else:
        plan = [r for r in ROWS if r[1] == "tiny" or not quick]
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as work:
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
    if args.rows and RESULT.is_file():
        new = {(r["family"], r["config"]) for r in rows}
        kept = [r for r in json.loads(RESULT.read_text())["rows"] if (r["family"], r["config"]) not in new]
        rows = [r for key in ROWS for r in kept + rows if (r["family"], r["config"]) == key]
    return {"rows": rows}
