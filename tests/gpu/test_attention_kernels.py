"""The Triton paged-attention kernels against the plain-PyTorch path and an fp64 dense reference.

Runs on CUDA; also on CPU under the Triton interpreter (``TRITON_INTERPRET=1``, with shorter
contexts so it stays quick); skipped otherwise.
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.gpu.paged_layout import PagedBatch, dense_reference, make_paged_batch, plain_store, relative_error
from tests.gpu.kernel_device import DEVICE, IS_CUDA, KERNEL_TEST_MARKS
from trident.engine import attention, kernels
from trident.models.quant import dequantize_kv, quantize_kv


pytestmark = KERNEL_TEST_MARKS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Triton 3.6's interpreter computes bf16 dot products wrongly (numpy has no bf16): CUDA only.
ATTENTION_DTYPES = [torch.float32, torch.float16,
                    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
                        not IS_CUDA, reason="the Triton interpreter mis-computes bf16 dots"))]
# Relative error bounds: fp32 multiplies in full precision; fp16/bf16 round P before P·V.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (group size, head_dim, block_size): every pair of the three axes appears at least once.
LAYOUTS = [(1, 64, 16), (3, 128, 32), (4, 64, 32), (4, 128, 16), (1, 128, 32), (3, 64, 16)]
NUM_KV_HEADS = 2
MAX_CONTEXT = 3000 if IS_CUDA else 300  # the interpreter runs kernels in numpy


def _contexts(lens: list[int]) -> list[int]:
    return [min(n, MAX_CONTEXT) for n in lens]


# Decode: page boundaries (15/16/17, 31/33), one-token and long contexts.
DECODE_CONTEXTS = _contexts([1, 2, 15, 16, 17, 31, 33, 100, 511, 1024, 2049, 3000])
# Prefill (query_len, context_len): fresh prompts, chunks after a cached prefix, decode rows
# mixed in, chunks not aligned to pages or to the kernel's tiles.
PREFILL_CHUNKS = [(5, 5), (1, 700), (37, 37), (64, 193), (1, 1), (200, 3000), (130, 130), (17, 33), (70, 2100)]


def _chunks() -> tuple[list[int], list[int]]:
    pairs = [(min(q, MAX_CONTEXT), min(c, MAX_CONTEXT)) for q, c in PREFILL_CHUNKS]
    return [q for q, _ in pairs], [c for _, c in pairs]


def _batch(query_lens: list[int], context_lens: list[int], dtype: torch.dtype, layout: tuple[int, int, int],
           seed: int) -> PagedBatch:
    group, head_dim, block_size = layout
    return make_paged_batch(query_lens, context_lens, num_heads=NUM_KV_HEADS * group, num_kv_heads=NUM_KV_HEADS,
                            head_dim=head_dim, block_size=block_size, dtype=dtype, device=DEVICE, seed=seed)


def _poisoned(like: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN: any element the kernel fails to write fails the test."""
    return torch.full_like(like, float("nan"))


def _check_against_references(batch: PagedBatch, actual: torch.Tensor, scale: float) -> None:
    plain_k, plain_v = plain_store(batch)
    plain = attention.paged_attention(batch.query, batch.key, batch.value, plain_k, plain_v,
                                      batch.metadata(), scale)
    expected = dense_reference(batch, scale)
    tol = TOLERANCE[batch.query.dtype]
    kernel_error = relative_error(actual, expected)
    plain_error = relative_error(plain, expected)
    assert kernel_error <= max(tol, 2 * plain_error), (kernel_error, plain_error)
    assert relative_error(actual, plain) <= tol


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_store_kv_writes_the_same_cache_as_the_plain_store(dtype):
    batch = _batch([3, 1, 40], _contexts([3, 900, 57]), dtype, (3, 64, 16), seed=1)
    # Keys/values as the model produces them: strided slices of one fused projection output.
    fused = torch.cat([batch.query, batch.key, batch.value], dim=1)  # [num_tokens, heads + 2 * kv_heads, head_dim]
    heads = batch.query.shape[1]
    key, value = fused[:, heads:heads + NUM_KV_HEADS], fused[:, heads + NUM_KV_HEADS:]
    expected_k, expected_v = plain_store(batch)

    kernels.store_kv(key, value, batch.k_cache, batch.v_cache, batch.slot_mapping)

    assert torch.equal(batch.k_cache, expected_k) and torch.equal(batch.v_cache, expected_v)


