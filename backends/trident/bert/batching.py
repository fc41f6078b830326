"""Length-sorted micro-batches: our CPU stand-in for sequence packing.

Padding a batch to its longest text wastes compute on every shorter one. Sorting by token count
first makes neighbours similar in length, so each micro-batch pads little; the caller scatters
results back through the returned indices, which restores the original order.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def plan_micro_batches(lengths: Sequence[int], max_num_seqs: int,
                       max_num_batched_tokens: int) -> list[np.ndarray]:
    """Split positions ``0..len(lengths)-1`` into micro-batches, shortest texts first.

    A micro-batch holds at most ``max_num_seqs`` texts and at most ``max_num_batched_tokens``
    padded positions (rows x its longest length); a single text over the token budget still gets
    a micro-batch of its own. Every position appears exactly once.
    """
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]  # ascending order: the newest member is the longest
        if end - start > max_num_seqs or (end - start) * longest > max_num_batched_tokens:
            if end - 1 > start:
                batches.append(order[start:end - 1])
                start = end - 1
    if start < len(order):
        batches.append(order[start:])
    return batches
