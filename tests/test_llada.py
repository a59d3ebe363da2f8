"""LLaDA: our module loads published-format checkpoints without running their code; the sampler matches
LLaDA's generation algorithm (written independently here from the paper's description) token for token."""

from __future__ import annotations

import json

import pytest
import torch

import samplers.llada  # noqa: F401  (registers llada, llada_random)
from models.llada import LLaDAConfig, LLaDAModel, load_llada, save_llada
from samplers.errors import InvalidRequest
from samplers.masked import masked_sampler_machine, run_masked_sampler
from samplers.noise import SampleNoise

MASK = 49
TINY = LLaDAConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=48, vocab_size=50,
                   embedding_size=50, max_sequence_length=64, rope_theta=10000.0, mask_token_id=MASK,
                   eos_token_id=1, pad_token_id=1)


def tiny_model(config: LLaDAConfig = TINY, seed: int = 0) -> LLaDAModel:
    torch.manual_seed(seed)
    model = LLaDAModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # larger than default init: sharper, more varied logits
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llada")
    save_llada(tiny_model(), path, extra_config={"auto_map": {"AutoModel": "modeling_llada.LLaDAModelLM",
                                                             "AutoConfig": "configuration_llada.LLaDAConfig"}})
    marker = path / "IMPORTED"
    for name in ("modeling_llada.py", "configuration_llada.py", "__init__.py"):
        code = f"open({str(marker)!r}, 'w').write('ran')\nraise RuntimeError('checkpoint code ran')\n"
        (path / name).write_text(code)
    return path