def test_store_kv_skips_negative_slots():
    batch = _batch([4, 1], [4, 20], torch.float16, (1, 64, 16), seed=2)
    before_k, before_v = batch.k_cache.clone(), batch.v_cache.clone()
    padded = torch.full_like(batch.slot_mapping, -1)

    kernels.store_kv(batch.key, batch.value, batch.k_cache, batch.v_cache, padded)

    assert torch.equal(batch.k_cache, before_k) and torch.equal(batch.v_cache, before_v)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "g{}-d{}-bs{}".format(*l))
@pytest.mark.parametrize("dtype", ATTENTION_DTYPES, ids=str)
def test_decode_matches_plain_path_and_dense_reference(dtype, layout):
    batch = _batch([1] * len(DECODE_CONTEXTS), DECODE_CONTEXTS, dtype, layout, seed=3)
    scale = 1 / math.sqrt(layout[1])
    kernels.store_kv(batch.key, batch.value, batch.k_cache, batch.v_cache, batch.slot_mapping)

    out = kernels.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.cu_seqlens_q,
                                  batch.context_lens, scale, max_query_len=1, out=_poisoned(batch.query))

    _check_against_references(batch, out, scale)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "g{}-d{}-bs{}".format(*l))
@pytest.mark.parametrize("dtype", ATTENTION_DTYPES, ids=str)
def test_prefill_matches_plain_path_and_dense_reference(dtype, layout):
    query_lens, context_lens = _chunks()
    batch = _batch(query_lens, context_lens, dtype, layout, seed=4)
    scale = 1 / math.sqrt(layout[1])
    kernels.store_kv(batch.key, batch.value, batch.k_cache, batch.v_cache, batch.slot_mapping)

    out = kernels.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.cu_seqlens_q,
                                  batch.context_lens, scale, max_query_len=batch.max_query_len,
                                  out=_poisoned(batch.query))

    _check_against_references(batch, out, scale)


def _int8_cache(batch: PagedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's caches quantized as an int8 KV cache stores them (``quant.quantize_kv``: static
    per-head scales), the new tokens stored by the kernel: (k_cache, v_cache, kv_scales [2, kv_heads])."""
    scales = torch.stack([(batch.key.float().abs().amax(dim=(0, 2)) * 1.1 + 0.5) / 127,
                          (batch.value.float().abs().amax(dim=(0, 2)) * 1.3 + 0.5) / 127])  # [2, kv_heads] unequal
    k_cache, v_cache = quantize_kv(batch.k_cache, scales[0]), quantize_kv(batch.v_cache, scales[1])
    kernels.store_kv(quantize_kv(batch.key, scales[0]), quantize_kv(batch.value, scales[1]), k_cache, v_cache,
                     batch.slot_mapping)
    return k_cache, v_cache, scales.to(batch.query.device)


@pytest.mark.parametrize("layout", LAYOUTS[:3], ids=lambda l: "g{}-d{}-bs{}".format(*l))
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
@pytest.mark.parametrize("dtype", ATTENTION_DTYPES, ids=str)
def test_int8_cache_matches_the_plain_path(dtype, decode, layout):
    """An int8 KV cache read by the kernels (tiles converted, per-head scales folded into the score
    and the output) gives the plain path's answer, which dequantizes the gathered blocks."""
    if decode:
        query_lens, context_lens = [1] * len(DECODE_CONTEXTS), DECODE_CONTEXTS
    else:
        query_lens, context_lens = _chunks()
    batch = _batch(query_lens, context_lens, dtype, layout, seed=9)
    scale = 1 / math.sqrt(layout[1])
    k_cache, v_cache, kv_scales = _int8_cache(batch)

    out = kernels.paged_attention(batch.query, k_cache, v_cache, batch.block_tables, batch.cu_seqlens_q,
                                  batch.context_lens, scale, max_query_len=batch.max_query_len,
                                  out=_poisoned(batch.query), kv_scales=kv_scales)

    # (The plain path attends a fresh prompt's own keys directly: the values the cache gives back.)
    key, value = (dequantize_kv(quantize_kv(x.cpu(), s.cpu()), s.cpu(), dtype)
                  for x, s in ((batch.key, kv_scales[0]), (batch.value, kv_scales[1])))
    plain = attention.paged_attention(batch.query.cpu(), key, value, k_cache.cpu(), v_cache.cpu(),
                                      _cpu_metadata(batch), scale, kv_scales.cpu())
    assert relative_error(out.cpu(), plain) <= TOLERANCE[dtype]
    # and near the unquantized answer: int8 steps of ~1% of each head's range
    assert relative_error(out, dense_reference(batch, scale)) <= 0.05


