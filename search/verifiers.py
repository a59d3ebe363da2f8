"""Verifiers: ``verifier(x0, cond) -> reward per sample`` (float64, higher is better), registered by name.

search/ does no I/O, so a verifier is built from resources the caller has already loaded (a classifier
module, the masked model's tokenizer, a Gaussian mixture): ``build_verifier(name, options, resources)``.
Each spec names the resources it needs; the server resolves them (for example "classifier-a" ->
zoo/digit-classifier-a) and validates the request's verifier name and options against VERIFIERS.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from samplers.errors import InvalidRequest, quote

from .digit_prompt import DigitPromptReward
from .options import SearchOption, check_options

Verifier = Callable[[torch.Tensor, Any], torch.Tensor]


def _labels(cond, n: int, name: str) -> torch.Tensor:
    if cond is None:
        raise InvalidRequest(f"verifier: {name!r} scores a requested class and needs a class label per sample")
    labels = torch.as_tensor(cond).reshape(-1)
    if labels.shape[0] != n or (labels < 0).any():
        raise InvalidRequest(f"verifier: {name!r} needs a class label (>= 0) for each of the {n} samples")
    return labels


@dataclass(frozen=True)
class ClassLogProb:
    """log p(c | x0) under an image classifier, c the requested class (cond); inputs clamped to [-1, 1]."""

    classifier: Any
    name: str = "digit-class"

    def __call__(self, x0: torch.Tensor, cond=None) -> torch.Tensor:
        labels = _labels(cond, x0.shape[0], self.name)
        with torch.no_grad():
            logits = self.classifier(x0.float().clamp(-1, 1))
        logp = torch.log_softmax(logits.double(), -1)
        return logp.gather(1, labels.reshape(-1, 1).to(logits.device)).squeeze(1).cpu()


@dataclass(frozen=True)
class InkMass:
    """Mean ink of an image in [-1, 1] (-1 = paper, 1 = ink): mean((clamp(x0) + 1) / 2), in [0, 1].

    With a target, the reward is -|ink - target| (a non-classifier objective with an optimum inside)."""

    target: float | None = None

    def __call__(self, x0: torch.Tensor, cond=None) -> torch.Tensor:
        ink = ((x0.double().clamp(-1, 1) + 1) / 2).flatten(1).mean(1)
        return ink if self.target is None else -(ink - self.target).abs()


@dataclass(frozen=True)
class ComponentLogDensity:
    """The exact log-density log N(x0; mu_k, s_k^2 I) of one Gaussian-mixture component (for tests)."""

    mixture: Any  # samplers.gmm.GaussianMixture
    component: int

    def __call__(self, x0: torch.Tensor, cond=None) -> torch.Tensor:
        labels = torch.full((x0.shape[0],), self.component, dtype=torch.int64)
        return self.mixture.log_density(x0.double(), 0.0, labels)


@dataclass(frozen=True)
class WordPresence:
    """Text reward for masked models: the fraction of requested words whose token ids appear, as a
    contiguous run, in the sampled sequence (x0 = (B, L) token ids).  Words are tokenized once."""

    words: tuple[tuple[int, ...], ...]

    @classmethod
    def from_words(cls, words, encode: Callable[[str], list[int]]) -> WordPresence:
        ids = []
        for w in words:
            # A word inside a sentence is usually tokenized with its leading space.
            toks = tuple(encode(" " + w.strip())) or tuple(encode(w.strip()))
            if not toks:
                raise InvalidRequest(f"verifier option 'words': {w!r} has no tokens")
            ids.append(toks)
        return cls(tuple(ids))

    def __call__(self, x0: torch.Tensor, cond=None) -> torch.Tensor:
        out = torch.zeros(x0.shape[0], dtype=torch.float64)
        for toks in self.words:
            t = torch.tensor(toks, dtype=x0.dtype)
            if x0.shape[1] < len(t):
                continue
            windows = x0.unfold(1, len(t), 1)  # (B, L - n + 1, n)
            out += (windows == t).all(-1).any(-1).double()
        return out / len(self.words)


@dataclass(frozen=True)
class DecodedVerifier:
    """A verifier of images applied to a latent model's samples: `decode(latents)` (the pipeline's VAE) first.

    A latent pipeline's cond is a dict; class-conditional families carry their labels as "class_labels"."""

    decode: Callable[[torch.Tensor], torch.Tensor]
    verifier: Verifier

    def __call__(self, x0: torch.Tensor, cond=None) -> torch.Tensor:
        labels = cond.get("class_labels") if isinstance(cond, dict) else cond
        return self.verifier(self.decode(x0), labels)


