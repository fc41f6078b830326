"""OpenAI Triton kernels for attention over the paged KV cache (CUDA; see README.md for numbers).

The same two verbs as ``trident.engine.attention`` — ``store_kv`` and ``paged_attention`` — over
the same layout (caches ``[num_blocks, block_size, num_kv_heads, head_dim]``, slot =
``block_id * block_size + offset``, block tables padded with any block id), computed by kernels
that read the block tables directly instead of gathering each sequence's KV into a copy:

* ``store_kv`` — one launch writes a layer's new keys and values into their slots;
* ``decode_attention`` — one query per sequence, grouped heads served by one K/V read, split-K
  for long contexts (``decode.py``);
* ``prefill_attention`` — packed variable-length chunks, causal, over cached prefix plus the new
  tokens (``prefill.py``); it also serves mixed steps, where decode rows are chunks of length 1.

``IS_AVAILABLE`` is False when triton does not import (CPU-only installs); the plain-PyTorch path
in ``attention.py`` then stays in charge. Under ``TRITON_INTERPRET=1`` the kernels also run on
CPU tensors (slowly), which is how they are checked without a GPU.
"""
from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401
except ImportError:  # CPU-only installs
    IS_AVAILABLE = False
else:
    IS_AVAILABLE = True

IS_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

if IS_AVAILABLE:
    from trident.engine.kernels.activation import gelu_tanh, silu_and_mul
    from trident.engine.kernels.decode import decode_attention
    from trident.engine.kernels.kv_store import store_kv
    from trident.engine.kernels.prefill import prefill_attention
    from trident.engine.kernels.rms_norm import rms_norm
    from trident.engine.kernels.rotary import apply_rotary, apply_rotary_and_store_kv


def supports(tensor: torch.Tensor) -> bool:
    """Whether the engine should use the kernels for ``tensor``: CUDA with triton importable.
    (The interpreter runs them on CPU too, but only where a caller asks for them explicitly.)"""
    return IS_AVAILABLE and tensor.is_cuda


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                    scale: float, *, max_query_len: int, max_context_len: int | None = None,
                    out: torch.Tensor | None = None, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of the packed new tokens over their sequences' paged contexts.

    The contract of ``trident.engine.attention.paged_attention`` with the metadata spelled out:
    query [num_tokens, num_heads, head_dim]; caches already hold the new tokens' K/V;
    cu_seqlens_q [num_seqs + 1], context_lens [num_seqs], block_tables [num_seqs, max_blocks]
    (int32, on the query's device). ``max_query_len`` and ``max_context_len`` are host-side
    bounds: a step of single-token queries takes the decode kernel, any other the prefill kernel.
    An int8 cache comes with its per-head ``kv_scales`` [2, num_kv_heads] (keys, values).
    """
    if max_query_len == 1:
        return decode_attention(query, k_cache, v_cache, block_tables, context_lens, scale,
                                max_context_len=max_context_len, out=out, kv_scales=kv_scales)
    return prefill_attention(query, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                             max_query_len=max_query_len, out=out, kv_scales=kv_scales)


__all__ = ["IS_AVAILABLE", "IS_INTERPRETED", "supports", "paged_attention"]
if IS_AVAILABLE:
    __all__ += ["store_kv", "decode_attention", "prefill_attention", "rms_norm", "apply_rotary",
                "apply_rotary_and_store_kv", "silu_and_mul", "gelu_tanh"]
