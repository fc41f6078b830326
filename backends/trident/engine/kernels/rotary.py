"""Rotary position embedding applied in place to the query and key heads of each token.

One program per token reads its cos/sin row from the table by position (no gather kernel) and
rotates every query head and every key head (grouped-query counts differ; one launch serves
both), writing back into the same, possibly strided, views of the fused QKV output: no copies.
``apply_rotary_and_store_kv`` also writes the rotated key and the value into their paged-cache
slots from the same program, which saves the separate ``store_kv`` launch.
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
    """Rotate one token's heads in place; returns the two rotated halves [heads, head_dim / 2]."""
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
    return out1, out2


@triton.jit
def _rotary_kernel(
    positions, query, key, cos_sin, stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_cs_p, stride_cs_c,
    value, k_cache, v_cache, slot_mapping, stride_v_t, stride_v_h,
    stride_kc_b, stride_kc_t, stride_kc_h, stride_vc_b, stride_vc_t, stride_vc_h,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, STORE_KV: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions + token).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)[None, :]  # [1, head_dim / 2]
    row = cos_sin + position * stride_cs_p + dims
    cos = tl.load(row, mask=dims < HALF, other=0.0)  # [1, head_dim / 2] fp32
    sin = tl.load(row + stride_cs_c, mask=dims < HALF, other=0.0)
    _rotate_heads(query, token * stride_q_t, stride_q_h, cos, sin, NUM_HEADS, HEADS_PAD, HALF, HALF_PAD)
    k1, k2 = _rotate_heads(key, token * stride_k_t, stride_k_h, cos, sin, NUM_KV_HEADS, KV_HEADS_PAD,
                           HALF, HALF_PAD)
    if STORE_KV:
        # The rotated key and the value go straight to their cache slot, as store_kv would put them
        # (a negative slot is a CUDA-graph padding row: nothing stored).
        slot = tl.load(slot_mapping + token).to(tl.int64)
        block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        heads = tl.arange(0, KV_HEADS_PAD)[:, None]  # [kv_heads, 1]
        mask = (heads < NUM_KV_HEADS) & (dims < HALF) & (slot >= 0)
        k_dst = k_cache + block * stride_kc_b + offset * stride_kc_t + heads * stride_kc_h + dims
        tl.store(k_dst, k1.to(k_cache.dtype.element_ty), mask=mask)
        tl.store(k_dst + HALF, k2.to(k_cache.dtype.element_ty), mask=mask)
        v_src = value + token * stride_v_t + heads * stride_v_h + dims
        v_dst = v_cache + block * stride_vc_b + offset * stride_vc_t + heads * stride_vc_h + dims
        tl.store(v_dst, tl.load(v_src, mask=mask).to(v_cache.dtype.element_ty), mask=mask)
        tl.store(v_dst + HALF, tl.load(v_src + HALF, mask=mask).to(v_cache.dtype.element_ty), mask=mask)


def apply_rotary(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotate query [num_tokens, num_heads, head_dim] and key [num_tokens, num_kv_heads, head_dim]
    in place by ``positions`` [num_tokens] (any integer dtype).

    ``cos_sin`` is the table [max_positions, 2, head_dim / 2] (fp32, ``attention_scaling`` already
    applied); positions must lie inside it. Query and key may be strided views (slices of a fused
    QKV output); each head must be contiguous in head_dim.
    """
    _launch(positions, query, key, cos_sin, None)


def apply_rotary_and_store_kv(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              slot_mapping: torch.Tensor) -> None:
    """``apply_rotary`` and then ``store_kv(key, value, k_cache, v_cache, slot_mapping)`` in the same
    launch: caches [num_blocks, block_size, num_kv_heads, head_dim], slot = block_id * block_size +
    offset, negative slots skipped; value [num_tokens, num_kv_heads, head_dim] may be strided."""
    if value.shape != key.shape or k_cache.shape != v_cache.shape or k_cache.shape[-2:] != key.shape[-2:]:
        raise ValueError(f"key {tuple(key.shape)}, value {tuple(value.shape)} and caches {tuple(k_cache.shape)} "
                         f"/ {tuple(v_cache.shape)} do not fit")
    if value.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("value and the caches must be contiguous in head_dim")
    _launch(positions, query, key, cos_sin, (value, k_cache, v_cache, slot_mapping))


def _launch(positions, query, key, cos_sin, store) -> None:
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
    # Without a store the cache arguments are never read: the key stands in for them.
    value, k_cache, v_cache, slot_mapping = store if store is not None else (key, key, key, positions)
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        positions, query, key, cos_sin, query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        cos_sin.stride(0), cos_sin.stride(1),
        value, k_cache, v_cache, slot_mapping, value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(-2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(-2),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEADS_PAD=pad(num_heads, 1),
        KV_HEADS_PAD=pad(num_kv_heads, 1), HALF=half, HALF_PAD=pad(half, 1),
        STORE_KV=store is not None, BLOCK_SIZE=k_cache.shape[1] if store is not None else 1,
        num_warps=1 if (num_heads + num_kv_heads) * head_dim <= 1024 else 4,
        enable_fp_fusion=False,  # the reference rounds each product; a fused multiply-add would not
    )
