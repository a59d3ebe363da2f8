"""Prompt alignment of decoded digit images: what digits-t2i's prompts ask for, measured on the image.

A prompt such as "a bold seven", "the digit 7, slanted right" or "thin 3" names one digit and optionally
a thickness ("bold" / "thin") and a lean ("slanted left" / "slanted right").  `parse_digit_prompt` reads
it; the measurements are those the model's captions were made from (zoo/digits-t2i/train_info.json):

  * ink mass = mean((x + 1) / 2) of the 8x8 image (x in [-1, 1]);
  * slant = sum p dx dy / sum p dy^2 about the ink centroid (dx right, dy up, p = (x + 1) / 2): the shear;

"bold" means ink above the class's 2/3 quantile of the training split, "thin" below its 1/3 quantile,
"slanted right" / "left" slant above / below the class's 3/4 / 1/4 quantile.  Images larger than the
classifiers' 8x8 are average-pooled to 8x8 first (digits-t2i decodes 16x16 = the digits upsampled 2x, so
pooling returns the digit exactly); colour images are averaged over channels.

`DigitPromptReward` is the search reward: log p_A(digit | x) under classifier A plus, per requested
attribute, a soft indicator log sigmoid((m - threshold) / tau) with tau a quarter of the class's
quantile gap.  `prompt_satisfied` is the hard check the benchmarks evaluate with (classifier B's argmax
and the thresholds), kept apart from the reward.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from samplers.errors import InvalidRequest, quote

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CLASSIFIER_SIZE = 8


@dataclass(frozen=True)
class DigitPrompt:
    """What a prompt asks for: a digit, thickness (-1 thin, 0 any, +1 bold), lean (-1 left, 0 any, +1 right)."""

    digit: int
    thickness: int = 0
    lean: int = 0


def parse_digit_prompt(text: str) -> DigitPrompt:
    """Read the digit and attributes of a digits-t2i prompt; refuse a prompt that names no digit or two."""
    words = re.findall(r"[a-z]+|\d", text.lower())
    digits = {DIGIT_WORDS.index(w) if w in DIGIT_WORDS else int(w) for w in words if w in DIGIT_WORDS or w.isdigit()}
    if len(digits) != 1:
        what = "names no digit" if not digits else f"names {len(digits)} digits"
        raise InvalidRequest(f"prompt: {quote(text)} {what}; the digit-prompt verifier scores one digit")
    thickness = ("bold" in words) - ("thin" in words)
    if "bold" in words and "thin" in words:
        raise InvalidRequest(f"prompt: {quote(text)} asks for both bold and thin")
    lean = ("right" in words) - ("left" in words)
    if "right" in words and "left" in words:
        raise InvalidRequest(f"prompt: {quote(text)} asks for both slanted left and right")
    return DigitPrompt(digits.pop(), thickness, lean)


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] -> the classifiers' (N, 1, 8, 8): channel mean, then average pooling."""
    x = images.float().clamp(-1, 1)
    if x.shape[1] != 1:
        x = x.mean(1, keepdim=True)
    h, w = x.shape[-2:]
    if (h, w) != (CLASSIFIER_SIZE, CLASSIFIER_SIZE):
        if h % CLASSIFIER_SIZE or w % CLASSIFIER_SIZE:
            raise InvalidRequest(f"verifier: images of {h}x{w} do not pool to the classifiers' 8x8 input")
        x = F.avg_pool2d(x, (h // CLASSIFIER_SIZE, w // CLASSIFIER_SIZE))
    return x


def ink_mass(x8: torch.Tensor) -> torch.Tensor:
    """Mean ink (p = (x + 1) / 2) per image of (N, 1, 8, 8)."""
    return ((x8.clamp(-1, 1) + 1) / 2).flatten(1).mean(1)


def slant(x8: torch.Tensor) -> torch.Tensor:
    """The shear of the ink about its centroid, sum p dx dy / sum p dy^2 (dx right, dy up), per image."""
    p = ((x8.clamp(-1, 1) + 1) / 2)[:, 0]
    h, w = p.shape[-2:]
    dy = -(torch.arange(h, dtype=p.dtype) - (h - 1) / 2).view(1, h, 1).expand_as(p)
    dx = (torch.arange(w, dtype=p.dtype) - (w - 1) / 2).view(1, 1, w).expand_as(p)
    m = p.sum((1, 2)).clamp_min(1e-6)
    cx, cy = (p * dx).sum((1, 2)) / m, (p * dy).sum((1, 2)) / m
    ddx, ddy = dx - cx.view(-1, 1, 1), dy - cy.view(-1, 1, 1)
    return (p * ddx * ddy).sum((1, 2)) / (p * ddy * ddy).sum((1, 2)).clamp_min(1e-6)


def _thresholds(thresholds: dict | None, prompt: DigitPrompt, text: str) -> dict[str, tuple[float, float]]:
    needed = [k for k, v in (("ink", prompt.thickness), ("slant", prompt.lean)) if v]
    if needed and not thresholds:
        raise InvalidRequest(f"prompt: {quote(text)} asks for an attribute, but this model has no attribute "
                             f"thresholds (train_info.json) to measure it by")
    return {k: tuple(float(v) for v in thresholds[k][prompt.digit]) for k in needed}


def _attribute_terms(x8: torch.Tensor, prompt: DigitPrompt, thr: dict) -> list[tuple[torch.Tensor, int, tuple]]:
    """(measurement, direction, (lo, hi)) of each requested attribute."""
    terms = []
    if prompt.thickness:
        terms.append((ink_mass(x8).double(), prompt.thickness, thr["ink"]))
    if prompt.lean:
        terms.append((slant(x8).double(), prompt.lean, thr["slant"]))
    return terms


@dataclass(frozen=True)
class DigitPromptReward:
    """log p_A(digit | x) + sum over requested attributes of log sigmoid(direction (m - edge) / tau)."""

    classifier: Any
    prompt: DigitPrompt
    thresholds: dict[str, tuple[float, float]]
    attribute_weight: float = 1.0

    @classmethod
    def build(cls, classifier, prompt_text: str, thresholds: dict | None, attribute_weight: float = 1.0):
        prompt = parse_digit_prompt(prompt_text)
        return cls(classifier, prompt, _thresholds(thresholds, prompt, prompt_text), attribute_weight)

    def __call__(self, images: torch.Tensor, cond=None) -> torch.Tensor:
        x8 = to_classifier_input(images)
        with torch.no_grad():
            logits = self.classifier(x8)
        reward = torch.log_softmax(logits.double(), -1)[:, self.prompt.digit].cpu()
        for m, direction, (lo, hi) in _attribute_terms(x8, self.prompt, self.thresholds):
            edge, tau = (hi if direction > 0 else lo), max(hi - lo, 1e-6) / 4
            reward = reward + self.attribute_weight * F.logsigmoid(direction * (m - edge) / tau)
        return reward


def prompt_satisfied(images: torch.Tensor, prompt_text: str, classifier, thresholds: dict | None) -> torch.Tensor:
    """Per image: the classifier's argmax is the prompt's digit and every requested attribute lies beyond
    its quantile threshold (the evaluation counterpart of DigitPromptReward, for a held-out classifier)."""
    prompt = parse_digit_prompt(prompt_text)
    thr = _thresholds(thresholds, prompt, prompt_text)
    x8 = to_classifier_input(images)
    with torch.no_grad():
        ok = classifier(x8).argmax(-1).cpu() == prompt.digit
    for m, direction, (lo, hi) in _attribute_terms(x8, prompt, thr):
        ok = ok & ((m > hi) if direction > 0 else (m < lo))
    return ok
