"""Sentence-transformers pooling in numpy: mean over real tokens, then L2 normalisation."""
from __future__ import annotations

import numpy as np

# sentence-transformers clamps the token count at 1e-9 and torch.nn.functional.normalize the
# norm at 1e-12; the same floors keep an all-padding row at zeros instead of NaN.
MIN_TOKEN_COUNT = 1e-9
MIN_NORM = 1e-12


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """``hidden`` [batch, seq, hidden], ``attention_mask`` [batch, seq] -> [batch, hidden] float32."""
    mask = attention_mask.astype(np.float32)[:, :, None]                   # [batch, seq, 1]
    summed = (hidden.astype(np.float32) * mask).sum(axis=1)                 # [batch, hidden]
    counts = np.maximum(mask.sum(axis=1), MIN_TOKEN_COUNT)                  # [batch, 1]
    return summed / counts


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; [batch, hidden] -> [batch, hidden]."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)                 # [batch, 1]
    return (vectors / np.maximum(norms, MIN_NORM)).astype(np.float32)