@dataclass(frozen=True)
class VerifierSpec:
    name: str
    build: Callable[[dict, Mapping[str, Any]], Verifier]
    kinds: tuple[str, ...]
    resources: tuple[str, ...]
    needs_cond: bool
    when_to_use: str
    options: dict[str, SearchOption] = field(default_factory=dict)
    held_out: bool = False  # an evaluation metric: searching on it forfeits it as a held-out check


IMAGE = ("diffusion", "flow")
# Resources a request supplies itself (not loaded by the server): the model, a text-to-image prompt.
REQUEST_RESOURCES = ("model", "prompt")
_ATTRIBUTE_WEIGHT = {"attribute_weight": SearchOption(float, 1.0, 0.0, 100.0, help="weight of each requested "
                                                      "attribute's soft indicator beside the class log-probability")}
VERIFIERS: dict[str, VerifierSpec] = {
    "digit-class": VerifierSpec(
        "digit-class", lambda o, r: ClassLogProb(r["classifier-a"], "digit-class"), IMAGE, ("classifier-a",),
        True, "log-probability of the requested digit under classifier A (the search reward)."),
    "digit-class-b": VerifierSpec(
        "digit-class-b", lambda o, r: ClassLogProb(r["classifier-b"], "digit-class-b"), IMAGE, ("classifier-b",),
        True, "log-probability of the requested digit under held-out classifier B (evaluation).", held_out=True),
    "digit-prompt": VerifierSpec(
        "digit-prompt", lambda o, r: DigitPromptReward.build(r["classifier-a"], r["prompt"], r.get("digit-attributes"),
                                                             o["attribute_weight"]),
        IMAGE, ("classifier-a", "prompt"), False,
        "prompt alignment for digits-t2i: log p(prompt's digit) under classifier A plus a soft indicator of "
        "each requested attribute (bold / thin ink, slanted left / right) measured on the decoded image.",
        dict(_ATTRIBUTE_WEIGHT)),
    "digit-prompt-b": VerifierSpec(
        "digit-prompt-b", lambda o, r: DigitPromptReward.build(r["classifier-b"], r["prompt"],
                                                               r.get("digit-attributes"), o["attribute_weight"]),
        IMAGE, ("classifier-b", "prompt"), False,
        "digit-prompt under held-out classifier B (evaluation).", dict(_ATTRIBUTE_WEIGHT), held_out=True),
    "ink-mass": VerifierSpec(
        "ink-mass", lambda o, r: InkMass(None if o["target"] < 0 else o["target"]), IMAGE, (), False,
        "mean ink of the image; with target in [0, 1], closeness to that ink level.",
        {"target": SearchOption(float, -1.0, -1.0, 1.0, help="ink level to aim for; -1 = as much as possible")}),
    "text-words": VerifierSpec(
        "text-words", lambda o, r: WordPresence.from_words(o["words"], r["model"].encode), ("masked",), ("model",),
        False, "fraction of the requested words present in the generated text.",
        {"words": SearchOption(list, (), item=str, min_items=1, max_items=16, help="words to include")}),
    "gmm-component": VerifierSpec(
        "gmm-component", lambda o, r: ComponentLogDensity(r["mixture"], o["component"]), IMAGE, ("mixture",), False,
        "exact log-density of one Gaussian-mixture component (tests and benchmarks on the GMM).",
        {"component": SearchOption(int, 0, 0, 1023, help="mixture component to reward")}),
}


def validate_verifier(name: str, options: dict | None = None, kind: str | None = None) -> tuple[VerifierSpec, dict]:
    if not name:
        raise InvalidRequest("search.verifier: name is empty")
    if name not in VERIFIERS:
        raise InvalidRequest(f"search.verifier: unknown verifier {quote(name)}; "
                             f"available: {', '.join(sorted(VERIFIERS))}")
    spec = VERIFIERS[name]
    if kind is not None and kind not in spec.kinds:
        raise InvalidRequest(f"search.verifier: {name!r} does not apply to {kind} models")
    return spec, check_options(spec.options, options, f"verifier {name!r}", "search.verifier_options")


def build_verifier(name: str, options: dict | None = None, resources: Mapping[str, Any] | None = None,
                   kind: str | None = None) -> Verifier:
    """Validate and build verifier `name` from already loaded `resources` (see each spec's `resources`)."""
    spec, opts = validate_verifier(name, options, kind)
    resources = dict(resources or {})
    missing = [r for r in spec.resources if r not in resources]
    if missing:
        raise InvalidRequest(f"search.verifier: {name!r} is not available on this server (needs {missing[0]!r})")
    return spec.build(opts, resources)
