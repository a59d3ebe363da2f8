"""Imports from the digits recipes' shared modules, wherever they live (training/ or the older models/)."""

from __future__ import annotations

try:
    from training.digits_data import SPLIT_SEED, heldout_split, train_split
    from training.digits_fd import balanced_real_subset, class_accuracy, frechet_distance, get_classifier_b
except ImportError:  # the pre-move layout
    from models.digits_data import SPLIT_SEED, heldout_split, train_split
    from models.digits_fd import balanced_real_subset, class_accuracy, frechet_distance, get_classifier_b

try:
    from training.common import EMA, BatchSampler, Logger, env_summary, n_params, warmup_cosine
except ImportError:
    from models.recipes._common import EMA, BatchSampler, Logger, env_summary, n_params, warmup_cosine

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
