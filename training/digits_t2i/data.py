"""Images, measured attributes, captions and the word-level CLIP tokenizer of digits-t2i.

Images: the 8x8 digits upsampled 2x by pixel repetition (nearest) to 16x16 in [-1, 1], so that 2x2 average
pooling (:func:`to_classifier`) returns the original 8x8 digit exactly and classifier B / digits-FD see real
digits unchanged.

Attributes are measured on 8x8 images in ink units p = (x + 1) / 2:
  * ink mass = mean(p); "thin" below the per-class 1/3 quantile of the training split, "bold" above 2/3;
  * slant = sum p dx dy / sum p dy^2 (dx to the right, dy up, about the ink centroid): the shear of the ink;
    "slanted left" below the per-class 1/4 quantile, "slanted right" above 3/4.
Thresholds are per class (a 1 has less ink than an 8; a 7 leans by shape) and are saved in train_info.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from search.digit_prompt import DIGIT_WORDS, ink_mass, slant  # the measurements the served verifiers use too

WORDS = list(DIGIT_WORDS)
INK_Q = (1 / 3, 2 / 3)
SLANT_Q = (0.25, 0.75)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 16  # tokens including BOS / EOS; the longest caption is 9


def upsample(x8: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x8, scale_factor=2, mode="nearest")


def to_classifier(x16: torch.Tensor) -> torch.Tensor:
    """16x16 images in [-1, 1] -> the classifiers' 8x8 input (2x2 mean), clamped to [-1, 1]."""
    return F.avg_pool2d(x16.float().clamp(-1, 1), 2)


def attribute_thresholds(x8: torch.Tensor, y: torch.Tensor) -> dict:
    """Per-class quantiles of ink mass and slant on the training split: {"ink": [[lo, hi] x 10], "slant": ...}."""
    ink, sl = ink_mass(x8), slant(x8)
    out: dict = {"ink": [], "slant": [], "ink_q": list(INK_Q), "slant_q": list(SLANT_Q)}
    for c in range(10):
        m = y == c
        out["ink"].append([float(torch.quantile(ink[m], q)) for q in INK_Q])
        out["slant"].append([float(torch.quantile(sl[m], q)) for q in SLANT_Q])
    return out


def measure(x8: torch.Tensor, y: torch.Tensor, thr: dict) -> dict[str, torch.Tensor]:
    """Measured attributes of 8x8 images of classes y: ink, slant, and -1/0/+1 codes (thin/-/bold, left/-/right)."""
    ink, sl = ink_mass(x8), slant(x8)
    ik, sk = torch.tensor(thr["ink"])[y], torch.tensor(thr["slant"])[y]
    thick = (ink > ik[:, 1]).long() - (ink < ik[:, 0]).long()
    lean = (sl > sk[:, 1]).long() - (sl < sk[:, 0]).long()
    return {"ink": ink, "slant": sl, "thickness": thick, "lean": lean}


def ink_quantile(x8: torch.Tensor, y: torch.Tensor, x8_train: torch.Tensor, y_train: torch.Tensor) -> torch.Tensor:
    """Where each image's ink mass falls in the training distribution of its class (0..1; real digits: 0.5)."""
    ink, ref = ink_mass(x8), ink_mass(x8_train)
    return torch.stack([(ref[y_train == c] < v).float().mean() for v, c in zip(ink.tolist(), y.tolist())])


def caption(label: int, thickness: str | None, lean: str | None, style: int) -> str:
    """One phrasing of a digit with optional attributes ("bold"/"thin", "left"/"right")."""
    w, adj = WORDS[label], f"{thickness} " if thickness else ""
    art = "an" if (adj or w)[0] in "aeiou" else "a"
    tail = f", slanted {lean}" if lean else ""
    if style == 0:
        return f"{art} {adj}{w}{tail}"
    if style == 1:
        return f"the digit {label}" + (f", {thickness}" if thickness else "") + tail
    if style == 2:
        return f"{adj}{label}{tail}"
    return f"{adj}{w}{tail}"


def captions_for(label: int, thick_code: int, lean_code: int) -> list[str]:
    """Every caption that is true of an image: each phrasing, with or without each measured attribute."""
    thick = {1: "bold", -1: "thin"}.get(thick_code)
    lean = {1: "right", -1: "left"}.get(lean_code)
    out = []
    for t in {None, thick}:
        for s in {None, lean}:
            out += [caption(label, t, s, style) for style in range(4)]
    return sorted(set(out))


class CaptionBank:
    """All true captions of every training image, tokenized once; ``sample`` draws one per image (or "")."""

    def __init__(self, tokenizer, labels: torch.Tensor, codes: dict[str, torch.Tensor], p_empty: float) -> None:
        self.p_empty = p_empty
        self.texts = [
            captions_for(int(c), int(t), int(s))
            for c, t, s in zip(labels.tolist(), codes["thickness"].tolist(), codes["lean"].tolist())
        ]
        flat = [t for ts in self.texts for t in ts]
        ids = tokenize(tokenizer, [""] + flat)
        self.empty, ids = ids[0], ids[1:]
        self.offsets, k = [], 0
        for ts in self.texts:
            self.offsets.append((k, len(ts)))
            k += len(ts)
        self.ids = ids

    def sample(self, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        rows = []
        for i in idx.tolist():
            k, n = self.offsets[i]
            if float(torch.rand((), generator=g)) < self.p_empty:
                rows.append(self.empty)
            else:
                rows.append(self.ids[k + int(torch.randint(n, (), generator=g))])
        return torch.stack(rows)


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """The pipeline's own call: pad to model_max_length, truncate."""
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def vocabulary_words() -> list[str]:
    words = set(WORDS) | {"a", "an", "the", "digit", "bold", "thin", "slanted", "left", "right"}
    return sorted(words)


def _byte_chars() -> list[str]:
    """GPT-2 / CLIP byte-to-unicode table: printable bytes map to themselves, the rest above 255."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_tokenizer(out: Path):
    """A word-level CLIPTokenizer: the byte alphabet (alone and word-final) plus one merge chain per word, so each
    caption word is one token; anything else falls back to bytes. Writes vocab.json + merges.txt into ``out``."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab_list = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for w in vocabulary_words():
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        cur = pieces[0]
        for p in pieces[1:]:
            if f"{cur} {p}" not in merges:
                merges.append(f"{cur} {p}")
                vocab_list.append(cur + p)
            cur = cur + p
    vocab_list += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab_list))}
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    pairs = [tuple(m.split(" ")) for m in merges]
    tok = CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=MAX_LENGTH)
    for w in vocabulary_words():
        ids = tok(w).input_ids
        if len(ids) != 3:
            raise RuntimeError(f"tokenizer splits {w!r} into {tok.convert_ids_to_tokens(ids)}")
    return tok
