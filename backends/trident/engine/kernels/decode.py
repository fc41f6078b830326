"""Decode attention: one new query token per sequence, read straight from the paged KV cache.

One program serves one (sequence, KV head, split): it loads the whole group of query heads that
share the KV head, so grouped-query attention reads each cached key/value once. Long contexts are
cut into ``num_splits`` page-aligned ranges (flash-decoding): each split writes a partial output
and its log-sum-exp, and a second small kernel merges them. Short contexts at large batch use one
split and write the output directly. An int8 cache (per-head static scales) is read as it is: its
tiles are converted to the query's dtype (exact for int8), the key scale joins the score scale and
the value scale the output's divisor (``paged_kv.head_scales``).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from trident.engine.kernels.device import check_cache, dot_precision, num_sms, pad
from trident.engine.kernels.paged_kv import head_scales, load_kv_tile

# A split shorter than this spends more on its partial write and merge than it saves.
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64


@triton.jit
def _decode_kernel(
    query, k_cache, v_cache, block_tables, context_lens, out, partial_out, partial_lse, kv_scales,
    stride_q_t, stride_q_h, stride_kc_b, stride_kc_t, stride_kc_h, stride_vc_b, stride_vc_t, stride_vc_h,
    stride_bt_s, stride_o_t, stride_o_h, stride_po_s, stride_po_h, stride_po_p, stride_pl_s, stride_pl_h,
    stride_ks, scale_log2, num_splits,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, IS_SPLIT: tl.constexpr,
    KV_INT8: tl.constexpr,
):
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    score_scale, v_scale = head_scales(kv_scales, stride_ks, kv_head, scale_log2, KV_INT8)
    context_len = tl.load(context_lens + seq)
    # Page-aligned split ranges, sized per sequence so short and long contexts both balance.
    split_len = tl.cdiv(tl.cdiv(context_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, context_len)

    group = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + group  # [group]
    dims = tl.arange(0, DIM_PAD)
    head_mask = group < GROUP
    dim_mask = dims < HEAD_DIM
    q_ptrs = query + seq * stride_q_t + heads[:, None] * stride_q_h + dims[None, :]
    q = tl.load(q_ptrs, mask=head_mask[:, None] & dim_mask[None, :], other=0.0)  # [group, head_dim]

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    block_row = block_tables + seq * stride_bt_s
    for n0 in range(start, end, BLOCK_N):
        tokens = n0 + tl.arange(0, BLOCK_N)  # [block_n]
        token_mask = tokens < end
        k, v = load_kv_tile(k_cache, v_cache, block_row, tokens, token_mask, kv_head, dims, dim_mask,
                            stride_kc_b, stride_kc_t, stride_kc_h, stride_vc_b, stride_vc_t, stride_vc_h,
                            BLOCK_SIZE)  # [block_n, head_dim] each (int8 -> the query's dtype: exact)
        k, v = k.to(q.dtype), v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * score_scale  # [group, block_n]
        s = tl.where(token_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])  # [group, block_n]
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)  # [group, head_dim]
        m_i = m_new

    out_mask = head_mask[:, None] & dim_mask[None, :]
    if IS_SPLIT:
        # An empty split (context shorter than its start) leaves l_i = 0: it merges with weight 0.
        has_tokens = l_i > 0
        o = tl.where(has_tokens[:, None], acc / (tl.where(has_tokens, l_i, 1.0) / v_scale)[:, None], 0.0)
        lse = tl.where(has_tokens, m_i + tl.log2(tl.where(has_tokens, l_i, 1.0)), float("-inf"))
        po_ptrs = partial_out + seq * stride_po_s + heads[:, None] * stride_po_h + split * stride_po_p + dims[None, :]
        tl.store(po_ptrs, o, mask=out_mask)
        tl.store(partial_lse + seq * stride_pl_s + heads * stride_pl_h + split, lse, mask=head_mask)
    else:
        o_ptrs = out + seq * stride_o_t + heads[:, None] * stride_o_h + dims[None, :]
        # A padding row (context_len 0, as in a CUDA-graph bucket) gets zeros rather than NaN.
        o = acc / (tl.where(l_i > 0, l_i, 1.0) / v_scale)[:, None]   # (/ 1.0: the same bits as before)
        tl.store(o_ptrs, o.to(out.dtype.element_ty), mask=out_mask)


@triton.jit
def _merge_kernel(
    partial_out, partial_lse, out, num_splits,
    stride_po_s, stride_po_h, stride_po_p, stride_pl_s, stride_pl_h, stride_o_t, stride_o_h,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    seq, head = tl.program_id(0), tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, DIM_PAD)
    split_mask = splits < num_splits
    lse = tl.load(partial_lse + seq * stride_pl_s + head * stride_pl_h + splits, mask=split_mask,
                  other=float("-inf"))  # [splits]
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # padding row: every split empty
    weights = tl.exp2(lse - lse_max)  # [splits]
    po_ptrs = partial_out + seq * stride_po_s + head * stride_po_h + splits[:, None] * stride_po_p + dims[None, :]
    o = tl.load(po_ptrs, mask=split_mask[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)  # [splits, head_dim]
    total = tl.sum(weights, 0)
    merged = tl.sum(o * weights[:, None], 0) / tl.where(total > 0, total, 1.0)  # [head_dim]
    tl.store(out + seq * stride_o_t + head * stride_o_h + dims, merged.to(out.dtype.element_ty),
             mask=dims < HEAD_DIM)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """Enough splits to give every multiprocessor about two programs, none shorter than
    ``MIN_TOKENS_PER_SPLIT`` tokens. Depends only on shapes, so a CUDA graph can fix it."""
    programs = num_seqs * num_kv_heads
    wanted = math.ceil(2 * num_sms(device) / programs)
    return max(1, min(wanted, math.ceil(max_context_len / MIN_TOKENS_PER_SPLIT), MAX_SPLITS))


def _block_n(block_size: int, head_dim: int, tokens_per_split: int) -> int:
    """Keys per loop step. Measured on H100 (README.md): long splits amortise a 128-key tile
    (-11% time at 683 keys per split); a split of a few pages wastes its tail (+17% at 192 keys)."""
    return max(block_size, 128 if tokens_per_split >= 512 and head_dim <= 64 else 64)


def decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float, *,
                     max_context_len: int | None = None, num_splits: int | None = None,
                     out: torch.Tensor | None = None, block_n: int | None = None,
                     kv_scales: torch.Tensor | None = None,
                     num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """Attention of one query token per sequence over its cached context (its own key included).

    query [num_seqs, num_heads, head_dim]; caches [num_blocks, block_size, num_kv_heads, head_dim];
    block_tables [num_seqs, max_blocks] int32; context_lens [num_seqs] int32 (>= 1).
    ``max_context_len`` (a host-side upper bound; default: what the block table can address) and
    ``num_splits`` only tune the split; neither reads device memory, so the call can be captured.
    A row with context_len 0 (a CUDA-graph padding row) gets zeros. An int8 cache comes with its
    per-head ``kv_scales`` [2, num_kv_heads] fp32 (keys, values). Returns ``out`` (or a new tensor)
    like ``query``.
    """
    check_cache(query, k_cache, v_cache, kv_scales)
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query) if out is None else out
    if num_seqs == 0:
        return out
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_context_len, query.device)
    block_n = block_n or _block_n(block_size, head_dim, -(-max_context_len // num_splits))
    is_split = num_splits > 1
    dim_pad = pad(head_dim)
    if is_split:
        partial_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32,
                                  device=query.device)  # [num_seqs, num_heads, num_splits, head_dim]
        partial_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=query.device)
    else:
        partial_out = partial_lse = out  # unused: IS_SPLIT prunes every access
    po_strides = partial_out.stride()[:3] if is_split else (0, 0, 0)
    pl_strides = partial_lse.stride()[:2] if is_split else (0, 0)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, context_lens, out, partial_out, partial_lse,
        context_lens if kv_scales is None else kv_scales,
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), *po_strides, *pl_strides,
        0 if kv_scales is None else kv_scales.stride(0), scale * math.log2(math.e), num_splits,
        GROUP=group, GROUP_PAD=pad(group), HEAD_DIM=head_dim, DIM_PAD=dim_pad,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, PRECISION=dot_precision(query.dtype), IS_SPLIT=is_split,
        KV_INT8=kv_scales is not None, num_warps=num_warps, num_stages=num_stages,
    )
    if is_split:
        _merge_kernel[(num_seqs, num_heads)](
            partial_out, partial_lse, out, num_splits, *po_strides, *pl_strides, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, DIM_PAD=dim_pad, SPLITS_PAD=pad(num_splits, 1),
            num_warps=1 if head_dim <= 64 else 2,
        )
    return out
