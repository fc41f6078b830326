"""Attention over the paged KV cache, in plain PyTorch (CPU and CUDA).

Two verbs, the seam where the fused GPU kernels slot in:

* ``store_kv`` writes the new tokens' keys and values into their cache slots;
* ``paged_attention`` attends every new query over its sequence's whole context, read from the
  cache through the sequence's block table, with causal masking.

On CUDA (with triton importable) both verbs hand over to the Triton kernels in
``trident.engine.kernels``, which read the block tables directly; this plain path stays for the
CPU and as their reference. For the plain path, the per-step plan (which rows are single-token
decodes, which are prefill chunks, the decode gather table and masks) is built once per step in
``AttentionMetadata`` and shared by all layers; the kernels need only its layout fields.
The cache layout itself (``[num_blocks, block_size, num_kv_heads, head_dim]`` per layer, slot =
``block_id * block_size + offset``) is defined in ``model_runner.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trident.engine import kernels


@dataclass
class DecodeBatch:
    """Single-token queries attended together, padded to the longest context and masked."""
    token_indices: torch.Tensor   # [num_decodes] rows of the packed batch
    block_tables: torch.Tensor    # [num_decodes, max_blocks] padding blocks are masked out
    mask: torch.Tensor            # [num_decodes, 1, 1, max_blocks * block_size] True = attend
    is_whole_batch: bool = False  # every row of the step is a decode (no scatter needed)


@dataclass
class PrefillSpan:
    """A run of more than one new token of one sequence (a prompt, or a chunk of one)."""
    start: int                    # first row in the packed batch
    end: int                      # one past the last row
    context_len: int              # tokens in the cache after this step, new ones included
    block_table: torch.Tensor     # [num_blocks] blocks covering the context
    mask: torch.Tensor | None     # [query_len, context_len]; None when the context is only new tokens

    @property
    def is_fresh(self) -> bool:
        """No earlier context: attend the new keys/values directly, with a plain causal mask."""
        return self.mask is None


@dataclass
class AttentionMetadata:
    """Where the new tokens go in the cache and what each query may see.

    ``slot_mapping``, ``cu_seqlens_q``, ``context_lens`` and ``block_tables`` (with the host-side
    bounds ``max_query_len``/``max_context_len``) are the layout the kernels read; ``decode`` and
    ``prefills`` are the plain-PyTorch plan derived from them, left empty when ``use_kernels``.
    """
    slot_mapping: torch.Tensor    # [num_tokens] int64 cache slot of each new token
    cu_seqlens_q: torch.Tensor    # [num_seqs + 1] int32 query start offsets in the packed batch
    context_lens: torch.Tensor    # [num_seqs] int32 tokens in the cache after this step
    block_tables: torch.Tensor    # [num_seqs, max_blocks] int32, padded with 0
    block_size: int
    decode: DecodeBatch | None
    prefills: list[PrefillSpan]
    max_query_len: int = 1
    max_context_len: int = 0
    use_kernels: bool = False     # attend with the Triton kernels (the plain plan is not built)

    @classmethod
    def build(cls, slot_mapping: torch.Tensor, block_tables: torch.Tensor, query_lens: list[int],
              context_lens: list[int], block_size: int, use_kernels: bool | None = None) -> "AttentionMetadata":
        """Derive the per-step plan from host-side lengths; tensors go to ``slot_mapping.device``.

        ``use_kernels``: None picks the Triton kernels wherever they run (CUDA tensors, triton
        importable); False forces the plain path (the kernels' reference).
        """
        device = slot_mapping.device
        if use_kernels is None:
            use_kernels = kernels.supports(slot_mapping)
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        decode, prefills = None, []
        if not use_kernels:
            decode_rows = [i for i, n in enumerate(query_lens) if n == 1]
            decode = _decode_batch(decode_rows, starts, context_lens, block_tables, block_size)
            prefills = [_prefill_span(starts[i], query_lens[i], context_lens[i], block_tables[i], block_size)
                        for i, n in enumerate(query_lens) if n > 1]
        return cls(
            slot_mapping=slot_mapping,
            cu_seqlens_q=torch.tensor(starts, dtype=torch.int32, device=device),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
            block_tables=block_tables,
            block_size=block_size,
            decode=decode,
            prefills=prefills,
            max_query_len=max(query_lens),
            max_context_len=max(context_lens),
            use_kernels=use_kernels,
        )


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write the new tokens' keys/values into their slots (one layer's cache)."""
    if kernels.supports(key):
        kernels.store_kv(key, value, k_cache, v_cache, slot_mapping)  # one launch, bit-identical result
        return
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)  # [num_slots, kv_heads, head_dim]
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def paged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                    kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each new query over its sequence's cached context.

    query: [num_tokens, num_heads, head_dim]; key/value: [num_tokens, num_kv_heads, head_dim] (the
    new tokens, already stored, used directly for prefills without earlier context).
    k_cache/v_cache: [num_blocks, block_size, num_kv_heads, head_dim]. Returns like ``query``.
    kv_scales: [2, num_kv_heads] per-head scales of an int8 cache (dequantized as it is gathered
    here, as its tiles are read by the kernels).
    """
    if metadata.use_kernels:
        return kernels.paged_attention(query, k_cache, v_cache, metadata.block_tables, metadata.cu_seqlens_q,
                                       metadata.context_lens, scale, max_query_len=metadata.max_query_len,
                                       max_context_len=metadata.max_context_len, kv_scales=kv_scales)
    decode = metadata.decode
    if decode is not None and decode.is_whole_batch:
        return _decode_attention(query, k_cache, v_cache, decode, scale, kv_scales)
    output = torch.empty_like(query)
    if decode is not None:
        output[decode.token_indices] = _decode_attention(query[decode.token_indices], k_cache, v_cache, decode, scale,
                                                            kv_scales)
    for span in metadata.prefills:
        output[span.start:span.end] = _prefill_attention(
            query[span.start:span.end], key[span.start:span.end], value[span.start:span.end],
            k_cache, v_cache, span, scale, kv_scales)
    return output


def _decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      batch: DecodeBatch, scale: float, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    num_decodes, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    # Grouped-query heads become the query-length axis, so one key/value head serves its whole
    # group without repeating the cache.
    q = query.view(num_decodes, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, kv_heads, group, head_dim]
    k = _gather(k_cache, batch.block_tables, *_scale_of(kv_scales, 0, query.dtype))  # [B, kv_heads, max_context, head_dim]
    v = _gather(v_cache, batch.block_tables, *_scale_of(kv_scales, 1, query.dtype))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.mask, scale=scale)  # [B, kv_heads, group, head_dim]
    return out.reshape(num_decodes, num_heads, head_dim)


def _prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, span: PrefillSpan, scale: float,
                       kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    if span.is_fresh:
        k, v = key.transpose(0, 1), value.transpose(0, 1)  # [kv_heads, query_len, head_dim]
    else:
        k = _gather(k_cache, span.block_table[None], *_scale_of(kv_scales, 0, query.dtype))[0, :, :span.context_len]  # [kv_heads, context_len, head_dim]
        v = _gather(v_cache, span.block_table[None], *_scale_of(kv_scales, 1, query.dtype))[0, :, :span.context_len]
    q = query.transpose(0, 1)  # [num_heads, query_len, head_dim]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=span.mask, is_causal=span.is_fresh,
                                         scale=scale, enable_gqa=True)  # [num_heads, query_len, head_dim]
    return out.transpose(0, 1)


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, scale: torch.Tensor | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """[num_blocks, block_size, kv_heads, head_dim] -> [B, kv_heads, max_blocks * block_size, head_dim];
    an int8 cache is dequantized with its per-head ``scale`` [kv_heads] into ``dtype``."""
    b, num_blocks = block_tables.shape
    _, block_size, num_kv_heads, head_dim = cache.shape
    blocks = cache.index_select(0, block_tables.reshape(-1))  # [B * max_blocks, block_size, kv_heads, head_dim]
    if scale is not None:
        blocks = blocks.to(dtype) * scale.to(dtype)[:, None]  # only the gathered blocks, not the whole cache
    return blocks.view(b, num_blocks * block_size, num_kv_heads, head_dim).transpose(1, 2)


def _scale_of(kv_scales: torch.Tensor | None, index: int, dtype: torch.dtype) -> tuple:
    return () if kv_scales is None else (kv_scales[index], dtype)


def _decode_batch(rows: list[int], starts: list[int], context_lens: list[int], block_tables: torch.Tensor,
                  block_size: int) -> DecodeBatch | None:
    if not rows:
        return None
    device = block_tables.device
    lens = [context_lens[i] for i in rows]
    max_blocks = -(-max(lens) // block_size)
    index = torch.tensor(rows, dtype=torch.long, device=device)
    positions = torch.arange(max_blocks * block_size, device=device)  # [max_context]
    mask = positions[None, :] < torch.tensor(lens, device=device)[:, None]  # [B, max_context]
    return DecodeBatch(
        token_indices=torch.tensor([starts[i] for i in rows], dtype=torch.long, device=device),
        block_tables=block_tables.index_select(0, index)[:, :max_blocks],
        mask=mask[:, None, None, :],
        is_whole_batch=len(rows) == len(context_lens),
    )


def _prefill_span(start: int, query_len: int, context_len: int, block_table: torch.Tensor,
                  block_size: int) -> PrefillSpan:
    num_blocks = -(-context_len // block_size)
    mask = None
    if context_len > query_len:
        # Query i sits at position context_len - query_len + i and sees every key up to it.
        first = context_len - query_len
        mask = torch.ones(query_len, context_len, dtype=torch.bool, device=block_table.device).tril(first)
    return PrefillSpan(start=start, end=start + query_len, context_len=context_len,
                       block_table=block_table[:num_blocks], mask=mask)
