"""The one paged read both attention kernels share: a tile of cached keys and values, through a
sequence's block table (slot = block_table[token // block_size] * block_size + token % block_size),
and the per-head scales of an int8 cache."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_kv_tile(k_cache, v_cache, block_row, tokens, token_mask, kv_head, dims, dim_mask,
                 stride_kc_b, stride_kc_t, stride_kc_h, stride_vc_b, stride_vc_t, stride_vc_h,
                 BLOCK_SIZE: tl.constexpr):
    """K and V rows of ``tokens`` ([block_n] positions of one sequence), [block_n, head_dim] each;
    masked-out tokens read block 0 and come back as zeros."""
    blocks = tl.load(block_row + tokens // BLOCK_SIZE, mask=token_mask, other=0).to(tl.int64)
    offsets = tokens % BLOCK_SIZE
    kv_mask = token_mask[:, None] & dim_mask[None, :]
    k_ptrs = k_cache + blocks[:, None] * stride_kc_b + offsets[:, None] * stride_kc_t \
        + kv_head * stride_kc_h + dims[None, :]
    v_ptrs = v_cache + blocks[:, None] * stride_vc_b + offsets[:, None] * stride_vc_t \
        + kv_head * stride_vc_h + dims[None, :]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # [block_n, head_dim]
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)  # [block_n, head_dim]
    return k, v


@triton.jit
def head_scales(kv_scales, stride_ks, kv_head, scale_log2, KV_INT8: tl.constexpr):
    """(score multiplier, output multiplier) of a KV head: an int8 cache's key scale joins the
    softmax scale (q . (k_int8 * s_k) = s_k * (q . k_int8)), its value scale multiplies the output
    (sum_j p_j * v_int8_j * s_v, applied as acc / (l / s_v)); 1.0 for a cache of the query's dtype,
    which leaves acc / l as it was."""
    if KV_INT8:
        return scale_log2 * tl.load(kv_scales + kv_head), tl.load(kv_scales + stride_ks + kv_head)
    return scale_log2, 1.0
