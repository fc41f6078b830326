"""Varlen prefill attention: packed query chunks of many sequences over their paged context.

Each sequence contributes ``query_len`` new tokens (a whole prompt, a chunk of one, or a single
decode token in a mixed step) at the end of its ``context_len`` tokens. The new tokens' keys and
values are already in the cache (``store_kv`` runs first), so every key — cached prefix and new —
is read through the block table; nothing is gathered into a contiguous copy. Causal: query i of a
sequence sits at position ``context_len - query_len + i`` and sees keys up to that position.

One program handles ``BLOCK_M`` query rows of one sequence and one query head. Key tiles wholly
below the tile's first position need no mask; only the tiles on the diagonal are masked. With
``pack_gqa`` a program instead takes ``BLOCK_M`` (row, head) pairs of one KV head: the group's query
heads share each key/value tile it loads (the decode kernel's idea), and a tile spans BLOCK_M / GROUP
rows, so its causal range is shorter. An int8 cache is read as the decode kernel reads it
(``paged_kv.head_scales``).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from trident.engine.kernels.device import check_cache, dot_precision, pad
from trident.engine.kernels.paged_kv import head_scales, load_kv_tile


@triton.jit
def _attend_tile(q, acc, m_i, l_i, k_cache, v_cache, block_row, n0, kv_end, q_pos, kv_head, dims, dim_mask,
                 stride_kc_b, stride_kc_t, stride_kc_h, stride_vc_b, stride_vc_t, stride_vc_h, scale_log2,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                 IS_CAUSAL_TILE: tl.constexpr):
    tokens = n0 + tl.arange(0, BLOCK_N)  # [block_n]
    token_mask = tokens < kv_end
    k, v = load_kv_tile(k_cache, v_cache, block_row, tokens, token_mask, kv_head, dims, dim_mask,
                        stride_kc_b, stride_kc_t, stride_kc_h, stride_vc_b, stride_vc_t, stride_vc_h,
                        BLOCK_SIZE)  # [block_n, head_dim] each (int8 -> the query's dtype: exact)
    k, v = k.to(q.dtype), v.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [block_m, block_n]
    if IS_CAUSAL_TILE:
        visible = (tokens[None, :] <= q_pos[:, None]) & token_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])  # [block_m, block_n]
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)  # [block_m, head_dim]
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    query, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out, kv_scales,
    stride_q_t, stride_q_h, stride_kc_b, stride_kc_t, stride_kc_h, stride_vc_b, stride_vc_t, stride_vc_h,
    stride_bt_s, stride_o_t, stride_o_h, stride_ks, softmax_scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, KV_INT8: tl.constexpr,
    PACK_GQA: tl.constexpr,
):
    # PACK_GQA: axis 2 is the KV head, and the tile's BLOCK_M lines are (row, head of its group)
    # pairs, row-major; otherwise axis 2 is the query head and the lines are rows.
    m_block, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_seqlens_q + seq)
    query_len = tl.load(cu_seqlens_q + seq + 1) - q_start
    lines_per_row: tl.constexpr = GROUP if PACK_GQA else 1
    if m_block * BLOCK_M >= query_len * lines_per_row:
        return
    context_len = tl.load(context_lens + seq)
    kv_head = head if PACK_GQA else head // GROUP
    scale_log2, v_scale = head_scales(kv_scales, stride_ks, kv_head, softmax_scale_log2, KV_INT8)

    lines = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [block_m]
    rows = lines // lines_per_row  # [block_m] row within the sequence's chunk
    heads = kv_head * GROUP + lines % GROUP if PACK_GQA else head  # [block_m] query heads (or one)
    row_mask = rows < query_len
    dims = tl.arange(0, DIM_PAD)
    dim_mask = dims < HEAD_DIM
    q_ptrs = query + (q_start + rows)[:, None] * stride_q_t + heads[:, None] * stride_q_h + dims[None, :] \
        if PACK_GQA else query + (q_start + rows)[:, None] * stride_q_t + head * stride_q_h + dims[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None] & dim_mask[None, :], other=0.0)  # [block_m, head_dim]
    q_pos = context_len - query_len + rows  # [block_m] absolute positions

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    block_row = block_tables + seq * stride_bt_s
    first_pos = context_len - query_len + m_block * BLOCK_M // lines_per_row
    last_pos = context_len - query_len + (m_block * BLOCK_M + BLOCK_M - 1) // lines_per_row
    # Keys [0, full_end) are visible to every row of the tile; past it, up to the tile's last
    # position (kv_end), the causal mask applies.
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    kv_end = tl.minimum(context_len, last_pos + 1)
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache, v_cache, block_row, n0, kv_end, q_pos, kv_head, dims, dim_mask,
            stride_kc_b, stride_kc_t, stride_kc_h, stride_vc_b, stride_vc_t, stride_vc_h, scale_log2,
            BLOCK_SIZE, BLOCK_N, PRECISION, False)
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache, v_cache, block_row, n0, kv_end, q_pos, kv_head, dims, dim_mask,
            stride_kc_b, stride_kc_t, stride_kc_h, stride_vc_b, stride_vc_t, stride_vc_h, scale_log2,
            BLOCK_SIZE, BLOCK_N, PRECISION, True)

    o_ptrs = out + (q_start + rows)[:, None] * stride_o_t + heads[:, None] * stride_o_h + dims[None, :] \
        if PACK_GQA else out + (q_start + rows)[:, None] * stride_o_t + head * stride_o_h + dims[None, :]
    tl.store(o_ptrs, (acc / (l_i / v_scale)[:, None]).to(out.dtype.element_ty),
             mask=row_mask[:, None] & dim_mask[None, :])


def prefill_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                      scale: float, *, max_query_len: int, out: torch.Tensor | None = None,
                      block_m: int | None = None, block_n: int | None = None,
                      kv_scales: torch.Tensor | None = None, pack_gqa: bool = False,
                      num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """Causal attention of packed new tokens over their sequences' cached contexts.

    query [num_tokens, num_heads, head_dim] (sequences back to back as in ``cu_seqlens_q``
    [num_seqs + 1] int32); caches [num_blocks, block_size, num_kv_heads, head_dim], already holding
    the new tokens; block_tables [num_seqs, max_blocks] int32; context_lens [num_seqs] int32, new
    tokens included. ``max_query_len`` is the host-side bound that sizes the grid. An int8 cache
    comes with its per-head ``kv_scales`` [2, num_kv_heads] fp32 (keys, values). ``pack_gqa``: a
    program per KV head serves its group's query heads (see the module docstring).
    Returns ``out`` (or a new tensor) like ``query``.
    """
    check_cache(query, k_cache, v_cache, kv_scales)
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = cu_seqlens_q.shape[0] - 1
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(query) if out is None else out
    if num_tokens == 0:
        return out
    wide = query.dtype == torch.float32 or head_dim > 64
    group = num_heads // num_kv_heads
    pack_gqa = pack_gqa and group > 1
    lines = max_query_len * group if pack_gqa else max_query_len   # tile lines per sequence
    block_m = block_m or (16 if lines <= 16 else 64)
    block_n = block_n or max(block_size, 32 if wide else 64)
    grid = (triton.cdiv(lines, block_m), num_seqs, num_kv_heads if pack_gqa else num_heads)
    _prefill_kernel[grid](
        query, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        context_lens if kv_scales is None else kv_scales,
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), 0 if kv_scales is None else kv_scales.stride(0), scale * math.log2(math.e),
        GROUP=group, HEAD_DIM=head_dim, DIM_PAD=pad(head_dim),
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=dot_precision(query.dtype),
        KV_INT8=kv_scales is not None, PACK_GQA=pack_gqa, num_warps=num_warps, num_stages=num_stages,
    )
    return out
