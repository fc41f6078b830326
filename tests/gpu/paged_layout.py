"""Random paged-KV batches with known ground truth, and an fp64 dense attention reference.

A batch is a set of sequences, each with ``context_len`` tokens of which the last ``query_len``
are new this step. Every sequence's logical keys/values are drawn first (the ground truth); the
cached prefix is written into shuffled, non-contiguous blocks by plain indexing, and the new
tokens are left for the store under test. Block tables are padded with ids of blocks that hold
other sequences' data, so reading past a context shows up as a wrong answer, not as zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trident.engine import attention
from trident.engine.attention import AttentionMetadata


@dataclass
class PagedBatch:
    query: torch.Tensor          # [num_tokens, num_heads, head_dim]
    key: torch.Tensor            # [num_tokens, num_kv_heads, head_dim] new tokens only
    value: torch.Tensor
    k_cache: torch.Tensor        # [num_blocks, block_size, num_kv_heads, head_dim] prefix written
    v_cache: torch.Tensor
    block_tables: torch.Tensor   # [num_seqs, max_blocks] int32
    slot_mapping: torch.Tensor   # [num_tokens] int64
    cu_seqlens_q: torch.Tensor   # [num_seqs + 1] int32
    context_lens: torch.Tensor   # [num_seqs] int32
    query_lens: list[int]
    context_lens_list: list[int]
    logical_k: list[torch.Tensor]  # per sequence [context_len, num_kv_heads, head_dim] fp64
    logical_v: list[torch.Tensor]

    @property
    def block_size(self) -> int:
        return self.k_cache.shape[1]

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    def metadata(self) -> AttentionMetadata:
        """The plain-PyTorch path's plan for this batch (never the kernels, whatever the device)."""
        return AttentionMetadata.build(self.slot_mapping, self.block_tables, self.query_lens,
                                       self.context_lens_list, self.block_size, use_kernels=False)


def make_paged_batch(query_lens: list[int], context_lens: list[int], *, num_heads: int, num_kv_heads: int,
                     head_dim: int, block_size: int, dtype: torch.dtype, device: torch.device,
                     seed: int, num_spare_blocks: int = 5) -> PagedBatch:
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    blocks_needed = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_needed) + num_spare_blocks
    permutation = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(blocks_needed) + 2
    # Padding entries point at real blocks (other sequences' data), never a harmless zero block.
    block_tables = torch.randint(0, num_blocks, (len(context_lens), max_blocks), generator=gen, dtype=torch.int32)
    k_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)  # stale data everywhere
    v_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)

    logical_k, logical_v, slots = [], [], []
    for seq, (query_len, context_len, n) in enumerate(zip(query_lens, context_lens, blocks_needed)):
        blocks, permutation = permutation[:n], permutation[n:]
        block_tables[seq, :n] = torch.tensor(blocks, dtype=torch.int32)
        k, v = randn(context_len, num_kv_heads, head_dim), randn(context_len, num_kv_heads, head_dim)
        positions = torch.arange(context_len)
        seq_slots = torch.tensor(blocks)[positions // block_size] * block_size + positions % block_size
        prefix = context_len - query_len
        k_cache.view(-1, num_kv_heads, head_dim)[seq_slots[:prefix]] = k[:prefix]
        v_cache.view(-1, num_kv_heads, head_dim)[seq_slots[:prefix]] = v[:prefix]
        slots.append(seq_slots[prefix:])
        # Ground truth is what the cache can hold: round through the test dtype.
        logical_k.append(k.to(dtype).double())
        logical_v.append(v.to(dtype).double())

    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    new_k = torch.cat([k[c - q:] for k, q, c in zip(logical_k, query_lens, context_lens)])
    new_v = torch.cat([v[c - q:] for v, q, c in zip(logical_v, query_lens, context_lens)])
    to = dict(device=device)
    return PagedBatch(
        query=randn(starts[-1], num_heads, head_dim).to(dtype).to(**to),
        key=new_k.to(dtype).to(**to), value=new_v.to(dtype).to(**to),
        k_cache=k_cache.to(dtype).to(**to), v_cache=v_cache.to(dtype).to(**to),
        block_tables=block_tables.to(**to), slot_mapping=torch.cat(slots).to(**to),
        cu_seqlens_q=torch.tensor(starts, dtype=torch.int32, device=device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        query_lens=list(query_lens), context_lens_list=list(context_lens),
        logical_k=logical_k, logical_v=logical_v,
    )


def plain_store(batch: PagedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Caches after the plain-PyTorch store, run on CPU copies (on CUDA ``store_kv`` is the kernel)."""
    k_cache, v_cache = batch.k_cache.cpu(), batch.v_cache.cpu()
    attention.store_kv(batch.key.cpu(), batch.value.cpu(), k_cache, v_cache, batch.slot_mapping.cpu())
    return k_cache.to(batch.k_cache.device), v_cache.to(batch.v_cache.device)


def dense_reference(batch: PagedBatch, scale: float) -> torch.Tensor:
    """Causal attention in fp64 from the ground-truth keys/values (no cache involved)."""
    query = batch.query.double().cpu()
    num_heads, num_kv_heads = query.shape[1], batch.logical_k[0].shape[1]
    outputs = []
    for seq, (query_len, context_len) in enumerate(zip(batch.query_lens, batch.context_lens_list)):
        start = int(batch.cu_seqlens_q[seq])
        q = query[start:start + query_len]  # [query_len, num_heads, head_dim]
        k = batch.logical_k[seq].repeat_interleave(num_heads // num_kv_heads, dim=1)  # [context_len, num_heads, head_dim]
        v = batch.logical_v[seq].repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [num_heads, query_len, context_len]
        positions = torch.arange(context_len - query_len, context_len)[:, None]  # [query_len, 1]
        scores = scores.masked_fill(torch.arange(context_len)[None, :] > positions, float("-inf"))
        outputs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
    return torch.cat(outputs)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in fp64; NaN anywhere gives NaN (which fails any bound)."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return float((actual - expected).norm() / expected.norm())
