"""Stable Diffusion 1.x / 2.x through models/pipelines against diffusers' StableDiffusionPipeline.

A tiny random-weight pipeline of the real classes (UNet2DConditionModel, CLIPTextModel, AutoencoderKL) is
saved as safetensors, loaded through our loader and through diffusers, and both generate from the same
initial latents with the same scheduler convention at a non-square size."""

import json
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from models.diffusers_loader import UnsupportedConfig
from models.pipelines import detect_family, load_pipeline
from models.pipelines.generate import PipelineRequest, generate, generate_machine
from models.safety import UnsafeCheckpoint
from tests.pipeline_fixtures import PROMPTS, tiny_sd

SCHEDULERS = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}
H, W, STEPS = 32, 24, 6


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def both(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param) / "sd"
    tiny_sd(directory, prediction_type=request.param)
    theirs = StableDiffusionPipeline.from_pretrained(directory, local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    return directory, theirs, load_pipeline(directory, "tiny-sd")


def _latents(n=2):
    return torch.randn(n, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("sampler", sorted(SCHEDULERS))
@pytest.mark.parametrize("guidance,negative", [(1.0, None), (5.0, None), (5.0, ["a dog", "b"])])
def test_images_equal_diffusers(both, sampler, guidance, negative):
    _, theirs, ours = both
    theirs.scheduler = SCHEDULERS[sampler].from_config(theirs.scheduler.config)
    latents = _latents()
    expected = theirs(prompt=PROMPTS, negative_prompt=negative, height=H, width=W, num_inference_steps=STEPS,
                      guidance_scale=guidance, latents=latents.clone(), output_type="pt").images
    result = generate(ours, PipelineRequest(seeds=[0, 1], prompts=PROMPTS, negative_prompts=negative, height=H,
                                            width=W, steps=STEPS, sampler=sampler, guidance=guidance,
                                            latents=latents))
    assert result.images.shape == (2, 3, H, W)
    assert result.nfe == STEPS
    assert (result.images / 2 + 0.5 - expected).abs().max().item() <= 1e-4


def test_the_machine_yields_encoder_denoiser_and_decoder_calls(both):
    _, _, ours = both
    ours.text.cache._rows.clear()
    machine = generate_machine(ours, PipelineRequest(seeds=[3], prompts=["abc"], height=H, width=W, steps=3,
                                                     sampler="euler", guidance=3.0))
    networks, call = [], next(machine)
    try:
        while True:
            networks.append(call.network)
            call = machine.send(call.run())
    except StopIteration as stop:
        result = stop.value
    assert networks[0] is ours.text.encode and networks[-1] is ours.decoder
    assert all(net is ours.denoiser.net for net in networks[1:-1]) and len(networks) == 5
    assert result.images.shape == (1, 3, H, W) and result.seeds == (3,)
    # the prompt and the empty negative prompt are now cached: a second request encodes nothing
    again = generate_machine(ours, PipelineRequest(seeds=[4], prompts=["abc"], height=H, width=W, steps=3,
                                                   sampler="euler", guidance=3.0))
    assert next(again).network is ours.denoiser.net


def test_a_sample_depends_only_on_its_seed_and_prompt(both):
    _, _, ours = both
    req = dict(height=H, width=W, steps=3, sampler="dpmpp_2m", guidance=4.0)
    alone = generate(ours, PipelineRequest(seeds=[11], prompts=["a cat"], **req)).images
    batch = generate(ours, PipelineRequest(seeds=[5, 11], prompts=["a dog", "a cat"], **req)).images
    assert torch.allclose(batch[1], alone[0], atol=1e-5)
    assert not torch.allclose(batch[0], alone[0], atol=1e-3)


def test_family_is_detected_and_sizes_are_checked(both):
    directory, _, ours = both
    assert detect_family(directory) == "sd"
    with pytest.raises(Exception, match="height"):
        generate(ours, PipelineRequest(seeds=[0], prompts=["a"], height=33, width=W, steps=2))
    with pytest.raises(Exception, match="prompt"):
        generate(ours, PipelineRequest(seeds=[0], height=H, width=W, steps=2))


def _copy(both, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(both[0], target)
    return target


def test_pickle_only_component_is_refused_naming_it(both, tmp_path):
    directory = _copy(both, tmp_path)
    weights = next((directory / "vae").glob("*.safetensors"))
    weights.rename(directory / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeCheckpoint, match="component 'vae'"):
        load_pipeline(directory, "tiny-sd")


def test_unsupported_component_class_is_refused_naming_it(both, tmp_path):
    directory = _copy(both, tmp_path)
    index = json.loads((directory / "model_index.json").read_text())
    index["unet"] = ["my_module", "MyUNet"]
    (directory / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedConfig, match="component 'unet' has class 'MyUNet'"):
        load_pipeline(directory, "tiny-sd")


def test_unknown_pipeline_class_is_refused(both, tmp_path):
    directory = _copy(both, tmp_path)
    index = json.loads((directory / "model_index.json").read_text())
    index["_class_name"] = "MyCustomPipeline"
    (directory / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedConfig, match="MyCustomPipeline"):
        detect_family(directory)


def _lockstep(machines):
    """A minimal engine loop: every round, group pending calls by server.layout's batch key, run one forward
    per group, hand each machine its rows.  Returns (results, forward passes)."""
    from server.layout import batch_key, concat, rows, split

    pending = {i: next(m) for i, m in enumerate(machines)}
    results, forwards = {}, 0
    while pending:
        groups = {}
        for i, call in pending.items():
            groups.setdefault(batch_key(call), []).append(i)
        for members in groups.values():
            calls = [pending[i] for i in members]
            out = calls[0].network(*concat([c.args for c in calls]))
            forwards += 1
            for i, part in zip(members, split(out, [rows(c) for c in calls]), strict=True):
                try:
                    pending[i] = machines[i].send(pending[i].complete(part))
                except StopIteration as stop:
                    results[i] = stop.value
                    del pending[i]
    return [results[i] for i in range(len(machines))], forwards


def test_requests_with_different_prompts_share_forward_passes(both):
    _, _, ours = both
    ours.text.cache._rows.clear()
    common = dict(height=H, width=W, steps=4, sampler="dpmpp_2m", guidance=4.0)
    requests = [PipelineRequest(seeds=[1], prompts=["a cat"], negative_prompts=["b"], **common),
                PipelineRequest(seeds=[2, 3], prompts=["a dog on abc"], **common)]
    (first, second), forwards = _lockstep([generate_machine(ours, r) for r in requests])
    assert forwards == 1 + 4 + 1  # one text-encoder pass, one per step, one VAE pass, for both requests
    ours.text.cache._rows.clear()
    assert torch.allclose(first.images, generate(ours, requests[0]).images, atol=1e-5)
    assert torch.allclose(second.images, generate(ours, requests[1]).images, atol=1e-5)


def test_fp16_weight_variants_load_in_float16(tmp_path):
    directory = tmp_path / "sd16"
    pipe = tiny_sd(directory / "_build")
    pipe.to(torch.float16).save_pretrained(directory, safe_serialization=True, variant="fp16")
    assert not list((directory / "unet").glob("diffusion_pytorch_model.safetensors"))
    ours = load_pipeline(directory, "tiny-sd-fp16", dtype="float16")
    assert ours.decoder.vae.config.force_upcast  # AutoencoderKL's default: the float16 VAE decodes in float32
    assert next(ours.decoder.vae.parameters()).dtype == torch.float32 and ours.decoder.dtype == torch.float32
    result = generate(ours, PipelineRequest(seeds=[0], prompts=["a cat"], height=H, width=W, steps=2,
                                            guidance=3.0))
    assert result.images.dtype == torch.float32 and torch.isfinite(result.images).all()


def test_the_prompt_cache_is_bounded():
    from models.pipelines.common import EmbeddingCache

    cache = EmbeddingCache(size=2)
    for prompt in ("a", "b", "a", "c"):
        cache.put(prompt, {"x": torch.zeros(1)})
    assert len(cache) == 2 and cache.get("b") is None and cache.get("a") is not None


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_guidance_rescale_equals_diffusers(both, sampler):
    """guidance_rescale 0.7 (Lin et al. 2024): diffusers rescales the guided eps / v to the conditional std."""
    _, theirs, ours = both
    theirs.scheduler = SCHEDULERS[sampler].from_config(theirs.scheduler.config)
    latents = _latents()
    kw = dict(height=H, width=W, num_inference_steps=STEPS, guidance_scale=7.0)
    expected = theirs(prompt=PROMPTS, negative_prompt=["a dog", "b"], latents=latents.clone(), output_type="pt",
                      guidance_rescale=0.7, **kw).images
    plain = theirs(prompt=PROMPTS, negative_prompt=["a dog", "b"], latents=latents.clone(), output_type="pt",
                   **kw).images
    result = generate(ours, PipelineRequest(seeds=[0, 1], prompts=PROMPTS, negative_prompts=["a dog", "b"], height=H,
                                            width=W, steps=STEPS, sampler=sampler, guidance=7.0, latents=latents,
                                            guidance_rescale=0.7))
    assert (result.images / 2 + 0.5 - expected).abs().max().item() <= 1e-4
    assert (plain - expected).abs().max().item() > 1e-3  # the rescale changes the images


@pytest.mark.parametrize("value,match", [(1.5, r"\[0, 1\]"), ("x", r"\[0, 1\]"), (True, r"\[0, 1\]")])
def test_bad_guidance_rescale_is_refused(both, value, match):
    from samplers.errors import InvalidRequest

    _, _, ours = both
    with pytest.raises(InvalidRequest, match=f"guidance_rescale: .*{match}"):
        generate(ours, PipelineRequest(seeds=[0], prompts=["a"], height=H, width=W, steps=2, guidance=5.0,
                                       guidance_rescale=value))
    with pytest.raises(InvalidRequest, match="guidance_rescale: needs classifier-free guidance"):
        generate(ours, PipelineRequest(seeds=[0], prompts=["a"], height=H, width=W, steps=2, guidance=1.0,
                                       guidance_rescale=0.5))
