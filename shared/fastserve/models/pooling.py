"""Sentence embeddings from token states: the pooling all-MiniLM-L6-v2 was trained with.

Inference serves embeddings with it and optimization compares a model's embeddings before and after with
it; one definition keeps a served embedding and a measured one the same thing.
"""

from __future__ import annotations

import numpy as np


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mask-weighted mean over tokens, then L2 normalisation (sentence-transformers' Pooling + Normalize).

    hidden [n, length, dim], mask [n, length] -> [n, dim] float32; padding tokens do not count."""
    weights = mask[..., None].astype(np.float32)
    # fp16 ONNX graphs may return half precision: sum in float32 so long texts do not overflow
    pooled = (hidden.astype(np.float32) * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
    return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
