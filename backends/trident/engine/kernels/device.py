"""What the kernels ask of the device and dtype: tile padding, multiprocessor count, dot precision."""
from __future__ import annotations

import functools

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def pad(n: int, minimum: int = 16) -> int:
    """Tile extent for ``n`` rows or columns: a power of two, and at least what ``tl.dot`` accepts."""
    return max(minimum, 1 << (n - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full precision: tf32 would cost the fp32 path its exactness (~3e-4)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Multiprocessors on ``device``; a nominal 4 for the CPU interpreter (TRITON_INTERPRET=1)."""
    if device.type != "cuda":
        return 4
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def check_cache(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                kv_scales: torch.Tensor | None = None) -> None:
    """The layouts the kernels index: caches [num_blocks, block_size, num_kv_heads, head_dim], of
    the query's dtype, or int8 with per-head ``kv_scales`` [2, num_kv_heads] (keys, values)."""
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k/v caches must both be [num_blocks, block_size, kv_heads, head_dim] of one dtype, "
                         f"got {tuple(k_cache.shape)} {k_cache.dtype} and {tuple(v_cache.shape)} {v_cache.dtype}")
    if query.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"query dtype must be one of {SUPPORTED_DTYPES}, got {query.dtype}")
    if k_cache.dtype == torch.int8:
        if kv_scales is None or tuple(kv_scales.shape) != (2, k_cache.shape[2]) or kv_scales.stride(-1) != 1:
            raise ValueError(f"an int8 cache needs per-head scales [2, {k_cache.shape[2]}] (keys, values), "
                             f"got {None if kv_scales is None else tuple(kv_scales.shape)}")
    elif k_cache.dtype != query.dtype or kv_scales is not None:
        raise ValueError(f"the cache must be of the query's dtype ({query.dtype}) or int8 with scales, "
                         f"got {k_cache.dtype}{' with scales' if kv_scales is not None else ''}")
    if query.shape[-1] != k_cache.shape[-1] or query.shape[-2] % k_cache.shape[-2]:
        raise ValueError(f"query heads {tuple(query.shape[-2:])} do not fit cache heads {tuple(k_cache.shape[-2:])}")
    for name, t in (("query", query), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim")
