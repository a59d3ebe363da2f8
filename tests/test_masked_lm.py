"""Loading Hugging Face masked LMs (safetensors only) and the text-mdm corpus, evaluator and zoo model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from models.masked_lm import CheckpointError, load_masked_lm
from samplers.masked import MaskedDenoiser, all_masked, run_masked_sampler
from samplers.noise import SampleNoise
from training import text_data, text_eval

ZOO = Path(__file__).resolve().parents[1] / "zoo" / "text-mdm"
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran"]


def tiny_bert(path: Path, *, mask_token: str | None = "[MASK]", vocab_pad: int = 3) -> torch.nn.Module:
    """A random 2-layer BertForMaskedLM and a word-level tokenizer, saved to `path` (safetensors)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    if mask_token:
        specials["mask_token"] = mask_token
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=16, **specials)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab) + vocab_pad, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    model = BertForMaskedLM(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def test_a_saved_bert_loads_as_a_masked_denoiser(tmp_path):
    original = tiny_bert(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    lm = load_masked_lm(tmp_path)
    assert isinstance(lm, MaskedDenoiser)
    assert lm.mask_id == 4 and lm.length == 16 and lm.vocab_size == 16
    assert lm.forbidden == (0, 1, 2, 3, 4, 13, 14, 15)  # specials and the rows past the tokenizer
    tokens = torch.tensor([[2, 4, 6, 4, 3]])
    with torch.no_grad():
        want = original(input_ids=tokens).logits
    assert torch.allclose(lm.logits(tokens), want, atol=1e-5)
    assert lm.encode("the [MASK] sat") == [5, 4, 7]
    x, nfe = run_masked_sampler("first_hitting", lm, all_masked(lm, 3, 8), noise=SampleNoise([0, 1, 2]))
    assert nfe == 8 and not any(int(i) in lm.forbidden for i in x.flatten())
    assert len(lm.decode(x[0]).split()) == 8


def test_a_pickle_only_directory_is_refused(tmp_path):
    model = tiny_bert(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*safetensors only.*save_pretrained"):
        load_masked_lm(tmp_path)


def test_unusable_directories_are_refused_with_a_reason(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_masked_lm(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_masked_lm(tmp_path)
    tiny_bert(tmp_path / "nomask", mask_token=None)
    with pytest.raises(CheckpointError, match="no mask token"):
        load_masked_lm(tmp_path / "nomask")
    tiny_bert(tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no .*safetensors"):
        load_masked_lm(tmp_path / "noweights")


def test_the_split_is_fixed_and_disjoint():
    train, held = text_data.split_topics()
    assert not set(train) & set(held) and len(train) + len(held) == len(text_data.topics())
    held_chars = len(text_data.split_text("heldout"))
    assert 0.09 < held_chars / (held_chars + len(text_data.split_text("train"))) < 0.2


def test_kneser_ney_is_a_distribution_and_prefers_real_text():
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, 6, (3000,), generator=g) * 2  # even ids only: odd ids never seen
    lm = text_eval.KneserNeyTrigram(stream, vocab_size=14, exclude=(13,))
    for ctx in [(0, 2), (4, 4), (1, 3), (12, 12)]:
        assert math.isclose(sum(lm.p3(*ctx, w) for w in range(13)), 1.0, rel_tol=1e-9)
    seen = stream[:128].view(2, 64)
    assert lm.perplexity(seen) < lm.perplexity(seen + 1) < math.inf


def test_sample_entropy_of_unique_token_counts():
    x = torch.tensor([[1, 1, 2, 2], [3, 3, 3, 3]])
    assert math.isclose(text_eval.sample_entropy(x), math.log(2) / 2)


@pytest.mark.skipif(not (ZOO / "model.safetensors").is_file(), reason="text-mdm not trained yet")
def test_text_mdm_loads_from_the_zoo_and_infills():
    lm = load_masked_lm(ZOO)
    assert lm.length == text_data.SEQ_LEN and lm.mask_id == lm.tokenizer.mask_token_id
    prompt = lm.encode("The \"assert\" statement\n" + "<mask>" * 6)
    tokens = torch.tensor([prompt])
    x, nfe = run_masked_sampler("first_hitting", lm, tokens, noise=SampleNoise([0]))
    assert int(nfe) == 6 and lm.decode(x[0]).startswith("The \"assert\" statement\n")
    card = json.loads((ZOO / "training.json").read_text())
    if card["corpus_sha256"] == text_data.corpus_sha256():  # same Python docs: the recipe reproduces
        tokenizer = text_data.train_tokenizer()
        assert tokenizer.get_vocab() == lm.tokenizer.get_vocab()
