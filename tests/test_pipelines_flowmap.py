"""Flow-map checkpoints (diffusers' AnyFlow convention) served one frame at a time by our `meanflow` sampler.

A tiny random AnyFlowPipeline (AnyFlowTransformer3DModel with its second time embedding, UMT5, AutoencoderKLWan)
is saved as safetensors and loaded through models/pipelines; our request machine runs `meanflow` over the
scheduler's shifted times.  The reference is written here from the MeanFlow / flow-map update
z_r = z_t - (t - r) u(z_t, r, t) over diffusers' own modules; diffusers' pipeline itself (num_frames = 1) is
compared too."""

import json

import pytest
import torch

from models.diffusers_loader import UnsupportedConfig
from models.pipelines import detect_family, load_pipeline
from models.pipelines.generate import PipelineRequest, generate
from samplers.errors import InvalidRequest
from tests.pipeline_fixtures import load_served, tiny_anyflow

H, W = 32, 48  # latents (16, 4, 6)
PROMPTS = ["a cat", "a dog on abc"]


@pytest.fixture(scope="module", params=["r", "t-r"])
def both(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("anyflow") / "anyflow"
    theirs = tiny_anyflow(directory, deltatime_type=request.param)  # the saved weights, in memory (diffusers'
    theirs.set_progress_bar_config(disable=True)  # from_pretrained of this class needs `accelerate`)
    return directory, theirs, load_pipeline(directory, "tiny-flowmap")


def _latents(n=2):
    return torch.randn(n, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(3))


def _reference(theirs, latents, steps, guidance, negative=""):
    """MeanFlow / flow-map sampling written out: times = shift(linspace(1, 0, N + 1)) with the last set to 0,
    u from the transformer at (1000 t, 1000 r), z_r = z_t - (t - r) u, CFG on u; then the Wan VAE decode."""
    shift = theirs.scheduler.config.shift
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    times = torch.cat([shift * s / (1 + (shift - 1) * s), torch.zeros(1, dtype=torch.float64)])
    with torch.no_grad():
        cond, neg = theirs.encode_prompt(PROMPTS, negative_prompt=[negative] * 2, do_classifier_free_guidance=True,
                                         max_sequence_length=512)
        z = latents.clone()
        for t, r in zip(times[:-1], times[1:], strict=True):
            def u_at(embeds, z=z, t=t, r=r):
                stamp = torch.full((z.shape[0], 1), 1000 * float(t), dtype=torch.float64)
                r_stamp = torch.full((z.shape[0], 1), 1000 * float(r), dtype=torch.float64)
                return theirs.transformer(hidden_states=z.unsqueeze(1), timestep=stamp, r_timestep=r_stamp,
                                          encoder_hidden_states=embeds).sample[:, 0]
            u = u_at(cond) if guidance == 1.0 else u_at(neg) + guidance * (u_at(cond) - u_at(neg))
            z = z - (t - r).float() * u
        vae = theirs.vae
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        video = vae.decode(z.unsqueeze(2) * std + mean).sample
    return (video[:, :, 0] / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_meanflow_equals_the_flow_map_update(both, steps, guidance):
    _, theirs, ours = both
    latents = _latents()
    expected = _reference(theirs, latents, steps, guidance)
    result = generate(ours, PipelineRequest(seeds=[0, 1], prompts=PROMPTS, height=H, width=W, steps=steps,
                                            sampler="meanflow", guidance=guidance, latents=latents))
    assert result.nfe == steps and result.images.shape == (2, 3, H, W)
    assert (result.images / 2 + 0.5 - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("guidance,negative", [(1.0, None), (3.0, "b dog")])
def test_meanflow_equals_the_anyflow_pipeline_on_one_frame(both, guidance, negative):
    _, theirs, ours = both
    latents = _latents()
    expected = theirs(prompt=PROMPTS, negative_prompt=negative, height=H, width=W, num_frames=1,
                      num_inference_steps=2, guidance_scale=guidance, latents=latents.unsqueeze(2).clone(),
                      output_type="pt").frames[:, 0]
    result = generate(ours, PipelineRequest(seeds=[0, 1], prompts=PROMPTS, negative_prompts=negative, height=H,
                                            width=W, steps=2, sampler="meanflow", guidance=guidance,
                                            latents=latents))
    assert (result.images / 2 + 0.5 - expected).abs().max().item() <= 1e-4


def test_family_kind_and_description(both):
    directory, _, ours = both
    assert detect_family(directory) == "flowmap"
    info = ours.describe()
    assert (info["family"], info["kind"], info["takes_prompt"], info["default_guidance"]) == ("flowmap", "meanflow",
                                                                                              True, 1.0)
    assert info["size_multiple"] == 16 and info["latent_channels"] == 16


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_other_samplers_are_refused(both, sampler):
    _, _, ours = both
    with pytest.raises(InvalidRequest, match="sampler"):
        generate(ours, PipelineRequest(seeds=[0], prompts=["a"], height=H, width=W, steps=2, sampler=sampler))


def test_a_sample_depends_only_on_its_seed(both):
    _, _, ours = both
    req = dict(height=H, width=W, steps=2, sampler="meanflow", guidance=2.0)
    alone = generate(ours, PipelineRequest(seeds=[11], prompts=["a cat"], **req)).images
    batch = generate(ours, PipelineRequest(seeds=[5, 11], prompts=["a dog", "a cat"], **req)).images
    assert torch.allclose(batch[1], alone[0], atol=1e-5) and not torch.allclose(batch[0], alone[0], atol=1e-3)


def test_unmapped_scheduler_field_and_image_conditioning_are_refused(tmp_path):
    directory = tmp_path / "anyflow"
    tiny_anyflow(directory)
    path = directory / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(dict(config, use_dynamic_shifting=True)))
    with pytest.raises(UnsupportedConfig, match="model 'fm': scheduler config field 'use_dynamic_shifting'"):
        load_pipeline(directory, "fm")
    path.write_text(json.dumps(config))
    tpath = directory / "transformer" / "config.json"
    tpath.write_text(json.dumps(dict(json.loads(tpath.read_text()), image_dim=8)))
    with pytest.raises(UnsupportedConfig, match="model 'fm': transformer config field 'image_dim'"):
        load_pipeline(directory, "fm")


def test_served_over_grpc_equals_the_library(tmp_path):
    import numpy as np

    from server.client import tensor_to_array
    from tests.server_fixtures import pb, running_server, stub_for

    tiny_anyflow(tmp_path / "fm")
    loaded = load_served(tmp_path, "fm", "fm", default_sampler="meanflow", default_steps=2)
    with running_server({"fm": loaded}) as server:
        stub, channel = stub_for(server)
        out = stub.Generate(pb.GenerateRequest(model="fm", prompt="a cat", height=H, width=W, steps=2,
                                               num_samples=2, base_seed=3, sampler="meanflow", format=pb.TENSOR))
        channel.close()
    images = np.stack([tensor_to_array(s.tensor) for s in out.samples])
    direct = generate(loaded.model, PipelineRequest(seeds=[3, 4], prompts="a cat", height=H, width=W, steps=2,
                                                    sampler="meanflow"))
    assert images.shape == (2, 3, H, W) and out.nfe == 2
    assert float(np.abs(images - direct.images.numpy()).max()) < 1e-5


def test_sizes_beyond_the_rotary_table_are_refused(both):
    _, _, ours = both  # rope_max_seq_len 32 tokens x patch 2 x VAE 8 = 512 pixels
    assert ours.default_size == (512, 512)
    with pytest.raises(InvalidRequest, match="width: 528 exceeds 512"):
        generate(ours, PipelineRequest(seeds=[0], prompts=["a"], height=H, width=528, steps=1, sampler="meanflow"))
