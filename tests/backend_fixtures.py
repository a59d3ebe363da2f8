"""Small random models with the zoo's architectures, saved like the zoo saves them, and a models config."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "and", "to", "of", "big"]
KINDS = {"digits-ddpm": "diffusion", "digits-flow": "flow", "digits-meanflow": "meanflow", "text-mdm": "masked"}
SAMPLERS = {"digits-ddpm": "dpmpp_2m", "digits-flow": "euler", "digits-meanflow": "meanflow", "text-mdm": "mdlm"}


def save_unet(path: Path, scheduler, seed: int) -> None:
    from models.digits_unet import build_digits_unet

    torch.manual_seed(seed)
    unet = build_digits_unet()
    with torch.no_grad():  # the zoo's weights are not near their initialisation; random ones exercise more
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    unet.save_pretrained(path / "unet", safe_serialization=True)
    scheduler.save_pretrained(path / "scheduler")


def save_meanflow(path: Path, seed: int) -> None:
    from models.meanflow_net import MeanFlowNet, save_meanflow_net

    torch.manual_seed(seed)
    net = MeanFlowNet()
    with torch.no_grad():  # a trained h-branch is not zero: make (t, h) both matter
        for p in net.h_embedding.parameters():
            p.copy_(0.05 * torch.randn_like(p))
    save_meanflow_net(net, path)


def save_masked_lm(path: Path, seed: int, full_size: bool = False) -> None:
    """A random BERT masked LM: narrow for tests, or text-mdm's exact shape (vocabulary 3000, length 128)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    length = 128 if full_size else 24
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=length, pad_token="[PAD]",
                                        unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(seed)
    if full_size:  # training/text_mdm.py ARCH over training/text_data.py's vocabulary and length
        shape = dict(vocab_size=3000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=512)
    else:
        shape = dict(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128)
    config = BertConfig(**shape, max_position_embeddings=length, type_vocab_size=1, pad_token_id=0)
    BertForMaskedLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)


def write_model(name: str, path: Path, seed: int = 0, full_size: bool = False) -> None:
    """A random-weight stand-in for the zoo model `name`, saved to path (the digits ones are full size)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if name == "digits-ddpm":
        save_unet(path, DDPMScheduler(), seed)
    elif name == "digits-flow":
        save_unet(path, FlowMatchEulerDiscreteScheduler(shift=1.0), seed)
    elif name == "digits-meanflow":
        save_meanflow(path, seed)
    else:
        save_masked_lm(path, seed, full_size)


def write_zoo(root: Path, seed: int = 0) -> None:
    """digits-ddpm, digits-flow, digits-meanflow and text-mdm stand-ins under root."""
    for i, name in enumerate(KINDS):
        write_model(name, root / name, seed + i)


def model_block(name: str, suffix: str = "", **options) -> str:
    """One [[models]] entry for a zoo stand-in, with backend options as TOML."""
    kind = KINDS[name]
    lines = ["[[models]]", f'name = "{name}{suffix}"', f'directory = "{name}"', f'kind = "{kind}"',
             f'default_sampler = "{SAMPLERS[name]}"', "default_steps = 10"]
    if kind != "masked":
        lines.append("null_class = 10")
    for key, value in options.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, list):
            lines.append(f"{key} = [{', '.join(repr(v).replace(chr(39), chr(34)) for v in value)}]")
        else:
            lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


def write_config(root: Path, blocks: list[str], filename: str = "models.toml") -> Path:
    path = root / filename
    path.write_text('model_roots = ["."]\n\n' + "\n".join(blocks))
    return path