def test_published_weight_names_are_what_we_write():
    names = set(LLaDAModel(TINY).state_dict())
    published = {"model.transformer." + n for n in names}
    layer0 = {f"model.transformer.blocks.0.{m}.weight" for m in
              ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out")}
    top = {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"}
    assert layer0 | top <= published and len(published) == 3 + 9 * TINY.n_layers


def test_loads_without_importing_checkpoint_code(checkpoint):
    lm = load_llada(checkpoint)
    assert not (checkpoint / "IMPORTED").exists()
    ids = torch.randint(0, 49, (2, 12))
    torch.testing.assert_close(lm.logits(ids), tiny_model()(ids), rtol=0, atol=0)
    assert lm.mask_id == MASK and lm.vocab_size == 50 and lm.length == 64 and MASK in lm.forbidden


def test_refuses_pickles_and_other_architectures(tmp_path, checkpoint):
    from models.masked_lm import CheckpointError

    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        load_llada(tmp_path)
    raw = json.loads((checkpoint / "config.json").read_text()) | {"block_type": "sequential"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="block_type"):
        load_llada(tmp_path)


def test_attention_is_bidirectional_and_grouped_heads_work():
    model = tiny_model(LLaDAConfig(**{**TINY.__dict__, "n_kv_heads": 2}))
    ids = torch.randint(0, 49, (1, 10))
    later = ids.clone()
    later[0, -1] = (later[0, -1] + 1) % 49
    assert not torch.allclose(model(ids)[0, 0], model(later)[0, 0])  # position 0 sees the last token


def test_forward_equals_transformers_llama_without_the_causal_mask():
    """An independent implementation of the same network: transformers' Llama, causal mask removed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = tiny_model(LLaDAConfig(**{**TINY.__dict__, "n_kv_heads": 2}))
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50, max_position_embeddings=64, rope_theta=10000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    llama = LlamaForCausalLM(config).eval()
    state = {"model.embed_tokens.weight": ours.wte.weight, "model.norm.weight": ours.ln_f.weight,
             "lm_head.weight": ours.ff_out.weight}
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm", "self_attn.q_proj": "q_proj",
             "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out",
             "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out"}
    for i, block in enumerate(ours.blocks):
        state |= {f"model.layers.{i}.{theirs}.weight": getattr(block, mine).weight for theirs, mine in names.items()}
    llama.load_state_dict(state)
    for layer in llama.model.layers:
        layer.self_attn.is_causal = False
    ids = torch.randint(0, 49, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), llama(input_ids=ids, attention_mask=torch.zeros(2, 1, 12, 12)).logits,
                                   rtol=1e-5, atol=1e-5)


# --- LLaDA's generation algorithm, written from the paper (Sec. 2.4, App. B) as plain loops, batch of one ---

def reference_generate(logits_fn, prompt, gen_length, steps, block_length, temperature, cfg_scale, remasking,
                       generator):
    """Semi-AR low-confidence / random remasking: one sequence, the randomness drawn from `generator`."""
    p_len = len(prompt)
    x = torch.full((1, p_len + gen_length), MASK, dtype=torch.long)
    x[0, :p_len] = torch.tensor(prompt)
    prompt_index = x != MASK
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for nb in range(num_blocks):
        lo, hi = p_len + nb * block_length, p_len + (nb + 1) * block_length
        n = int((x[0, lo:hi] == MASK).sum())
        counts = [n // steps_per_block + (1 if i < n % steps_per_block else 0) for i in range(steps_per_block)]
        for i in range(steps_per_block):
            mask_index = x == MASK
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = MASK
                both = logits_fn(torch.cat([x, un_x]))
                logits = both[1:] + (cfg_scale + 1) * (both[:1] - both[1:])
            else:
                logits = logits_fn(x)
            if temperature > 0:
                u = torch.ones(logits.shape, dtype=torch.float64)
                u[0, lo:hi] = torch.rand((block_length, logits.shape[-1]), generator=generator, dtype=torch.float64)
                x0 = (logits.double().exp() / (-torch.log(u)) ** temperature).argmax(-1)
            else:
                x0 = logits.argmax(-1)
            if remasking == "low_confidence":
                p = torch.softmax(logits.double(), -1)
                x0_p = p.gather(-1, x0[..., None])[..., 0]
            else:
                x0_p = torch.zeros(x.shape, dtype=torch.float64)
                x0_p[0, lo:hi] = torch.rand((block_length,), generator=generator, dtype=torch.float64)
            x0_p[:, hi:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            _, select = torch.topk(confidence[0], k=counts[i])
            x[0, select] = x0[0, select]
    return x[0]


@pytest.mark.parametrize("name, temperature, cfg_scale, block_length, steps", [
    ("llada", 0.0, 0.0, 8, 16),      # greedy, two blocks, two tokens per step
    ("llada", 0.0, 0.0, 16, 5),      # one block, uneven counts (4, 3, 3, 3, 3)
    ("llada", 0.7, 0.0, 4, 8),       # Gumbel-max proposals, four blocks
    ("llada", 1.0, 1.5, 8, 8),       # with LLaDA's CFG
    ("llada_random", 0.5, 0.0, 8, 6),
])
def test_matches_llada_generation_algorithm(name, temperature, cfg_scale, block_length, steps):
    model = tiny_model()
    lm_like = load_like(model)

    def logits_fn(ids):  # the trained LLaDA never predicts the mask; a random one must be told
        with torch.no_grad():
            return model(ids).float().index_fill(-1, torch.tensor([MASK]), -1e9)

    prompts, gen_length, seeds = [[3, 4, 5, 6], [7, 8, 9, 10]], 16, [11, 12]
    tokens = torch.tensor([p + [MASK] * gen_length for p in prompts])
    ours, nfe = run_masked_sampler(name, lm_like, tokens, steps=steps, noise=SampleNoise(seeds),
                                   options={"block_length": block_length, "cfg_scale": cfg_scale,
                                            "temperature": temperature})
    remasking = "random" if name == "llada_random" else "low_confidence"
    for row, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        ref = reference_generate(logits_fn, prompt, gen_length, steps, block_length, temperature, cfg_scale,
                                 remasking, torch.Generator().manual_seed(seed))
        assert torch.equal(ours[row], ref)
    assert nfe == steps and not (ours == MASK).any()


def test_sample_is_the_same_alone_or_in_a_batch_and_machine_yields_one_call_per_step():
    lm = load_like(tiny_model())
    tokens = torch.tensor([[3, 4] + [MASK] * 8] * 3)
    opts = {"block_length": 4, "temperature": 1.0, "cfg_scale": 0.5}
    batch, _ = run_masked_sampler("llada", lm, tokens, steps=4, noise=SampleNoise([1, 2, 3]), options=opts)
    alone, _ = run_masked_sampler("llada", lm, tokens[1:2], steps=4, noise=SampleNoise([2]), options=opts)
    assert torch.equal(batch[1], alone[0])
    machine = masked_sampler_machine("llada", lm, tokens, steps=4, noise=SampleNoise([1, 2, 3]), options=opts)
    calls = 0
    try:
        call = next(machine)
        while True:
            assert call.args[0].ids.shape == (6, 10)  # conditional and unconditional rows in one call
            calls += 1
            call = machine.send(call.run())
    except StopIteration as stop:
        assert torch.equal(stop.value[0], batch)
    assert calls == 4


def test_invalid_layouts_are_refused():
    lm = load_like(tiny_model())
    noise = SampleNoise([0])
    with pytest.raises(InvalidRequest, match="multiple of block_length"):
        run_masked_sampler("llada", lm, torch.tensor([[3] + [MASK] * 10]), steps=10, noise=noise,
                           options={"block_length": 4})
    with pytest.raises(InvalidRequest, match="number of blocks"):
        run_masked_sampler("llada", lm, torch.tensor([[3] + [MASK] * 8]), steps=3, noise=noise,
                           options={"block_length": 4})
    with pytest.raises(InvalidRequest, match="prompt followed by"):
        run_masked_sampler("llada", lm, torch.tensor([[MASK, 3] + [MASK] * 8]), steps=2, noise=noise,
                           options={"block_length": 4})


@pytest.mark.parametrize("name, steps", [("first_hitting", None), ("mdlm", 6)])
def test_mdlm_and_fhs_apply_to_llada_and_keep_the_prompt(name, steps):
    lm = load_like(tiny_model())
    tokens = torch.tensor([[3, 4, 5] + [MASK] * 6] * 2)
    out, _ = run_masked_sampler(name, lm, tokens, steps=steps, noise=SampleNoise([0, 1]))
    assert torch.equal(out[:, :3], tokens[:, :3]) and not (out == MASK).any()


def load_like(model: LLaDAModel):
    from models.llada import LLaDALM

    return LLaDALM(model)


def test_tokenizer_chat_template_and_decode_stop_at_eos(tmp_path):
    from models.diffusion_gemma import word_tokenizer

    save_llada(tiny_model(), tmp_path)
    word_tokenizer(50).save_pretrained(tmp_path)  # tokenizer.json + tokenizer_config.json with a chat template
    lm = load_llada(tmp_path)
    ids = lm.chat_ids([{"role": "user", "content": "w1 w2"}])
    assert ids == [4, 5] and lm.encode("w3") == [6]
    assert lm.decode([6, 7, 1, 8, 1]) == "w3 w4"  # everything after the first EOS (id 1) is padding
