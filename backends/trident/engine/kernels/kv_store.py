"""Fused write of one layer's new keys and values into their paged-cache slots."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from trident.engine.kernels.device import pad


@triton.jit
def _store_kv_kernel(
    key, value, k_cache, v_cache, slot_mapping,
    stride_key_t, stride_key_h, stride_value_t, stride_value_h,
    stride_kc_b, stride_kc_t, stride_kc_h, stride_vc_b, stride_vc_t, stride_vc_h,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping + token).to(tl.int64)
    # Negative slots are padding rows (CUDA-graph buckets run on more rows than the step has).
    if slot < 0:
        return
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)[:, None]  # [heads, 1]
    dims = tl.arange(0, DIM_PAD)[None, :]  # [1, head_dim]
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
    k = tl.load(key + token * stride_key_t + heads * stride_key_h + dims, mask=mask)  # [heads, head_dim]
    v = tl.load(value + token * stride_value_t + heads * stride_value_h + dims, mask=mask)
    k_dst = k_cache + block * stride_kc_b + offset * stride_kc_t + heads * stride_kc_h + dims
    v_dst = v_cache + block * stride_vc_b + offset * stride_vc_t + heads * stride_vc_h + dims
    tl.store(k_dst, k.to(k_cache.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache.dtype.element_ty), mask=mask)


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write ``key``/``value`` [num_tokens, num_kv_heads, head_dim] into the caches
    [num_blocks, block_size, num_kv_heads, head_dim] at ``slot_mapping`` [num_tokens]
    (slot = block_id * block_size + offset; a negative slot is skipped). One launch for K and V;
    key/value may be strided views (e.g. slices of a fused QKV output)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key/value must be contiguous in head_dim")
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HEADS_PAD=pad(num_kv_heads, 1),
        DIM_PAD=pad(head_dim, 1), BLOCK_SIZE=k_cache.shape[1],
        num_warps=1 if num_kv_heads * head_dim <= 512 else 4,
    )
