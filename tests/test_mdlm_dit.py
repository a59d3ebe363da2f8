"""MDLM / BD3-LM DiT: published-layout checkpoints load without running their code; the forward equals a
functional re-implementation of MDLM's DiT written here; BD3-LM attention is block-causal and its
blockwise samplers generate left to right."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import samplers.bd3lm  # noqa: F401  (registers block_first_hitting, block_mdlm)
from models.mdlm_dit import DiTConfig, DiTMaskedLM, MDLMDiT, load_mdlm_dit, save_mdlm_dit
from samplers.masked import run_masked_sampler
from samplers.noise import SampleNoise

TINY = DiTConfig(vocab_size=40, model_length=16, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=4)
MASK = 39


def tiny_model(config: DiTConfig = TINY, seed: int = 0) -> MDLMDiT:
    torch.manual_seed(seed)
    model = MDLMDiT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # the published init zeroes adaLN and the output layer: useless for tests
    return model.eval()


def test_loads_published_layout_without_importing_checkpoint_code(tmp_path):
    save_mdlm_dit(tiny_model(), tmp_path, extra_config={"auto_map": {"AutoModelForMaskedLM": "modeling_mdlm.MDLM"}})
    marker = tmp_path / "IMPORTED"
    (tmp_path / "modeling_mdlm.py").write_text(f"open({str(marker)!r}, 'w')\nraise RuntimeError('ran')\n")
    from safetensors.torch import load_file

    names = set(load_file(tmp_path / "model.safetensors"))
    assert {"backbone.vocab_embed.embedding", "backbone.sigma_map.mlp.0.weight", "backbone.sigma_map.mlp.2.bias",
            "backbone.rotary_emb.inv_freq", "backbone.blocks.1.attn_qkv.weight", "backbone.blocks.1.attn_out.weight",
            "backbone.blocks.1.norm1.weight", "backbone.blocks.1.norm2.weight", "backbone.blocks.1.mlp.0.bias",
            "backbone.blocks.1.mlp.2.weight", "backbone.blocks.1.adaLN_modulation.weight",
            "backbone.output_layer.norm_final.weight", "backbone.output_layer.linear.bias",
            "backbone.output_layer.adaLN_modulation.weight"} <= names
    lm = load_mdlm_dit(tmp_path)
    assert not marker.exists()
    ids = torch.randint(0, 39, (2, 16))
    torch.testing.assert_close(lm.logits(ids), tiny_model()(ids), rtol=0, atol=0)
    assert lm.mask_id == MASK and lm.forbidden == (MASK,) and lm.length == 16


def reference_dit(params: dict, c: DiTConfig, ids: torch.Tensor) -> torch.Tensor:
    """MDLM's DiT forward from its description: sigma = 0, adaLN blocks, rotary on the first/second half."""
    def lin(x, name, bias=True):
        return x @ params[name + ".weight"].T + (params[name + ".bias"] if bias else 0)

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:]) * params[name + ".weight"]

    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    t_emb = torch.cat([torch.cos(0 * freqs), torch.sin(0 * freqs)])[None].repeat(len(ids), 1)
    cond = F.silu(lin(F.silu(lin(t_emb, "sigma_map.mlp.0")), "sigma_map.mlp.2"))
    x = params["vocab_embed.embedding"][ids]
    n, d, h = ids.shape[1], c.hidden_dim, c.n_heads
    dh = d // h
    theta = torch.arange(n)[:, None] * (1.0 / 10000 ** (torch.arange(0, dh, 2) / dh))[None]  # (n, dh/2)
    cos, sin = theta.cos(), theta.sin()

    def rope(t):  # t: (B, n, h, dh); pairs (i, i + dh/2) rotate by theta_i
        a, b = t[..., :dh // 2], t[..., dh // 2:]
        cs, sn = cos[None, :, None], sin[None, :, None]
        return torch.cat([a * cs - b * sn, b * cs + a * sn], -1)

    for i in range(c.n_blocks):
        p = f"blocks.{i}."
        mod = lin(cond, p + "adaLN_modulation")[:, None]
        s1, k1, g1, s2, k2, g2 = mod.chunk(6, -1)
        qkv = lin(ln(x, p + "norm1") * (1 + k1) + s1, p + "attn_qkv", bias=False).view(len(ids), n, 3, h, dh)
        q, k, v = rope(qkv[:, :, 0]), rope(qkv[:, :, 1]), qkv[:, :, 2]
        w = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh), -1)
        att = torch.einsum("bhqk,bkhd->bqhd", w, v).reshape(len(ids), n, d)
        x = x + g1 * lin(att, p + "attn_out", bias=False)
        hidden = ln(x, p + "norm2") * (1 + k2) + s2
        x = x + g2 * lin(F.gelu(lin(hidden, p + "mlp.0"), approximate="tanh"), p + "mlp.2")
    shift, scale = lin(cond, "output_layer.adaLN_modulation")[:, None].chunk(2, -1)
    return lin(ln(x, "output_layer.norm_final") * (1 + scale) + shift, "output_layer.linear")


