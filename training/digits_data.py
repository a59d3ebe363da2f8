"""The scikit-learn handwritten digits, scaled and split for the digits model zoo.

``sklearn.datasets.load_digits()`` ships 1797 greyscale 8x8 images (10 classes, pixel values 0..16)
inside scikit-learn, so nothing is downloaded. Images are returned as float32 tensors of shape
(N, 1, 8, 8) scaled to [-1, 1] (``x / 8 - 1``), labels as int64 tensors of shape (N,).

The split is a fixed, stratified 80/20 split: for every class c (in order 0..9) the indices of that
class (ascending) are shuffled with ``numpy.random.RandomState(SPLIT_SEED)`` -- one RandomState
created once, used for the classes in order -- and the first ``round(0.2 * n_c)`` of them are held
out. ``SPLIT_SEED = 20250`` gives 1438 training and 359 held-out images (35-37 held out
per class). The legacy RandomState stream is frozen by NumPy, so the split is the same on every machine
and NumPy version. ``HELDOUT_SHA256`` pins it; ``tests/test_recipes.py`` checks it.

Never train on ``heldout_split()``: it is what the digits-FD and every quality number is measured on.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
import torch

SPLIT_SEED = 20250
HELDOUT_FRACTION = 0.2
NUM_CLASSES = 10
NULL_CLASS = 10  # label used for the unconditional / classifier-free-guidance branch
# sha256 of the sorted held-out indices as little-endian int64 bytes (see heldout_indices()).
HELDOUT_SHA256 = "12c47fd0a28e302bff888bd41d021db584ce1d14f293a7aa8be3d5823a84aa00"


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.float32)  # (1797, 8, 8), 0..16
    labels = d.target.astype(np.int64)
    return images, labels


def to_unit_range(images_0_16: np.ndarray) -> np.ndarray:
    """Map raw pixel values 0..16 to [-1, 1]."""
    return images_0_16 / 8.0 - 1.0


@lru_cache(maxsize=1)
def _split_indices() -> tuple[np.ndarray, np.ndarray]:
    _, labels = _raw()
    rng = np.random.RandomState(SPLIT_SEED)
    held = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        perm = rng.permutation(idx)
        held.append(perm[: int(round(HELDOUT_FRACTION * len(idx)))])
    held_idx = np.sort(np.concatenate(held))
    mask = np.ones(len(labels), dtype=bool)
    mask[held_idx] = False
    train_idx = np.flatnonzero(mask)
    return train_idx, held_idx


def train_indices() -> np.ndarray:
    """Indices (into ``load_digits()``) of the training split, ascending."""
    return _split_indices()[0].copy()


def heldout_indices() -> np.ndarray:
    """Indices (into ``load_digits()``) of the held-out split, ascending."""
    return _split_indices()[1].copy()


def heldout_digest() -> str:
    return hashlib.sha256(heldout_indices().astype("<i8").tobytes()).hexdigest()


def _take(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _raw()
    x = torch.from_numpy(to_unit_range(images[idx])).unsqueeze(1).contiguous()
    y = torch.from_numpy(labels[idx]).contiguous()
    return x, y


def train_split() -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N,1,8,8) float32 in [-1,1], labels (N,) int64) of the 80% training split."""
    return _take(train_indices())


def heldout_split() -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of the fixed 20% held-out split. Evaluation only; never train on it."""
    return _take(heldout_indices())


def all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits, for tooling only (not for training)."""
    return _take(np.arange(len(_raw()[1])))
