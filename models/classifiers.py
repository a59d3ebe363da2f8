"""Digit classifiers for the digits zoo: A (the reward model for search) and B (held-out evaluator).

Both take images of shape (N, 1, 8, 8) in [-1, 1] (the scaling of :mod:`training.digits_data`) and return
logits over the 10 digit classes. They are trained independently (different architectures, seeds and
augmentation draws) by ``python -m training.digit_classifiers``, so a sampler that games A (search
reward) is not automatically rewarded by B.

* :class:`DigitClassifierA`: a plain VGG-style conv net (3x3 convs, ReLU, max-pool, flatten, MLP head),
  128-d penultimate layer.
* :class:`DigitClassifierB`: a GroupNorm + GELU conv net with global average pooling, 64-d penultimate
  layer. Its ``features(x)`` (the penultimate activations) feed the digits Frechet distance
  (:mod:`training.digits_fd`).

Saved as ``config.json`` + ``model.safetensors``; load with :func:`load_classifier` (safetensors only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class DigitClassifierA(nn.Module):
    """VGG-style: conv32-conv64-pool-conv64-pool -> 256 -> fc128 (penultimate) -> fc10."""

    arch = "a"

    def __init__(self, width: int = 32, hidden: int = 128, dropout: float = 0.2) -> None:
        super().__init__()
        self.width, self.hidden, self.dropout = width, hidden, dropout
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 2x2
            nn.Flatten(),
            nn.Linear(2 * w * 4, hidden),
            nn.ReLU(),
        )
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, 10)
        self.num_features = hidden

    def config(self) -> dict[str, Any]:
        return {"arch": self.arch, "width": self.width, "hidden": self.hidden, "dropout": self.dropout}

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    features = penultimate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.penultimate(x)))


class DigitClassifierB(nn.Module):
    """GroupNorm/GELU conv net with global average pooling -> fc64 (penultimate) -> fc10."""

    arch = "b"

    def __init__(self, width: int = 24, feature_dim: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        self.width, self.feature_dim, self.dropout = width, feature_dim, dropout
        w = width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.GELU())

        self.body = nn.Sequential(
            block(1, w),
            block(w, 2 * w),
            nn.AvgPool2d(2),  # 4x4
            block(2 * w, 4 * w),
            block(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * w, feature_dim),
            nn.GELU(),
        )
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, 10)
        self.num_features = feature_dim

    def config(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "width": self.width,
            "feature_dim": self.feature_dim,
            "dropout": self.dropout,
        }

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    features = penultimate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.penultimate(x)))


_ARCHS: dict[str, type[nn.Module]] = {"a": DigitClassifierA, "b": DigitClassifierB}


def build_classifier(config: dict[str, Any]) -> nn.Module:
    cfg = dict(config)
    arch = cfg.pop("arch", None)
    if arch not in _ARCHS:
        raise ValueError(f"classifier config field 'arch' is {arch!r}; expected one of {sorted(_ARCHS)}")
    keys = {"a": ("width", "hidden", "dropout"), "b": ("width", "feature_dim", "dropout")}[arch]
    return _ARCHS[arch](**{k: cfg[k] for k in keys if k in cfg})


def save_classifier(model: nn.Module, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"_class_name": type(model).__name__, **model.config(), "input": "(N,1,8,8) float in [-1,1]"}
    if extra:
        cfg.update(extra)
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    return out


def load_classifier(model_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a classifier saved by :func:`save_classifier`; returned in eval mode with grads disabled."""
    d = Path(model_dir)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found (expected a digit classifier directory)")
    if not w_path.is_file():
        raise FileNotFoundError(f"{w_path} not found; classifiers are loaded from safetensors only")
    model = build_classifier(json.loads(cfg_path.read_text()))
    model.load_state_dict(load_file(str(w_path)), strict=True)
    return model.to(device).eval().requires_grad_(False)
