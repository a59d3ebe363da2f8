"""The digits recipes' shared pieces the text-to-image recipe uses (data split, digits-FD, training helpers)."""

from __future__ import annotations

from training.common import EMA, BatchSampler, Logger, env_summary, n_params, warmup_cosine
from training.digits_data import SPLIT_SEED, heldout_split, train_split
from training.digits_fd import balanced_real_subset, class_accuracy, frechet_distance, get_classifier_b

__all__ = [
    "EMA",
    "SPLIT_SEED",
    "BatchSampler",
    "balanced_real_subset",
    "Logger",
    "class_accuracy",
    "env_summary",
    "frechet_distance",
    "get_classifier_b",
    "heldout_split",
    "n_params",
    "train_split",
    "warmup_cosine",
]
