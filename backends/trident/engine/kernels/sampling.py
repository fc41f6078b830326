"""One token per row drawn from temperature / top-p / min-p filtered logits, without sorting.

``trident.engine.sampler.draw`` states the algorithm and is its PyTorch twin (CPU, and the
reference): the same counter-based noise, so both pick the same tokens from the same logits. Here
one program walks one row in ``BLOCK``-wide tiles:

1. one pass: the row's max ``m`` and ``z = sum(exp(x - m))`` (online), the argmax (greedy rows stop
   here), and round 0's Gumbel-max race over the whole row;
2. while the candidate ``c`` is outside the filtered set: one pass sums the mass above it; if that
   mass reaches ``top_p * z`` (or ``c`` is under ``min_p`` of the max), every token at or below ``c``
   is outside too, so the next round races only over tokens above it.

A thousand rows of a 49k vocabulary take two or three passes over the logits, where the sort-based
filter (``apply_top_k_top_p_min_p``) sorts them and makes a dozen passes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _hash32(x):
    """lowbias32 (C. Wellons) on uint32 (multiplies wrap): the twin of ``sampler._hash32``."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _race(x, idx, key1, key2, round_, vocab):
    """x - log(-log(u)), u uniform in (0, 1) from (row keys, round, token): argmax over a set picks
    token t with probability softmax(x)_t within it (Gumbel-max)."""
    counter = (idx + round_ * vocab).to(tl.uint32)   # < 2^31: vocab x (max_rounds + 1)
    h = _hash32(_hash32(counter ^ key2) + key1)
    u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return x - tl.log(-tl.log(u))


@triton.jit
def _sample_kernel(logits_ptr, stride_row, params_ptr, keys_ptr, out_ptr, vocab, max_rounds,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    temperature = tl.load(params_ptr + row * 3)
    top_p = tl.load(params_ptr + row * 3 + 1)
    min_p = tl.load(params_ptr + row * 3 + 2)
    seed_lo = tl.load(keys_ptr + row * 4).to(tl.uint32)   # each < 2^32 (sampler._row_inputs)
    seed_hi = tl.load(keys_ptr + row * 4 + 1).to(tl.uint32)
    stream = tl.load(keys_ptr + row * 4 + 2).to(tl.uint32)
    position = tl.load(keys_ptr + row * 4 + 3).to(tl.uint32)
    key1 = _hash32(seed_lo ^ _hash32(seed_hi ^ _hash32(stream)))
    key2 = _hash32(key1 ^ _hash32(position))
    is_greedy = temperature == 0.0
    inv_t = 1.0 / tl.where(is_greedy, 1.0, temperature)
    offs = tl.arange(0, BLOCK)

    # Pass 1: max, sum of exp, argmax, and round 0's race over the whole row.
    m = -1e30   # the running max (finite, so that z's first rescale is not -inf - -inf)
    z = 0.0
    top_i = 0
    best = float("-inf")
    best_i = 0
    for start in range(0, vocab, BLOCK):
        idx = start + offs
        mask = idx < vocab
        x = tl.load(base + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_t  # [BLOCK]
        block_max = tl.max(x, axis=0)
        block_i = start + tl.argmax(x, axis=0)
        top_i = tl.where(block_max > m, block_i, top_i)   # strict: the first max, as torch.argmax
        new_m = tl.maximum(m, block_max)
        z = z * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), axis=0)
        m = new_m
        score = tl.where(mask, _race(x, idx, key1, key2, 0, vocab), float("-inf"))
        block_best = tl.max(score, axis=0)
        best_i = tl.where(block_best > best, start + tl.argmax(score, axis=0), best_i)
        best = tl.maximum(best, block_best)

    # Rounds: accept the candidate, or race again above it.
    needs_check = (top_p < 1.0) | (min_p > 0.0)
    accepted = tl.where(is_greedy | ~needs_check, 1, 0)
    round_ = 0
    while (accepted == 0) & (round_ < max_rounds):
        pivot = tl.load(base + best_i).to(tl.float32) * inv_t
        mass = 0.0
        for start in range(0, vocab, BLOCK):
            idx = start + offs
            x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32) * inv_t
            mass += tl.sum(tl.where(x > pivot, tl.exp(x - m), 0.0), axis=0)
        ok = (mass < top_p * z) & (tl.exp(pivot - m) >= min_p)
        accepted = tl.where(ok, 1, 0)
        if accepted == 0:
            round_ += 1
            best = float("-inf")
            for start in range(0, vocab, BLOCK):
                idx = start + offs
                x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32) * inv_t
                score = tl.where(x > pivot, _race(x, idx, key1, key2, round_, vocab), float("-inf"))
                block_best = tl.max(score, axis=0)
                best_i = tl.where(block_best > best, start + tl.argmax(score, axis=0), best_i)
                best = tl.maximum(best, block_best)
    # Greedy rows, and (never seen in practice) a row still undecided after max_rounds: the argmax,
    # which every filter keeps.
    token = tl.where(is_greedy | (accepted == 0), top_i, best_i)
    tl.store(out_ptr + row, token.to(tl.int64))


def sample_rows(logits: torch.Tensor, params: torch.Tensor, keys: torch.Tensor, max_rounds: int = 64,
                block: int = 4096, num_warps: int = 8) -> torch.Tensor:
    """logits [rows, vocab] (any float dtype, rows may be strided), params fp32 [rows, 3] (temperature,
    0 for greedy; top_p; min_p), keys int64 [rows, 4] (seed low / high 32 bits, stream, position) ->
    tokens int64 [rows]. ``sampler.draw`` is the same computation in PyTorch.

    Tiles: 4096 on 8 warps, the launch timed on the H200 (1000 x 49152: 431 us with temperature only,
    532 us with top-p 0.95; one read of the logits is 96 us). It takes 128 registers (sm_90, ptxas),
    so two programs fit an SM and a thousand rows run in four waves; 1024 on 4 warps takes 63, eight
    programs an SM, one wave. ``loadtest/bench_sampler_gpu.py --kernel-sweep`` times both (not yet
    run): the default moves when it wins."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    assert params.shape == (rows, 3) and params.dtype == torch.float32 and params.is_contiguous()
    assert keys.shape == (rows, 4) and keys.dtype == torch.int64 and keys.is_contiguous()
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        block = min(block, triton.next_power_of_2(vocab))
        _sample_kernel[(rows,)](logits, logits.stride(0), params, keys, out, vocab, max_rounds,
                                BLOCK=block, num_warps=num_warps)
    return out