def _cpu_metadata(batch: PagedBatch):
    return attention.AttentionMetadata.build(batch.slot_mapping.cpu(), batch.block_tables.cpu(), batch.query_lens,
                                             batch.context_lens_list, batch.block_size, use_kernels=False)


def test_int8_cache_needs_its_scales():
    batch = _batch([1, 1], [30, 9], torch.float16, (3, 64, 16), seed=10)
    k_cache, v_cache, kv_scales = _int8_cache(batch)
    with pytest.raises(ValueError, match="per-head scales"):
        kernels.decode_attention(batch.query, k_cache, v_cache, batch.block_tables, batch.context_lens, 0.125)
    with pytest.raises(ValueError, match="query's dtype"):
        kernels.decode_attention(batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.context_lens,
                                 0.125, kv_scales=kv_scales)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "g{}-d{}-bs{}".format(*l))
@pytest.mark.parametrize("block_m", [16, 64, 128])
def test_prefill_packing_a_kv_heads_group_matches_the_plain_path(layout, block_m):
    """``pack_gqa``: tiles of (row, head) pairs of one KV head, rows cut mid-group at tile edges, the
    causal range per tile from its first to its last row; fp16, every prefill shape."""
    query_lens, context_lens = _chunks()
    batch = _batch(query_lens, context_lens, torch.float16, layout, seed=11)
    scale = 1 / math.sqrt(layout[1])
    kernels.store_kv(batch.key, batch.value, batch.k_cache, batch.v_cache, batch.slot_mapping)

    out = kernels.prefill_attention(batch.query, batch.k_cache, batch.v_cache, batch.block_tables,
                                    batch.cu_seqlens_q, batch.context_lens, scale, max_query_len=batch.max_query_len,
                                    out=_poisoned(batch.query), block_m=block_m, pack_gqa=True)

    _check_against_references(batch, out, scale)


@pytest.mark.parametrize("num_splits", [1, 3, 8, 64])
def test_decode_splits_agree_with_the_dense_reference(num_splits):
    # Many splits over short contexts leave some splits empty: they must merge with weight zero.
    batch = _batch([1] * 5, _contexts([1, 40, 257, 1500, 2999]), torch.float32, (4, 64, 16), seed=5)
    kernels.store_kv(batch.key, batch.value, batch.k_cache, batch.v_cache, batch.slot_mapping)

    out = kernels.decode_attention(batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.context_lens,
                                   0.125, num_splits=num_splits, out=_poisoned(batch.query))

    assert relative_error(out, dense_reference(batch, 0.125)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_padding_rows_get_zeros(num_splits):
    batch = _batch([1, 1], [30, 9], torch.float16, (3, 64, 16), seed=6)
    kernels.store_kv(batch.key, batch.value, batch.k_cache, batch.v_cache, batch.slot_mapping)
    context_lens = batch.context_lens.clone()
    context_lens[1] = 0

    out = kernels.decode_attention(batch.query, batch.k_cache, batch.v_cache, batch.block_tables, context_lens,
                                   0.125, num_splits=num_splits, out=_poisoned(batch.query))

    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(out[0]).all()


@pytest.mark.skipif(not IS_CUDA, reason="CUDA graphs need CUDA")
def test_decode_step_replays_under_a_cuda_graph():
    """Store + decode captured once, replayed on new inputs written into the same buffers."""
    first = _batch([1] * 6, [5, 16, 17, 300, 1200, 2000], torch.bfloat16, (3, 64, 16), seed=7)
    second = _batch([1] * 6, [1, 33, 90, 301, 999, 1990], torch.bfloat16, (3, 64, 16), seed=8)
    buffers = first
    out = torch.empty_like(first.query)

    def step():
        kernels.store_kv(buffers.key, buffers.value, buffers.k_cache, buffers.v_cache, buffers.slot_mapping)
        kernels.decode_attention(buffers.query, buffers.k_cache, buffers.v_cache, buffers.block_tables,
                                 buffers.context_lens, 0.125, max_context_len=4096, out=out)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for name in ("query", "key", "value", "k_cache", "v_cache", "block_tables", "slot_mapping", "context_lens"):
        target, source = getattr(buffers, name), getattr(second, name)
        target[tuple(slice(0, n) for n in source.shape)].copy_(source)
    graph.replay()
    torch.cuda.synchronize()

    assert relative_error(out, dense_reference(second, 0.125)) <= TOLERANCE[torch.bfloat16]
