"""The independent text evaluator of text-mdm samples: a Kneser-Ney trigram model, and sample entropy.

Generative perplexity needs a language model that never takes part in sampling. MDLM and its successors
use GPT-2 large; we cannot download one, so the evaluator is an interpolated Kneser-Ney trigram model
(Chen & Goodman 1999, eq. 13-15, one absolute discount per order D = n1 / (n1 + 2 n2)) over the same BPE
tokens, fitted on the training split only and interpolated down to a uniform distribution over the real
tokens, so every token has a finite NLL. Tokens are scored from the third position of a sequence on
(a full trigram context), for samples and for the held-out reference alike.

Entropy is the per-sample token entropy of MDLM / DUO / BD3-LM: the counts of the unique token ids of one
sample, normalised, H = -sum p log p (nats), averaged over samples.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import torch


def _discount(counts) -> float:
    hist = Counter(counts)
    n1, n2 = hist.get(1, 0), hist.get(2, 0)
    return n1 / (n1 + 2 * n2) if n1 else 0.5


class KneserNeyTrigram:
    """Interpolated Kneser-Ney trigram model over token ids, fitted on one training stream."""

    def __init__(self, stream, vocab_size: int, exclude: tuple[int, ...] = ()):
        ids = [int(i) for i in stream]
        self.uniform = 1.0 / (vocab_size - len(set(exclude)))
        self.tri = Counter(zip(ids, ids[1:], ids[2:], strict=False))
        self.ctx = Counter()  # c(u v .)
        self.ctx_types = Counter()  # N1+(u v .)
        for (u, v, _w) in self.tri:
            self.ctx_types[u, v] += 1
        for (u, v, _w), c in self.tri.items():
            self.ctx[u, v] += c
        self.cont2 = Counter((v, w) for (_u, v, w) in self.tri)  # N1+(. v w)
        self.cont2_total = Counter()  # N1+(. v .)
        self.cont2_types = Counter()  # N1+(v .) among continuation bigrams
        for (v, _w), c in self.cont2.items():
            self.cont2_total[v] += c
            self.cont2_types[v] += 1
        self.cont1 = Counter(w for (_v, w) in self.cont2)  # N1+(. w)
        self.cont1_total = len(self.cont2)
        self.d3, self.d2, self.d1 = (_discount(self.tri.values()), _discount(self.cont2.values()),
                                     _discount(self.cont1.values()))
        self._p2 = defaultdict(dict)

    def p1(self, w: int) -> float:
        seen = max(self.cont1.get(w, 0) - self.d1, 0.0) / self.cont1_total
        return seen + self.d1 * len(self.cont1) / self.cont1_total * self.uniform

    def p2(self, v: int, w: int) -> float:
        total = self.cont2_total.get(v, 0)
        if not total:
            return self.p1(w)
        return (max(self.cont2.get((v, w), 0) - self.d2, 0.0) / total
                + self.d2 * self.cont2_types[v] / total * self.p1(w))

    def p3(self, u: int, v: int, w: int) -> float:
        total = self.ctx.get((u, v), 0)
        if not total:
            return self.p2(v, w)
        return (max(self.tri.get((u, v, w), 0) - self.d3, 0.0) / total
                + self.d3 * self.ctx_types[u, v] / total * self.p2(v, w))

    def nll(self, seq) -> list[float]:
        """-log p of every token from the third on, given the two before it."""
        s = [int(i) for i in seq]
        return [-math.log(self.p3(s[i - 2], s[i - 1], s[i])) for i in range(2, len(s))]

    def perplexity(self, sequences) -> float:
        """exp of the token-weighted mean NLL over all sequences (as MDLM reports gen-PPL)."""
        nlls = [x for seq in sequences for x in self.nll(seq)]
        return math.exp(sum(nlls) / len(nlls))


def sample_entropy(tokens: torch.Tensor) -> float:
    """Mean over samples of the entropy (nats) of each sample's unique-token frequencies."""
    out = []
    for row in tokens:
        counts = torch.unique(row, return_counts=True)[1].double()
        p = counts / counts.sum()
        out.append(float(-(p * p.log()).sum()))
    return sum(out) / len(out)
