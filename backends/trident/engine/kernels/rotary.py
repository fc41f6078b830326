"""Rotary position embedding applied in place to the query and key heads of each token.

One program per token reads its cos/sin row from the table by position (no gather kernel) and
rotates every query head and every key head (grouped-query counts differ; one launch serves
both), writing back into the same, possibly strided, views of the fused QKV output: no copies.
The layout is rotate-half (GPT-NeoX): ``[x1, x2] -> [x1*cos - x2*sin, x2*cos + x1*sin]``, with
cos/sin rounded to the model dtype and every product and sum rounded to it, as the PyTorch form does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from trident.engine.kernels.device import pad


@triton.jit
def _rotate_heads(ptr, row_offset, stride_h, cos, sin, NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                  HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    heads = tl.arange(0, HEADS_PAD)[:, None]  # [heads, 1]
    dims = tl.arange(0, HALF_PAD)[None, :]  # [1, head_dim / 2]
    mask = (heads < NUM_HEADS) & (dims < HALF)
    first = ptr + row_offset + heads * stride_h + dims
    x1 = tl.load(first, mask=mask, other=0.0)  # [heads, head_dim / 2] model dtype
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    c, s = cos.to(dtype).to(tl.float32), sin.to(dtype).to(tl.float32)  # [1, head_dim / 2]
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    # Each product and sum rounded to the model dtype on its own: the reference runs them as separate ops.
    out1 = ((x1 * c).to(dtype).to(tl.float32) - (x2 * s).to(dtype).to(tl.float32)).to(dtype)
    out2 = ((x2 * c).to(dtype).to(tl.float32) + (x1 * s).to(dtype).to(tl.float32)).to(dtype)
    tl.store(first, out1, mask=mask)
    tl.store(first + HALF, out2, mask=mask)


@triton.jit
def _rotary_kernel(
    positions, query, key, cos_sin, stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_cs_p, stride_cs_c,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions + token).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)[None, :]  # [1, head_dim / 2]
    row = cos_sin + position * stride_cs_p + dims
    cos = tl.load(row, mask=dims < HALF, other=0.0)  # [1, head_dim / 2] fp32
    sin = tl.load(row + stride_cs_c, mask=dims < HALF, other=0.0)
    _rotate_heads(query, token * stride_q_t, stride_q_h, cos, sin, NUM_HEADS, HEADS_PAD, HALF, HALF_PAD)
    _rotate_heads(key, token * stride_k_t, stride_k_h, cos, sin, NUM_KV_HEADS, KV_HEADS_PAD, HALF, HALF_PAD)


def apply_rotary(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotate query [num_tokens, num_heads, head_dim] and key [num_tokens, num_kv_heads, head_dim]
    in place by ``positions`` [num_tokens] (any integer dtype).

    ``cos_sin`` is the table [max_positions, 2, head_dim / 2] (fp32, ``attention_scaling`` already
    applied); positions must lie inside it. Query and key may be strided views (slices of a fused
    QKV output); each head must be contiguous in head_dim.
    """
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if key.shape[0] != num_tokens or key.shape[2] != head_dim or key.dtype != query.dtype:
        raise ValueError(f"key {tuple(key.shape)} {key.dtype} does not fit query {tuple(query.shape)} {query.dtype}")
    if query.stride(-1) != 1 or key.stride(-1) != 1 or cos_sin.stride(-1) != 1:
        raise ValueError("query, key and the cos/sin table must be contiguous in head_dim")
    if head_dim % 2 or tuple(cos_sin.shape[1:]) != (2, head_dim // 2):
        raise ValueError(f"cos/sin table {tuple(cos_sin.shape)} does not fit head_dim {head_dim}")
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        positions, query, key, cos_sin, query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        cos_sin.stride(0), cos_sin.stride(1),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEADS_PAD=pad(num_heads, 1),
        KV_HEADS_PAD=pad(num_kv_heads, 1), HALF=half, HALF_PAD=pad(half, 1),
        num_warps=1 if (num_heads + num_kv_heads) * head_dim <= 1024 else 4,
        enable_fp_fusion=False,  # the reference rounds each product; a fused multiply-add would not
    )
