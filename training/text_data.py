"""The text corpus of the text-mdm zoo model: Python's own documentation topics, split and tokenized.

``pydoc_data.topics.topics`` ships inside every CPython (a dict: topic name -> plain-text documentation,
the text behind ``help("assert")``), so nothing is downloaded. The corpus differs a little between
Python versions; ``corpus_sha256()`` names the exact text a model was trained on (the model card records
it, the recipe warns on a mismatch).

Split (fixed, by topic, so held-out text is never seen, not even by the tokenizer): topic names sorted,
shuffled with ``numpy.random.RandomState(SPLIT_SEED)``; walking that order, every topic shorter than
``MAX_HELDOUT_TOPIC_CHARS`` is held out until the held-out text reaches ``HELDOUT_FRACTION`` of all
characters. Topics are joined with a blank line into one stream per split.

Tokenizer: byte-level BPE (lossless decoding) trained with the ``tokenizers`` library on the training
stream only; special tokens ``<pad>``, ``<unk>``, ``<mask>`` (ids 0, 1, 2) are never part of the text.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
import torch

SPLIT_SEED = 4
HELDOUT_FRACTION = 0.10
MAX_HELDOUT_TOPIC_CHARS = 20_000
SEQ_LEN = 128
VOCAB_SIZE = 3000
SPECIAL_TOKENS = ("<pad>", "<unk>", "<mask>")
TOPIC_SEPARATOR = "\n\n"


def topics() -> dict[str, str]:
    from pydoc_data.topics import topics as _topics

    return dict(_topics)


def corpus_sha256() -> str:
    """sha256 over the sorted topics (name, NUL, text, NUL): identifies the exact corpus."""
    h = hashlib.sha256()
    for name, text in sorted(topics().items()):
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()


@lru_cache(maxsize=1)
def split_topics() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train topic names, held-out topic names), each sorted."""
    docs = topics()
    names = sorted(docs)
    order = np.random.RandomState(SPLIT_SEED).permutation(len(names))
    total = sum(len(t) for t in docs.values())
    held, held_chars = [], 0
    for i in order:
        name = names[i]
        if held_chars >= HELDOUT_FRACTION * total:
            break
        if len(docs[name]) < MAX_HELDOUT_TOPIC_CHARS:
            held.append(name)
            held_chars += len(docs[name])
    train = sorted(set(names) - set(held))
    return tuple(train), tuple(sorted(held))


def split_text(split: str) -> str:
    """The text of one split ("train" or "heldout") as one stream."""
    train, held = split_topics()
    names = {"train": train, "heldout": held}[split]
    docs = topics()
    return TOPIC_SEPARATOR.join(docs[n] for n in names)


def train_tokenizer(vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE on the training text; returns a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    train, _ = split_topics()
    docs = topics()
    tok.train_from_iterator([docs[n] for n in train], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   mask_token="<mask>", model_max_length=SEQ_LEN)


def token_stream(tokenizer, split: str) -> torch.Tensor:
    """All tokens of one split as a 1-D int64 tensor (no special tokens)."""
    ids = tokenizer.backend_tokenizer.encode(split_text(split), add_special_tokens=False).ids
    return torch.tensor(ids, dtype=torch.int64)


def heldout_chunks(tokenizer, length: int = SEQ_LEN) -> torch.Tensor:
    """The held-out stream cut into non-overlapping chunks of `length` tokens: (num_chunks, length)."""
    stream = token_stream(tokenizer, "heldout")
    n = len(stream) // length
    return stream[: n * length].view(n, length)


def random_windows(stream: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """`batch` windows of `length` tokens at uniformly random offsets of a training stream."""
    starts = torch.randint(0, len(stream) - length + 1, (batch,), generator=generator)
    return torch.stack([stream[s: s + length] for s in starts.tolist()])
