"""digits-t2i: the recipe's directory and the zoo model load unchanged in diffusers' StableDiffusionPipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("diffusers")

ZOO = Path(__file__).resolve().parents[1] / "zoo" / "digits-t2i"


def _generate(path: Path, prompts: list[str], steps: int, guidance: float) -> torch.Tensor:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(k) for k in range(len(prompts))]
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pt").images


@pytest.fixture(scope="module")
def quick_dir(tmp_path_factory) -> Path:
    from training.digits_t2i.recipe import main

    return main(["--quick", "--out", str(tmp_path_factory.mktemp("digits-t2i"))])


def test_quick_recipe_is_a_stable_diffusion_directory(quick_dir: Path) -> None:
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (quick_dir / part).exists(), part
    assert not list(quick_dir.rglob("*.bin")), "safetensors only"
    img = _generate(quick_dir, ["a bold seven", "the digit 3, slanted left"], steps=2, guidance=4.0)
    assert img.shape == (2, 1, 16, 16)
    assert torch.isfinite(img).all()


def test_tokenizer_keeps_caption_words_whole(quick_dir: Path) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(quick_dir / "tokenizer")
    ids = tok("a bold seven").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "bold</w>", "seven</w>", "<|endoftext|>"]
    assert tok.model_max_length == 16


def test_attributes_are_measured_per_class() -> None:
    from training.digits_t2i import data
    from training.digits_t2i._compat import train_split

    x8, y = train_split()
    thr = data.attribute_thresholds(x8, y)
    codes = data.measure(x8, y, thr)
    frac_bold = float((codes["thickness"] == 1).float().mean())
    assert 0.3 < frac_bold < 0.37  # above the per-class 2/3 quantile
    assert torch.equal(data.to_classifier(data.upsample(x8)), x8)  # 16x16 -> 8x8 is exact on real digits
    assert "a bold seven" in data.captions_for(7, 1, 0)
    assert "the digit 8, thin, slanted right" in data.captions_for(8, -1, 1)


@pytest.mark.skipif(not (ZOO / "model_index.json").is_file(), reason="zoo/digits-t2i is not committed")
def test_zoo_model_generates_in_diffusers() -> None:
    img = _generate(ZOO, ["a bold seven", "a thin two"], steps=4, guidance=4.0)
    assert img.shape == (2, 1, 16, 16)
    assert torch.isfinite(img).all()