def test_forward_equals_a_functional_reimplementation():
    model = tiny_model()
    ids = torch.randint(0, 39, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference_dit(dict(model.state_dict()), TINY, ids),
                                   rtol=1e-4, atol=1e-4)


def test_bd3lm_attention_is_block_causal_and_mdlm_is_not(tmp_path):
    bd3 = DiTConfig(**{**TINY.__dict__, "block_size": 4})
    save_mdlm_dit(tiny_model(bd3), tmp_path, model_type="bd3lm")
    lm = load_mdlm_dit(tmp_path)
    assert lm.block_size == 4
    ids = torch.randint(0, 39, (1, 16))
    later = ids.clone()
    later[0, 9] = (later[0, 9] + 1) % 39
    a, b = lm.logits(ids), lm.logits(later)
    assert torch.equal(a[0, :8], b[0, :8]) and not torch.allclose(a[0, 8:], b[0, 8:])
    full = tiny_model()
    assert not torch.allclose(full(ids)[0, :8], full(later)[0, :8])
    raw = json.loads((tmp_path / "config.json").read_text()) | {"model_type": "gpt2"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    from models.masked_lm import CheckpointError

    with pytest.raises(CheckpointError, match="model_type"):
        load_mdlm_dit(tmp_path)


@pytest.mark.parametrize("name, steps", [("block_first_hitting", None), ("block_mdlm", 8)])
def test_block_samplers_generate_left_to_right(name, steps):
    lm = DiTMaskedLM(tiny_model(DiTConfig(**{**TINY.__dict__, "block_size": 4})))
    long, nfe = run_masked_sampler(name, lm, torch.full((2, 16), MASK), steps=steps and 2 * steps,
                                   noise=SampleNoise([5, 6]))
    short, _ = run_masked_sampler(name, lm, torch.full((2, 8), MASK), steps=steps, noise=SampleNoise([5, 6]))
    assert not (long == MASK).any() and torch.equal(long[:, :8], short)  # later blocks never reach earlier ones
    if name == "block_first_hitting":
        assert nfe == 16


@pytest.mark.parametrize("name, steps", [("first_hitting", None), ("mdlm", 8)])
def test_fhs_and_mdlm_run_on_the_dit(name, steps):
    lm = DiTMaskedLM(tiny_model())
    out, _ = run_masked_sampler(name, lm, torch.full((2, 16), MASK), steps=steps, noise=SampleNoise([0, 1]))
    assert not (out == MASK).any()


def test_load_text_diffusion_dispatches_on_model_type(tmp_path):
    from models.diffusion_lms import family_of, load_text_diffusion
    from models.llada import LLaDAConfig, LLaDALM, LLaDAModel, save_llada

    save_mdlm_dit(tiny_model(DiTConfig(**{**TINY.__dict__, "block_size": 4})), tmp_path / "bd3", model_type="bd3lm")
    save_llada(LLaDAModel(LLaDAConfig(d_model=16, n_layers=1, n_heads=2, vocab_size=20, mask_token_id=19)),
               tmp_path / "llada")
    assert family_of(tmp_path / "bd3").default_sampler == "block_first_hitting"
    assert isinstance(load_text_diffusion(tmp_path / "bd3"), DiTMaskedLM)
    assert isinstance(load_text_diffusion(tmp_path / "llada"), LLaDALM)
    assert family_of(tmp_path / "llada").kind == "masked"
