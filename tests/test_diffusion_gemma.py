"""DiffusionGemma: our canvas samplers (step machines) give diffusers' DiffusionGemmaPipeline's tokens for the same
seed, for block refinement, discrete DDIM and the entropy bound, on a tiny random-weight model."""

from __future__ import annotations

import pytest
import torch

from models.diffusion_gemma import DiffusionGemmaLM, load_diffusion_gemma
from samplers.block_diffusion import block_diffusion_machine, run_block_diffusion
from samplers.errors import InvalidRequest
from samplers.noise import SampleNoise

V, CANVAS = 24, 8


def tiny_model():
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, Gemma4VisionConfig
    from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaTextConfig

    text = DiffusionGemmaTextConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, global_head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], num_experts=2, top_k_experts=1, moe_intermediate_size=32,
        max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    vision = Gemma4VisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
                                num_key_value_heads=1)
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(text_config=text, vision_config=vision,
                                                                 canvas_length=CANVAS)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and "scale" not in name:
                p.normal_(0, 0.5)  # sharper than the default init, so confidences and entropies vary
    return model


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>"] + [f"w{i}" for i in range(V - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}")


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    return model, DiffusionGemmaLM(model, tiny_tokenizer())


def pipeline(model, scheduler, processor):
    """diffusers' pipeline. diffusers 0.42.1 passes `past_key_values=` to the decoder's mask builder, which
    transformers 5.24 renamed `cache` (without a shim there): adapt that one call so the pipeline runs."""
    from diffusers import DiffusionGemmaPipeline

    decoder = type(model.model.decoder)
    build = decoder.__dict__["create_diffusion_decoder_attention_mask"].__func__
    if not getattr(build, "adapted", False):
        def adapted(*, past_key_values=None, cache=None, **kwargs):
            return build(cache=cache if cache is not None else past_key_values, **kwargs)
        adapted.adapted = True
        decoder.create_diffusion_decoder_attention_mask = staticmethod(adapted)
    pipe = DiffusionGemmaPipeline(model=model, scheduler=scheduler, processor=processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = [  # (sampler, scheduler config, our options, pipeline temperature, confidence_threshold)
    ("block_refinement", {}, {"temperature": 0.0}, 0.0, 0.005),
    ("block_refinement", {}, {"temperature": 0.8}, 0.8, 0.005),
    ("block_refinement", {"threshold": 0.3}, {"temperature": 0.8, "threshold": 0.3}, 0.8, 50.0),  # adaptive stop
    ("discrete_ddim", {}, {"temperature": 1.0}, 1.0, 0.005),
    ("entropy_bound", {"entropy_bound": 1.0}, {"entropy_bound": 1.0}, 0.0, 0.005),
]


@pytest.mark.parametrize("name, sched_config, options, temperature, threshold", CASES)
def test_tokens_equal_diffusers_pipeline_for_the_same_seed(setup, name, sched_config, options, temperature,
                                                           threshold):
    from diffusers import BlockRefinementScheduler, DiscreteDDIMScheduler, EntropyBoundScheduler

    model, lm = setup
    scheduler = {"block_refinement": BlockRefinementScheduler, "discrete_ddim": DiscreteDDIMScheduler,
                 "entropy_bound": EntropyBoundScheduler}[name](**sched_config)
    pipe = pipeline(model, scheduler, lm.processor)
    prompt = "w3 w4 w5"
    ids = torch.tensor([lm.chat_ids([{"role": "user", "content": prompt}])] * 3)
    seeds = [0, 1, 7]
    ours, nfe = run_block_diffusion(name, lm, ids, steps=5, noise=SampleNoise(seeds),
                                    options={"gen_length": 24, "confidence_threshold": threshold, **options})
    for row, seed in enumerate(seeds):  # our batch of three = the pipeline run alone on each seed
        ref = pipe(prompt=prompt, gen_length=24, num_inference_steps=5, temperature=temperature,
                   generator=torch.Generator().manual_seed(seed), output_type="seq",
                   confidence_threshold=threshold).sequences[0]
        assert torch.equal(ours[row, 3:3 + len(ref)], ref)
        assert (ours[row, 3 + len(ref):] == lm.eos_id).all()  # stopped after the canvas holding EOS
    assert 1 <= nfe <= 15  # network calls of the batch


def test_machine_batches_rows_and_checks_input(setup):
    _, lm = setup
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    machine = block_diffusion_machine("block_refinement", lm, ids, steps=2, noise=SampleNoise([0, 1]),
                                      options={"gen_length": 8, "confidence_threshold": 0.0})
    call = next(machine)
    assert call.args[0].ids.shape == (2, 3)  # the context, padded when it joins other lengths (models/padded.py)
    assert call.args[1].shape == (2, CANVAS) and call.args[2].shape == (2, CANVAS, V)
    assert not call.args[3].any()  # no self-conditioning on the first step
    call = machine.send(call.run())
    assert call.args[3].all()
    with pytest.raises(InvalidRequest, match="ids must lie"):
        run_block_diffusion("block_refinement", lm, torch.tensor([[3, V]]), steps=2, noise=SampleNoise([0]))
    with pytest.raises(InvalidRequest, match="does not apply"):
        run_block_diffusion("first_hitting", lm, ids, steps=2, noise=SampleNoise([0, 1]))


def test_loads_from_safetensors_without_checkpoint_code(tmp_path, setup):
    model, lm = setup
    model.save_pretrained(tmp_path)
    lm.processor.save_pretrained(tmp_path)
    marker = tmp_path / "IMPORTED"
    (tmp_path / "modeling_diffusion_gemma.py").write_text(f"open({str(marker)!r}, 'w')\nraise RuntimeError\n")
    loaded = load_diffusion_gemma(tmp_path)
    assert not marker.exists() and loaded.canvas_length == CANVAS and loaded.eos_id == 1
    ctx, canvas = torch.tensor([[3, 4, 5]]), torch.randint(0, V, (1, CANVAS))
    sc, has = torch.zeros(1, CANVAS, V), torch.zeros(1, dtype=torch.bool)
    torch.testing.assert_close(loaded.canvas_logits(ctx, canvas, sc, has), lm.canvas_logits(ctx, canvas, sc, has))
    assert loaded.decode([5, 6, 1, 7]) == "w2 w3"
