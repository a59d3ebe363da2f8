"""digits-FD: Frechet distance in the feature space of digit classifier B, and B's class accuracy.

``digits_fd(samples)`` = Frechet distance between Gaussians fitted to classifier-B penultimate features
(64-d, :meth:`models.classifiers.DigitClassifierB.features`) of ``samples`` and of a reference set
(by default the 359 held-out real digits of :func:`training.digits_data.heldout_split`):

    FD = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

The distance itself is computed by torchmetrics' ``FrechetInceptionDistance`` (a maintained
implementation, float64 statistics) with classifier B plugged in as its custom feature extractor.
If torchmetrics is not installed, :func:`frechet_distance` falls back to the same formula computed with
``scipy.linalg.sqrtm`` in float64 (``backend`` in the returned dict says which one ran); the two agree to
~1e-6 relative (checked in ``tests/test_recipes.py``).

FD has a sample-size bias: compare numbers computed with the same number of generated samples (the
recipes use 1000 class-balanced samples unless stated) against the same reference set. The *floor* is
the FD of real digits: ``real_floor()`` compares the 1438 training digits with the held-out digits.

Samples are clamped to [-1, 1] before feature extraction (the data range).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.classifiers import load_classifier
from training.digits_data import heldout_split, train_split

_ZOO = Path(__file__).resolve().parents[1] / "zoo"
DEFAULT_CLASSIFIER_B = _ZOO / "digit-classifier-b"


class _Features(nn.Module):
    """Adapter: torchmetrics calls ``feature(imgs)``; we return classifier-B penultimate activations."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = int(classifier.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x.float().clamp(-1, 1))


@lru_cache(maxsize=4)
def _cached_classifier(path: str) -> nn.Module:
    return load_classifier(path)


def get_classifier_b(path: str | Path | None = None) -> nn.Module:
    return _cached_classifier(str(Path(path) if path is not None else DEFAULT_CLASSIFIER_B))


@torch.no_grad()
def features(x: torch.Tensor, classifier: nn.Module | None = None, batch: int = 1024) -> torch.Tensor:
    clf = classifier if classifier is not None else get_classifier_b()
    outs = [clf.features(x[i : i + batch].float().clamp(-1, 1)) for i in range(0, len(x), batch)]
    return torch.cat(outs).double()


def _fd_scipy(f1: torch.Tensor, f2: torch.Tensor) -> float:
    from scipy import linalg

    a, b = f1.double().numpy(), f2.double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():  # singular product: regularise as in the usual FID code
        off = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def frechet_distance(
    samples: torch.Tensor,
    reference: torch.Tensor | None = None,
    classifier: nn.Module | None = None,
    backend: str = "auto",
) -> dict:
    """FD between classifier-B features of ``samples`` and ``reference`` (default: held-out digits).

    Returns ``{"fd": float, "n_samples": int, "n_reference": int, "backend": "torchmetrics"|"scipy"}``.
    """
    clf = classifier if classifier is not None else get_classifier_b()
    ref = reference if reference is not None else heldout_split()[0]
    if backend not in ("auto", "torchmetrics", "scipy"):
        raise ValueError(f"backend must be auto, torchmetrics or scipy, not {backend!r}")
    use_tm = backend == "torchmetrics"
    if backend == "auto":
        try:
            import torchmetrics.image.fid  # noqa: F401

            use_tm = True
        except ImportError:
            use_tm = False
    if use_tm:
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature=_Features(clf), normalize=True, reset_real_features=True)
        with torch.no_grad():
            for i in range(0, len(ref), 1024):
                metric.update(ref[i : i + 1024].float(), real=True)
            for i in range(0, len(samples), 1024):
                metric.update(samples[i : i + 1024].float(), real=False)
            fd = float(metric.compute())
        name = "torchmetrics"
    else:
        fd = _fd_scipy(features(samples, clf), features(ref, clf))
        name = "scipy"
    return {"fd": fd, "n_samples": int(len(samples)), "n_reference": int(len(ref)), "backend": name}


def digits_fd(samples: torch.Tensor, **kw) -> float:
    """Shorthand: the FD value only."""
    return frechet_distance(samples, **kw)["fd"]


@torch.no_grad()
def class_accuracy(samples: torch.Tensor, labels: torch.Tensor, classifier: nn.Module | None = None) -> float:
    """Fraction of class-conditional ``samples`` that classifier B assigns to their requested ``labels``."""
    clf = classifier if classifier is not None else get_classifier_b()
    logits = torch.cat(
        [clf(samples[i : i + 1024].float().clamp(-1, 1)) for i in range(0, len(samples), 1024)]
    )
    return float((logits.argmax(1) == labels.to(logits.device)).float().mean())


def real_floor(classifier: nn.Module | None = None) -> dict:
    """FD of real digits: the training split (1438) against the held-out split (359)."""
    return frechet_distance(train_split()[0], classifier=classifier)


def balanced_real_subset(n: int, generator: torch.Generator, num_classes: int = 10) -> torch.Tensor:
    """n training digits, as many of class c as ``balanced_labels(n)`` asks for: a real set shaped like the
    class-balanced generated sets. Classifier-B features separate the classes, so a random subset's class
    counts alone move its FD (5 random 1000-subsets: FD 0.073-0.130; 5 class-balanced ones: 0.082-0.088)."""
    x, y = train_split()
    counts = torch.bincount(balanced_labels(n, num_classes), minlength=num_classes)
    picks = []
    for c in range(num_classes):
        idx = torch.nonzero(y == c).flatten()
        if len(idx) < counts[c]:
            raise ValueError(f"only {len(idx)} training digits of class {c}; asked for {int(counts[c])}")
        picks.append(idx[torch.randperm(len(idx), generator=generator)[: int(counts[c])]])
    return x[torch.cat(picks)]


def balanced_labels(n: int, num_classes: int = 10) -> torch.Tensor:
    """0,1,...,9,0,1,... (n labels): class-balanced conditioning for evaluation."""
    return torch.arange(n) % num_classes
