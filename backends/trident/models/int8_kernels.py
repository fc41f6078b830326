"""Triton kernels for the INT8 linears on CUDA.

* ``w8a16_matmul``: ``out = (x @ qweight.T) * scale``. Decode is weight-bandwidth bound, so the
  point of int8 weights is to read half the bytes of bf16: the weight tile is loaded as int8 and
  converted in registers, never written back dequantized. The per-output-channel scale factors
  out of the K sum and is applied once to the fp32 accumulator.
* ``quantize_rows`` + ``w8a8_matmul``: SmoothQuant's activation side in one launch (smooth, row
  absmax, round to int8), then an int8 x int8 -> int32 tensor-core GEMM whose epilogue applies
  both scales and casts: two launches per linear instead of a dozen small elementwise ones. The
  same GEMM serves the BERT encoder, which also asks its epilogue for the bias, exact GELU and the
  residual add (constexpr flags: the GPT engine's launch compiles none of them in).
  With ``out_inv_step`` the epilogue writes int8 instead, at a static step per column (calibrated
  once; BERT's up projection hands its GELU output to the down projection this way), and a GEMM fed
  such rows takes no per-row scale (``x_scale=None``: the static step is folded into ``w_scale``).
  With ``residual_norm`` the residual is LayerNorm'd in the epilogue from per-row statistics.
* ``layer_norm_quantize``: LayerNorm and the next GEMM's per-row int8 quantize in one pass (BERT:
  the fp16 output is the next residual, the int8 rows feed the next linear);
  ``layer_norm_stats_quantize`` writes each row's (mean, rstd) instead of the fp16 output, for a
  GEMM that rebuilds it as its residual; ``embed_layer_norm_quantize`` gathers and sums BERT's
  embeddings first.
* ``attention_quantize``: BERT's attention over packed sequences of at most 128 tokens, optionally
  quantizing its output rows for the out-projection in the same kernel: per row (all of a row's
  heads are computed by one program, so the row's absmax is known there) or at a static step (a
  program per head, only the int8 rows written).

Tile sizes are picked by a fixed rule on the number of rows (no autotuning), so the first call of
a shape compiles once and nothing is benchmarked while a CUDA graph is being captured.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    IS_AVAILABLE = True
except ImportError:  # CPU-only installs
    IS_AVAILABLE = False


def supports(x: torch.Tensor) -> bool:
    return IS_AVAILABLE and x.is_cuda


def tiles(m: int, k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for W8A16 at M rows and K inputs.

    The winners of the tile sweep in ``loadtest/bench_int8_gpu.py`` (H200; SmolLM2, GPT-2 and
    7B shapes): up to 64 rows, 16 x 32 tiles (many CTAs on narrow N) with a deeper K step once
    K >= 768; past that, 64-row tiles that read each weight tile for more rows."""
    if m <= 64:
        return (16, 32, 256, 4, 3) if k >= 768 else (16, 32, 128, 4, 4)
    return 64, 32, 128, 4, 3


def w8a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                 config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32) @ qweight [N, K] int8 .T, times scale [N] -> [M, N] in x's dtype.
    ``config`` (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) overrides the rule (benchmarks)."""
    m, k = x.shape
    n = qweight.shape[0]
    x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m, block_n, block_k, num_warps, num_stages = config or tiles(m, k)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w8a16_kernel[grid](
        x, qweight, scale, out, m, n, k,
        x.stride(0), qweight.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def quantize_rows(x: torch.Tensor, inv_smooth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of ``x * inv_smooth``: x [M, K] -> (int8 [M, K], fp32 scale [M, 1])."""
    m, k = x.shape
    x = x.contiguous()
    qx = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block_k = triton.next_power_of_2(k)
    rows = rows_per_program(m, block_k)
    _quantize_rows_kernel[(triton.cdiv(m, rows),)](x, inv_smooth, qx, scale, m, k, ROWS=rows, BLOCK_K=block_k,
                                                   num_warps=4 if rows * block_k <= 4096 else 8)
    return qx, scale


def rows_per_program(m: int, block: int) -> int:
    """Rows one program of the row-wise kernels handles: short rows are batched so that a program
    moves at least ~4k elements (one 768-wide row per program left the LayerNorm at ~half of HBM)."""
    rows = max(1, 4096 // block)
    return min(rows, triton.next_power_of_2(m))


@dataclass(frozen=True)
class W8A8Tiles:
    """Launch shape of the W8A8 GEMM. ``is_tma``: operands read, and the residual read and the output
    written, through TMA tensor descriptors (Hopper; needs 16-byte aligned rows and bases, else the
    launch falls back to pointer loads with the same tiles); ``is_persistent``: one program per SM
    looping over output tiles in grouped order (``group_m`` row tiles share each weight tile in L2)."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4
    group_m: int = 8
    is_tma: bool = False
    is_persistent: bool = False
    is_subtiled: bool = False  # epilogue in two [BLOCK_M, BLOCK_N / 2] halves: fewer live registers
    programs_per_sm: int = 1   # persistent grids: 2 lets one program's epilogue overlap another's MMA
    is_warp_specialized: bool = False  # Triton's automatic warp specialization of the K loop


def w8a8_tiles(m: int, n: int, k: int) -> W8A8Tiles:
    """The W8A8 tile rule.

    Below 1024 rows: the tiles the engine's decode GEMM was written with (int8 MMA wants K steps of at
    least 32; 64-wide N tiles), except from 65 to 256 rows (one or two BERT texts): ``SHORT_BATCH_TILES``.
    From 1024 rows (prefill, BERT batches): ``WIDE_N_TILES`` for wide outputs over short inputs (BERT's
    QKV and up projections), else ``LARGE_M_TILES``."""
    if m >= 1024:
        return WIDE_N_TILES if n >= 2048 and k <= 1024 else LARGE_M_TILES
    if 64 < m <= 256:
        return SHORT_BATCH_TILES
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    return W8A8Tiles(block_m, 64, 128 if m <= 32 else 64)


# loadtest/bench_int8_gemm_gpu.py --rows 128 on an H100 (BERT-base, one text of 128 tokens, the runtime's
# epilogues): the 64x64x64 tiles launched 24-96 programs and walked K=3072 in 48 steps; 32-wide N tiles
# with 256-wide K steps won on all four GEMMs: QKV 4.6 -> 4.4 us, attn_out 6.2 -> 5.1, up 5.2 -> 4.8, down
# 11.8 -> 7.8, 22.0 us a layer (fp16 cuBLAS 21.3); the whole batch-1 graph 0.55 -> 0.43 ms of GPU.
# Split-K (2-4 programs a tile meeting through int32 atomics in a zeroed workspace, the last one running
# the epilogue) lost on all four: 8.4-18 us.
SHORT_BATCH_TILES = W8A8Tiles(64, 32, 256, 4, 3)


# loadtest/bench_int8_gemm_gpu.py on the H200 (third sweep), BERT-base at M = 16384 with BERT's epilogue
# in (bias; GELU on up; residual on attn_out/down), per layer: QKV 71 us (814 TOPS), attn_out 33 us
# (588), up 151 us (513; 813 without the GELU), down 71 us (1095) = 326 us, against 361 us for the
# second sweep's persistent 256x128x128 and 479 us for the 128x128x64 pointer tiles before (fp16 cuBLAS
# with its bias: 350 us, GELU and residual adds not counted). Three stages and the split epilogue leave
# room for two programs per SM, so one program's epilogue (the erf GELU costs about as much as a
# tile's MMAs at K=768) runs under the other's MMAs; unsplit, the TMA store's staging buffer alone
# does not fit (278 KB for 256-wide tiles).
# The GELU epilogue's erf: "erf" libdevice's erff; "erf_poly" Abramowitz-Stegun 7.1.26 (|error| <= 2.2e-7
# on GELU, where fp16 output rounding is >= 3e-5) with one fast reciprocal and one exp2; "tanh" the tanh
# form of GELU on the tanh.approx instruction (up to ~1e-3 from erf GELU: not BERT's function; CUDA only).
# Sixth session: tanh.approx.f16x2 (two values an instruction) measured no faster (117.6 vs 118.3 us).
# Eighth session (H100, up projection at 16k tokens): GELU as v Phi(v) with Phi from a degree-6 polynomial
# on the FMA pipe alone (|error| 1.9e-4, no MUFU tanh) took 113.8 us against tanh's 98.9; the int32 ->
# fp32 conversion done as two exact magic-number adds and an FMA instead of cvt (off the quarter-rate
# conversion pipe) took the layer's four GEMMs from 276 to 288 us. The epilogue is bound on the FMA pipe.
GELU_IMPLS = ("erf", "erf_poly", "tanh")
GELU_IMPL = "erf"

LARGE_M_TILES = W8A8Tiles(128, 128, 128, num_warps=4, num_stages=3, group_m=8, is_tma=True, is_subtiled=True)
# Sixth session: 4 warps rather than 8 (attn_out 32.0 -> 31.5 us, down 70.0 -> 69.0): the epilogue that
# rebuilds a LayerNorm'd residual (residual_norm) took 8 warps from 122 to 173 registers, one program per
# SM, and attn_out to 54 us; 4 warps have the room (34.4 and 73.5 us with it).
# Sixth sweep (the runtime's epilogues: tanh GELU and int8 rows out of up, static steps into attn_out
# and down): a persistent grid of two 4-warp programs per SM, whose flattened loop loads the next tile
# while this one's epilogue runs, took QKV 70.1 -> 57.8 us and up 118.1 -> 105.8 us; it lost on the
# 768-wide outputs (attn_out 34.0 -> 44.6, down 71.4 -> 102.7 us), whose few tiles per program leave
# little to overlap.
WIDE_N_TILES = W8A8Tiles(128, 128, 128, num_warps=4, num_stages=3, group_m=8, is_tma=True, is_persistent=True,
                         is_subtiled=True, programs_per_sm=2)


def w8a8_matmul(qx: torch.Tensor, x_scale: torch.Tensor | None, qweight: torch.Tensor, w_scale: torch.Tensor,
                dtype: torch.dtype, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                gelu: bool = False, tiles: W8A8Tiles | None = None, gelu_impl: str | None = None,
                out_inv_step: torch.Tensor | None = None,
                residual_norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                half_epilogue: bool = False) -> torch.Tensor:
    """``gelu?(qx @ qweight.T * x_scale * w_scale + bias) + residual`` -> [M, N] in ``dtype``.

    qx [M, K] int8 (row stride free), x_scale [M, 1] fp32 (None: the rows share one static scale,
    already folded into ``w_scale``), qweight [N, K] int8, w_scale [N] fp32, bias [N], residual [M, N]
    with the output's strides (contiguous). The int32 accumulator is exact; the epilogue works in
    fp32 and rounds once at the store. ``out_inv_step`` [N] fp32: the output is int8 instead,
    ``round(v * out_inv_step)`` clamped to +-127 (ties to even, as ``quantize_rows`` and torch.round),
    the operand of a next GEMM called with ``x_scale=None``; ``dtype`` is then ignored and
    ``residual`` not allowed. ``tiles`` overrides the rule and ``gelu_impl`` (one of ``GELU_IMPLS``)
    the GELU's erf (benchmarks). ``residual_norm`` (stats [M, 2] fp32 of (mean, rstd) per row,
    weight [N], bias [N]): the residual added is ``LayerNorm(residual)`` from those row statistics,
    which ``layer_norm_stats_quantize`` wrote instead of the normalized rows. ``half_epilogue``: after the
    scales and bias (fp32), the GELU (its tanh form), the int8 rounding and the residual run in fp16
    pairs, two values an instruction (CUDA; fp16 or int8 output; see "The fp16-pair epilogue" below).
    """
    gelu_impl = gelu_impl or ("tanh" if half_epilogue else GELU_IMPL)
    assert gelu_impl in GELU_IMPLS, f"gelu_impl must be one of {GELU_IMPLS}"
    assert out_inv_step is None or residual is None, "an int8 output takes no residual"
    assert residual_norm is None or residual is not None, "residual_norm normalizes a residual"
    if half_epilogue:
        assert not gelu or gelu_impl == "tanh", "the fp16-pair epilogue computes GELU's tanh form"
        assert out_inv_step is not None or dtype == torch.float16, "the fp16-pair epilogue writes fp16 or int8"
        assert residual is None or residual.dtype == torch.float16, "the fp16-pair epilogue adds an fp16 residual"
    m, k = qx.shape
    n = qweight.shape[0]
    out_dtype = dtype if out_inv_step is None else torch.int8
    out = torch.empty(m, n, dtype=out_dtype, device=qx.device)  # [M, N]
    if residual is not None:
        assert residual.shape == (m, n) and residual.stride() == out.stride(), "residual must be [M, N] contiguous"
    t = tiles or w8a8_tiles(m, n, k)
    if t.is_tma and not _is_tma_ready(qx, qweight, out, residual):
        t = replace(t, is_tma=False)
    num_tiles = triton.cdiv(m, t.block_m) * triton.cdiv(n, t.block_n)
    num_programs = min(num_tiles, t.programs_per_sm * _num_sms(qx.device)) if t.is_persistent else num_tiles
    x_arg, w_arg, r_arg, out_arg = qx, qweight, residual, out
    if t.is_tma:
        epilogue_block = [t.block_m, t.block_n // 2 if t.is_subtiled else t.block_n]
        x_arg = TensorDescriptor(qx, [m, k], [qx.stride(0), 1], [t.block_m, t.block_k])
        w_arg = TensorDescriptor(qweight, [n, k], [qweight.stride(0), 1], [t.block_n, t.block_k])
        out_arg = TensorDescriptor(out, [m, n], [n, 1], epilogue_block)
        if residual is not None:
            r_arg = TensorDescriptor(residual, [m, n], [n, 1], epilogue_block)
    stats, norm_weight, norm_bias = residual_norm or (w_scale, w_scale, w_scale)
    _w8a8_kernel[(num_programs,)](
        x_arg, w_scale if x_scale is None else x_scale, w_arg, w_scale, out if bias is None else bias,
        out_arg if residual is None else r_arg, out_arg, w_scale if out_inv_step is None else out_inv_step,
        stats, norm_weight, norm_bias, m, n, k, qx.stride(0), qweight.stride(0), out.stride(0), num_programs,
        HAS_X_SCALE=x_scale is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        NORM_RESIDUAL=residual_norm is not None,
        GELU=gelu_impl if gelu else "", QUANTIZE_OUT=out_inv_step is not None,
        IS_TMA=t.is_tma, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m,
        FLATTEN=t.is_persistent, SUBTILE=t.is_subtiled, WARP_SPECIALIZE=t.is_warp_specialized, HALF=half_epilogue,
        num_warps=t.num_warps, num_stages=t.num_stages)
    return out


def _is_tma_ready(*tensors: torch.Tensor | None) -> bool:
    # TMA wants 16-byte aligned bases and row strides.
    return all(t is None or (t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and t.stride(0) * t.element_size() % 16 == 0)
               for t in tensors)


def layer_norm_quantize(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                        inv_smooth: torch.Tensor | None = None, rows: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y = LayerNorm(x)`` and ``y * inv_smooth`` quantized per row, in one pass over x.

    x [M, H] -> (y [M, H] in x's dtype, int8 [M, H], fp32 scale [M, 1]). The int8 rows are quantized
    from y as stored (rounded to x's dtype), so they equal ``quantize_rows(y, inv_smooth)``.
    ``rows`` (rows per program) overrides the rule (benchmarks).
    """
    return _layer_norm_quantize(x.contiguous(), x.shape[0], weight, bias, eps, inv_smooth, rows=rows)


def layer_norm_stats_quantize(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                              inv_smooth: torch.Tensor | None = None, rows: int | None = None,
                              num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``layer_norm_quantize`` without writing ``y``: (stats [M, 2] fp32 of each row's (mean, rstd),
    int8 [M, H], fp32 scale [M, 1]). The int8 rows are the same; a GEMM that adds ``y`` as its
    residual rebuilds it from x and the statistics (``w8a8_matmul(residual_norm=...)``), so the
    [M, H] rows in the model dtype are neither written here nor read back there (1/3 of this
    kernel's memory traffic). ``rows`` (per program) and ``num_warps`` override the rule (benchmarks)."""
    return _layer_norm_quantize(x.contiguous(), x.shape[0], weight, bias, eps, inv_smooth, store_y=False,
                                rows=rows, num_warps=num_warps)


def embed_layer_norm_quantize(ids: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                              tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor], weight: torch.Tensor,
                              bias: torch.Tensor, eps: float, inv_smooth: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``layer_norm_quantize`` of BERT's embeddings, ``(word[i] + position[p]) + token_type[t]`` summed
    in the tables' dtype as the eager adds round it, gathered inside the kernel: the three gathered
    [M, H] tensors and the two sums are never written. ids: (input, position, token type) ids [M]
    int64; tables: the matching [rows, H] embedding weights. Same outputs as ``layer_norm_quantize``.
    """
    return _layer_norm_quantize(tables[0], ids[0].shape[0], weight, bias, eps, inv_smooth, ids=ids, tables=tables[1:])


def _layer_norm_quantize(x: torch.Tensor, m: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                         inv_smooth: torch.Tensor | None, store_y: bool = True, ids=None, tables=(),
                         rows: int | None = None, num_warps: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # x: [M, H] rows, or with ids and tables the word table of the embeddings' gather. Returns (y [M, H]
    # in x's dtype, or with store_y False each row's (mean, rstd) [M, 2] fp32; int8 [M, H]; scale [M, 1]).
    h = x.shape[1]
    first = (torch.empty(m, h, dtype=x.dtype, device=x.device) if store_y
             else torch.empty(m, 2, dtype=torch.float32, device=x.device))        # [M, H] | [M, 2]
    qy = torch.empty(m, h, dtype=torch.int8, device=x.device)                      # [M, H]
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)                # [M, 1]
    block_h = triton.next_power_of_2(h)
    gather = ids is not None
    if not store_y:  # without y's store: 2k elements and one warp a program (H200 at [16384, 768]: 16.9 us,
        rows = rows or min(max(1, 2048 // block_h), triton.next_power_of_2(m))  # 18.8 with the rule below)
        num_warps = num_warps or 1
    else:
        rows = rows or rows_per_program(m, block_h)
        num_warps = num_warps or (4 if rows * block_h <= 4096 else 8)
    _layer_norm_quantize_kernel[(triton.cdiv(m, rows),)](
        x, weight, bias, weight if inv_smooth is None else inv_smooth, first, qy, scale, first, m, h, eps,
        *(ids if gather else (x, x, x)), *(tables if gather else (x, x)),
        HAS_SMOOTH=inv_smooth is not None, GATHER=gather, STORE_Y=store_y, ROWS=rows, BLOCK_H=block_h,
        num_warps=num_warps)
    return first, qy, scale


MAX_ATTENTION_SEQLEN = 128  # one key block: the whole softmax row lives in registers


def attention_quantize(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                       inv_smooth: torch.Tensor | None = None, is_head_walk: bool | None = None,
                       out_inv_step: torch.Tensor | None = None, launch: tuple[int, int] | None = None
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Bidirectional attention within each packed sequence, and with ``inv_smooth`` its rows quantized.

    qkv [T, 3, H, D] contiguous (the fused QKV projection's output), cu_seqlens [S + 1] int32, every
    sequence at most ``max_seqlen`` <= ``MAX_ATTENTION_SEQLEN`` tokens -> (out [T, H * D] in qkv's
    dtype, int8 [T, H * D] and fp32 scale [T, 1] or None, None). The int8 rows are those of
    ``quantize_rows(out, inv_smooth)``. Rows past ``cu_seqlens[-1]`` are left unwritten.

    One key block holds a whole sequence, so the softmax needs no running rescale; one program per
    (sequence, block of query rows) walks the heads, so a row's absmax is complete when the walk ends.
    Batches too small to fill the GPU that way (``is_head_walk`` False; None: the rule) run a program
    per head instead and quantize in ``quantize_rows`` after.

    ``out_inv_step`` [H * D] fp32 (the reading linear's static input step, smoothing folded in):
    returns (None, int8 [T, H * D], None) instead, ``round(out * out_inv_step)`` of the fp32 rows
    (at most one step from rounding the stored fp16 rows), written by a program per (sequence, row
    block, head): no row walk, no absmax, and no ``out`` in the model dtype written at all.

    ``launch`` (query rows per program, warps) overrides the rule (benchmarks).
    """
    t, three, num_heads, head_dim = qkv.shape
    assert three == 3 and qkv.is_contiguous() and max_seqlen <= MAX_ATTENTION_SEQLEN
    assert out_inv_step is None or inv_smooth is None, "a static step has its smoothing folded in"
    num_seqs = cu_seqlens.shape[0] - 1
    block_n = max(16, triton.next_power_of_2(max_seqlen))
    block_m, num_warps = launch or (min(64, block_n), 4)
    num_row_blocks = triton.cdiv(max_seqlen, block_m)
    is_static = out_inv_step is not None
    if is_static:
        is_head_walk = False
    elif is_head_walk is None:
        is_head_walk = num_seqs * num_row_blocks >= _num_sms(qkv.device)
    is_quantized = inv_smooth is not None and is_head_walk
    q8 = None
    if is_static or is_quantized:
        q8 = torch.empty(t, num_heads * head_dim, dtype=torch.int8, device=qkv.device)  # [T, H * D]
    out = None if is_static else torch.empty(t, num_heads * head_dim, dtype=qkv.dtype, device=qkv.device)  # [T, H * D]
    scale = torch.empty(t, 1, dtype=torch.float32, device=qkv.device) if is_quantized else None  # [T, 1]
    heads_per_program = num_heads if is_head_walk else 1
    per_column = out_inv_step if is_static else inv_smooth
    _attention_quantize_kernel[(num_seqs, num_row_blocks, num_heads // heads_per_program)](
        qkv, qkv if out is None else out, qkv if q8 is None else q8, qkv if scale is None else scale,
        qkv if per_column is None else per_column, cu_seqlens, 1.4426950408889634 / head_dim ** 0.5,
        NUM_HEADS=num_heads, HEADS=heads_per_program, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        QUANTIZE=is_quantized, STATIC=is_static, num_warps=num_warps, num_stages=2)
    if is_static:
        return None, q8, None
    if inv_smooth is None:
        return out, None, None
    if not is_quantized:
        q8, scale = quantize_rows(out, inv_smooth)
    return out, q8, scale


_SM_COUNTS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":  # the Triton interpreter on CPU tensors (tests)
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


# The fp16-pair epilogue (``w8a8_matmul(half_epilogue=True)``; BERT's ``int8_epilogue="f16x2"``). The eighth
# session found the up projection's epilogue bound on the FMA pipe: moving work off MUFU (a polynomial GELU)
# or off the conversion unit (magic-number int -> float) onto it made it slower. After the fp32 scales and
# bias, this epilogue runs the tanh GELU, the int8 step, clamp and rounding, and the output projections'
# LayerNorm'd residual as PTX on fp16 pairs (HFMA2: two values an instruction). The FMA-pipe instructions
# the epilogues add over a scales-only kernel, sm_90 SASS (loadtest/sass_int8_gemm.py, no GPU needed): up
# 2105 -> 941, attn_out and down 760 -> 349. fp16 keeps 11 significant bits: an int8 result moves by at
# most one step, near ties; the fp16 residual sum takes three roundings instead of one. Timed in the
# eleventh session (H200, BERT-base s128 in-process: 31.96k seq/s against 30.31k with the fp32 epilogue)
# and within the accuracy bars of tests/gpu on real MiniLM: BERT's default since then.
#
# Packed-half GELU (tanh form) as PTX for tl.inline_asm_elementwise. For a pair x of fp16 values and a pair s
# of multipliers: h = s x (1 + tanh(x (c0 + c1 x^2))), c0 = sqrt(2 / pi), c1 = 0.044715 c0, so s = 0.5 gives
# GELU(x) and s = step / 2 gives GELU(x) * step.
def _gelu_pair(x: str, s: str, h: str) -> str:
    return f"""mul.rn.f16x2 x2, {x}, {x};
fma.rn.f16x2 u, x2, c1, c0;
mul.rn.f16x2 u, u, {x};
tanh.approx.f16x2 t, u;
mul.rn.f16x2 {h}, {x}, {s};
fma.rn.f16x2 {h}, {h}, t, {h};
"""


_F16X2_HEAD = """{
.reg .b32 c0, c1, x2, u, t, h, xs, ss;
.reg .b16 unused;
mov.b32 c0, 0x3A623A62;
mov.b32 c1, 0x28912891;
"""
# pack=2: $1 the x pair, $2 the s pair (fp16), $0 the fp16 pair out.
GELU_F16X2_ASM = _F16X2_HEAD + _gelu_pair("$1", "$2", "$0") + "}"
# pack=2, GELU then int8: x in $1 $2 and s in $3 $4 as fp32 (cvt.rn.f16x2.f32 packs two at once), $0 the two
# int8 out in a 16-bit register, the two bytes a thread stores together (pack=4 took a byte permute more
# per value: the four bytes of two rows were split again for the stores; loadtest/sass_int8_gemm.py). The
# pair is clamped to +-127 and rounded by adding 1.5 * 2^10 (fp16's ulp is 1 in [1024, 2048): ties to
# even, and the integer lands in the low byte in two's complement); prmt gathers the two low bytes.
GELU_ROUND_INT8_F16X2_ASM = _F16X2_HEAD + """cvt.rn.f16x2.f32 xs, $2, $1;
cvt.rn.f16x2.f32 ss, $4, $3;
""" + _gelu_pair("xs", "ss", "h") + """mov.b32 c0, 0x57F057F0;
mov.b32 c1, 0xD7F0D7F0;
mov.b32 u, 0x66006600;
min.f16x2 h, h, c0;
max.f16x2 h, h, c1;
add.rn.f16x2 h, h, u;
prmt.b32 h, h, h, 0x20;
mov.b32 {$0, unused}, h;
}"""

# pack=2, the LayerNorm'd residual plus the GEMM's value: $1 the residual pair (fp16), $2 $3 the values (fp32),
# $4 $5 rstd and $6 $7 -mean * rstd of their rows (fp32), $8 $9 the norm's weight and bias pairs (fp16).
NORMED_RESIDUAL_F16X2_ASM = """{
.reg .b32 a, c, v, n;
cvt.rn.f16x2.f32 a, $5, $4;
cvt.rn.f16x2.f32 c, $7, $6;
cvt.rn.f16x2.f32 v, $3, $2;
fma.rn.f16x2 n, $1, a, c;
fma.rn.f16x2 n, n, $8, $9;
add.rn.f16x2 $0, n, v;
}"""


if IS_AVAILABLE:
    _NORMED_RESIDUAL_F16X2 = tl.constexpr(NORMED_RESIDUAL_F16X2_ASM)
    _GELU_F16X2 = tl.constexpr(GELU_F16X2_ASM)  # jit functions read module globals only as constexpr
    _GELU_ROUND_INT8_F16X2 = tl.constexpr(GELU_ROUND_INT8_F16X2_ASM)

    @triton.jit
    def _w8a16_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :],
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)  # [BLOCK_M, BLOCK_K]
            w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None],
                        mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)  # [BLOCK_K, BLOCK_N] int8
            if IEEE:
                acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
        scale = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)  # [BLOCK_N]
        acc = acc * scale[None, :]
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _round_int8(v):
        # fp32 -> int32 in [-127, 127] (quant.INT8_MAX): clamped, then rounded to nearest, ties to even
        # (torch.round's rule). Adding 1.5 * 2**23 to an fp32 of magnitude below 2**22 rounds it to an
        # integer and leaves that integer in the low mantissa bits: an fp32 add and an int32 subtract,
        # where floor / ceil / select and the float -> int conversion took seven instructions, the
        # conversion on the quarter-rate pipe the GEMM epilogue's int -> float and tanh already share.
        v = tl.minimum(tl.maximum(v, -127.0), 127.0)
        return (v + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000

    @triton.jit
    def _quantize_store(v, rows, cols, inside, q_ptr, scale_ptr, M, K):
        # v [ROWS, BLOCK] fp32 (zeros outside) -> int8 rows at q_ptr, one fp32 scale per row.
        scale = tl.maximum(tl.max(tl.abs(v), axis=1), 1e-8) / 127.0  # [ROWS]
        inv_scale = 1.0 / scale  # [ROWS]: a multiply per element instead of an IEEE divide (~1 ulp apart)
        tl.store(q_ptr + rows[:, None] * K + cols[None, :], _round_int8(v * inv_scale[:, None]).to(tl.int8), mask=inside)
        tl.store(scale_ptr + rows, scale, mask=rows < M)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, s_ptr, q_ptr, scale_ptr, M, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_K)
        inside = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=inside, other=0.0).to(tl.float32)  # [ROWS, BLOCK_K]
        x = x * tl.load(s_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]
        _quantize_store(x, rows, cols, inside, q_ptr, scale_ptr, M, K)

    @triton.jit
    def _tile_position(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        # Grouped order: GROUP_M consecutive row tiles walk the N tiles together, so each weight
        # tile is read from HBM once per group and from L2 by the rest.
        group_size = GROUP_M * num_pid_n
        first_m = (tile // group_size) * GROUP_M
        rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % group_size) % rows_in_group
        pid_n = (tile % group_size) // rows_in_group
        return pid_m, pid_n

    @triton.jit
    def _w8a8_kernel(x, xs_ptr, w, ws_ptr, b_ptr, r_ptr, out_ptr, qs_ptr, rs_ptr, rg_ptr, rb_ptr, M, N, K, stride_xm,
                     stride_wn, stride_om, NUM_PROGRAMS, HAS_X_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr, NORM_RESIDUAL: tl.constexpr, GELU: tl.constexpr, QUANTIZE_OUT: tl.constexpr, IS_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, FLATTEN: tl.constexpr, SUBTILE: tl.constexpr,
                     WARP_SPECIALIZE: tl.constexpr, HALF: tl.constexpr):
        # IS_TMA: x, w, r_ptr, out_ptr are TMA descriptors of [M, K], [N, K], [M, N], [M, N], else pointers.
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        # Persistent launches flatten the tile and K loops into one software pipeline, so the next
        # tile's loads are in flight while this one's epilogue runs.
        for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS, flatten=FLATTEN):
            pid_m, pid_n = _tile_position(tile, num_pid_m, num_pid_n, GROUP_M)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for k0 in tl.range(0, K, BLOCK_K, warp_specialize=WARP_SPECIALIZE):
                if IS_TMA:  # out-of-bounds rows and columns arrive as zeros
                    a = x.load([pid_m * BLOCK_M, k0])  # [BLOCK_M, BLOCK_K] int8
                    b = w.load([pid_n * BLOCK_N, k0])  # [BLOCK_N, BLOCK_K] int8
                else:
                    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
                    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                    kk = k0 + tl.arange(0, BLOCK_K)
                    a = tl.load(x + rm[:, None] * stride_xm + kk[None, :],
                                mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)  # [BLOCK_M, BLOCK_K] int8
                    b = tl.load(w + rn[:, None] * stride_wn + kk[None, :],
                                mask=(rn[:, None] < N) & (kk[None, :] < K), other=0)  # [BLOCK_N, BLOCK_K] int8
                acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)  # int8 x int8 accumulates in int32, exactly
            if SUBTILE:  # two [BLOCK_M, BLOCK_N / 2] halves, one after the other
                halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))  # [BLOCK_M, BLOCK_N / 2, 2]
                left, right = tl.split(halves)
                _epilogue(left, pid_m * BLOCK_M, pid_n * BLOCK_N, xs_ptr, ws_ptr, b_ptr, r_ptr, out_ptr, qs_ptr,
                          rs_ptr, rg_ptr, rb_ptr, M, N, stride_om, HAS_X_SCALE, HAS_BIAS, HAS_RESIDUAL, NORM_RESIDUAL,
                          GELU, QUANTIZE_OUT, IS_TMA, HALF)
                _epilogue(right, pid_m * BLOCK_M, pid_n * BLOCK_N + BLOCK_N // 2, xs_ptr, ws_ptr, b_ptr, r_ptr,
                          out_ptr, qs_ptr, rs_ptr, rg_ptr, rb_ptr, M, N, stride_om, HAS_X_SCALE, HAS_BIAS, HAS_RESIDUAL,
                          NORM_RESIDUAL, GELU, QUANTIZE_OUT, IS_TMA, HALF)
            else:
                _epilogue(acc, pid_m * BLOCK_M, pid_n * BLOCK_N, xs_ptr, ws_ptr, b_ptr, r_ptr, out_ptr, qs_ptr,
                          rs_ptr, rg_ptr, rb_ptr, M, N, stride_om, HAS_X_SCALE, HAS_BIAS, HAS_RESIDUAL, NORM_RESIDUAL,
                          GELU, QUANTIZE_OUT, IS_TMA, HALF)

    @triton.jit
    def _epilogue(acc, off_m, off_n, xs_ptr, ws_ptr, b_ptr, r, out, qs_ptr, rs_ptr, rg_ptr, rb_ptr, M, N, stride_om,
                  HAS_X_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                  NORM_RESIDUAL: tl.constexpr, GELU: tl.constexpr, QUANTIZE_OUT: tl.constexpr, IS_TMA: tl.constexpr,
                  HALF: tl.constexpr):
        # acc [BM, BN] int32 of the output block at (off_m, off_n); r and out: pointers or TMA descriptors.
        BM: tl.constexpr = acc.shape[0]
        BN: tl.constexpr = acc.shape[1]
        rm = off_m + tl.arange(0, BM)
        rn = off_n + tl.arange(0, BN)
        ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)  # [BN]
        if HAS_X_SCALE:
            xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)  # [BM]
            v = acc.to(tl.float32) * xs[:, None] * ws[None, :]  # [BM, BN]
        else:
            v = acc.to(tl.float32) * ws[None, :]
        if HAS_BIAS:
            v += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if HALF:  # tanh GELU, the int8 rounding and the residual in fp16 pairs (the fp16-pair epilogue)
            if GELU != "" and QUANTIZE_OUT:
                v = _gelu_round_int8_f16x2(v, tl.load(qs_ptr + rn, mask=rn < N, other=0.0))
            else:
                if GELU != "":
                    v = _gelu_f16x2(v)
                if QUANTIZE_OUT:
                    v = _round_int8(v.to(tl.float32) * tl.load(qs_ptr + rn, mask=rn < N, other=0.0)[None, :])
        else:
            if GELU != "":  # BERT's hidden_act "gelu" is the erf form
                v = _gelu(v, GELU)
            if QUANTIZE_OUT:  # the next GEMM's int8 operand, at its static step per column
                v = _round_int8(v * tl.load(qs_ptr + rn, mask=rn < N, other=0.0)[None, :])
        if IS_TMA:  # rows and columns past the edges are neither read nor written
            if HAS_RESIDUAL:
                v = _plus_residual(v, r.load([off_m, off_n]), rm, rn, rs_ptr, rg_ptr, rb_ptr, M, N, NORM_RESIDUAL, HALF)
            out.store([off_m, off_n], v.to(out.dtype))
        else:
            mask = (rm[:, None] < M) & (rn[None, :] < N)
            if HAS_RESIDUAL:
                res = tl.load(r + rm[:, None] * stride_om + rn[None, :], mask=mask, other=0.0)
                v = _plus_residual(v, res, rm, rn, rs_ptr, rg_ptr, rb_ptr, M, N, NORM_RESIDUAL, HALF)
            tl.store(out + rm[:, None] * stride_om + rn[None, :], v.to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _plus_residual(v, res, rm, rn, rs_ptr, rg_ptr, rb_ptr, M, N, NORM: tl.constexpr, HALF: tl.constexpr):
        # v [BM, BN] fp32 (fp16 if HALF), res [BM, BN] the residual rows as stored -> v + (LayerNorm?)(res).
        if HALF:  # res fp16: a = rstd, c = -mean rstd per row; fma(fma(res, a, c), g, b) + v in fp16 pairs
            if NORM:
                mean = tl.load(rs_ptr + rm * 2, mask=rm < M, other=0.0)      # [BM]
                rstd = tl.load(rs_ptr + rm * 2 + 1, mask=rm < M, other=0.0)  # [BM]
                g = tl.load(rg_ptr + rn, mask=rn < N, other=0.0).to(tl.float16)  # [BN]
                b = tl.load(rb_ptr + rn, mask=rn < N, other=0.0).to(tl.float16)  # [BN]
                total = tl.inline_asm_elementwise(
                    _NORMED_RESIDUAL_F16X2, "=r,r,f,f,f,f,f,f,r,r",
                    [res, v.to(tl.float32), tl.broadcast_to(rstd[:, None], v.shape),
                     tl.broadcast_to((-mean * rstd)[:, None], v.shape), tl.broadcast_to(g[None, :], v.shape),
                     tl.broadcast_to(b[None, :], v.shape)], dtype=tl.float16, is_pure=True, pack=2)
            else:
                total = v.to(tl.float16) + res
        else:
            total = v + _normed(res.to(tl.float32), rm, rn, rs_ptr, rg_ptr, rb_ptr, M, N, NORM)
        return total

    @triton.jit
    def _normed(res, rm, rn, rs_ptr, rg_ptr, rb_ptr, M, N, NORM: tl.constexpr):
        # res [BM, BN] fp32 rows of the residual; NORM: LayerNorm them from their (mean, rstd) per row.
        if NORM:
            mean = tl.load(rs_ptr + rm * 2, mask=rm < M, other=0.0)      # [BM]
            rstd = tl.load(rs_ptr + rm * 2 + 1, mask=rm < M, other=0.0)  # [BM]
            g = tl.load(rg_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)  # [BN]
            b = tl.load(rb_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)  # [BN]
            res = (res - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :]
        return res

    @triton.jit
    def _attention_quantize_kernel(qkv_ptr, out_ptr, q_ptr, scale_ptr, s_ptr, cu_ptr, qk_scale,
                                   NUM_HEADS: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QUANTIZE: tl.constexpr,
                                   STATIC: tl.constexpr):
        # HEADS: heads per program, from head program_id(2) * HEADS; QUANTIZE needs all NUM_HEADS.
        # s_ptr: the per-column smoothing (QUANTIZE) or the static inverse step (STATIC, int8 rows only).
        start = tl.load(cu_ptr + tl.program_id(0))
        length = tl.load(cu_ptr + tl.program_id(0) + 1) - start
        first = tl.program_id(1) * BLOCK_M
        if first >= length:  # a shorter sequence, or a CUDA-graph bucket's empty padding one
            return
        hidden: tl.constexpr = NUM_HEADS * HEAD_DIM
        rows = first + tl.arange(0, BLOCK_M)  # query positions in the sequence
        keys = tl.arange(0, BLOCK_N)          # key positions
        d = tl.arange(0, HEAD_DIM)
        is_row = rows < length
        is_key = keys < length
        q_at = qkv_ptr + (start + rows)[:, None] * (3 * hidden) + d[None, :]           # head 0's Q
        k_at = qkv_ptr + (start + keys)[:, None] * (3 * hidden) + hidden + d[None, :]  # head 0's K
        out_at = (start + rows)[:, None] * hidden + d[None, :]
        absmax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for i in range(HEADS):
            h = tl.program_id(2) * HEADS + i
            q = tl.load(q_at + h * HEAD_DIM, mask=is_row[:, None], other=0.0)           # [BLOCK_M, HEAD_DIM]
            k = tl.load(k_at + h * HEAD_DIM, mask=is_key[:, None], other=0.0)           # [BLOCK_N, HEAD_DIM]
            v = tl.load(k_at + hidden + h * HEAD_DIM, mask=is_key[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]
            s = tl.dot(q, tl.trans(k)) * qk_scale                                       # [BLOCK_M, BLOCK_N], log2 units
            s = tl.where(is_key[None, :], s, float("-inf"))
            p = tl.exp2(s - tl.max(s, axis=1)[:, None])
            o = tl.dot(p.to(v.dtype), v) / tl.sum(p, axis=1)[:, None]                   # [BLOCK_M, HEAD_DIM] fp32
            if STATIC:  # the int8 rows at the reading linear's static step, from fp32: nothing else is written
                inv_step = tl.load(s_ptr + h * HEAD_DIM + d)  # [HEAD_DIM] fp32
                tl.store(q_ptr + out_at + h * HEAD_DIM, _round_int8(o * inv_step[None, :]).to(tl.int8),
                         mask=is_row[:, None])
            else:
                o = o.to(qkv_ptr.dtype.element_ty)  # rounded as the model dtype stores it
                tl.store(out_ptr + out_at + h * HEAD_DIM, o, mask=is_row[:, None])
            if QUANTIZE:
                smooth = tl.load(s_ptr + h * HEAD_DIM + d).to(tl.float32)
                absmax = tl.maximum(absmax, tl.max(tl.abs(o.to(tl.float32) * smooth[None, :]), axis=1))
        if QUANTIZE:  # second walk over the row, now that its absmax is known; the rows are in L2
            tl.debug_barrier()  # other threads of this program wrote them
            scale = tl.maximum(absmax, 1e-8) / 127.0  # [BLOCK_M]
            inv_scale = 1.0 / scale
            for h in range(NUM_HEADS):
                o = tl.load(out_ptr + out_at + h * HEAD_DIM, mask=is_row[:, None], other=0.0).to(tl.float32)
                o = o * tl.load(s_ptr + h * HEAD_DIM + d).to(tl.float32)[None, :]
                tl.store(q_ptr + out_at + h * HEAD_DIM, _round_int8(o * inv_scale[:, None]).to(tl.int8),
                         mask=is_row[:, None])
            tl.store(scale_ptr + start + rows, scale, mask=is_row)

    @triton.jit
    def _gelu(v, IMPL: tl.constexpr):
        if IMPL == "erf":
            return 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
        elif IMPL == "erf_poly":  # erf(|z|) = 1 - t poly(t) exp(-z^2), t = 1 / (1 + p |z|)
            z = tl.abs(v) * 0.7071067811865476
            t = tl.fdiv(tl.full(z.shape, 1.0, tl.float32), 1.0 + 0.3275911 * z)  # approximate: rcp + mul
            poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
            erf = 1.0 - poly * tl.exp2(-z * z * 1.4426950408889634)
            return 0.5 * v * (1.0 + tl.where(v >= 0, erf, -erf))
        else:  # "tanh": 0.5 v (1 + tanh(sqrt(2 / pi) (v + 0.044715 v^3)))
            u = 0.7978845608028654 * v * (1.0 + 0.044715 * v * v)
            th = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [u], dtype=tl.float32,
                                           is_pure=True, pack=1)
            return 0.5 * v * (1.0 + th)

    @triton.jit
    def _gelu_f16x2(v):
        # v [BM, BN] fp32 -> GELU's tanh form [BM, BN] fp16, two values an instruction.
        half = tl.full(v.shape, 0.5, tl.float16)
        return tl.inline_asm_elementwise(_GELU_F16X2, "=r,r,r", [v.to(tl.float16), half], dtype=tl.float16,
                                         is_pure=True, pack=2)

    @triton.jit
    def _gelu_round_int8_f16x2(v, inv_step):
        # v [BM, BN] fp32 GELU inputs, inv_step [BN] fp32 -> int8 round(clamp(GELU_tanh(v) * inv_step)), a
        # pair of values per asm instance.
        half_step = tl.broadcast_to((0.5 * inv_step)[None, :], v.shape)  # [BM, BN] fp32
        return tl.inline_asm_elementwise(_GELU_ROUND_INT8_F16X2, "=h,f,f,f,f", [v, half_step],
                                         dtype=tl.int8, is_pure=True, pack=2)

    @triton.jit
    def layer_norm_rows(x, inside, g, b, H, eps):
        # x [ROWS, BLOCK_H] fp32, zero where not ``inside``; g, b [BLOCK_H] fp32 (zero past H)
        # -> (LayerNorm(x) [ROWS, BLOCK_H] fp32, mean [ROWS], rstd [ROWS]).
        mean = tl.sum(x, axis=1) / H
        centred = tl.where(inside, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / H + eps)
        return centred * rstd[:, None] * g[None, :] + b[None, :], mean, rstd

    @triton.jit
    def _layer_norm_quantize_kernel(x_ptr, g_ptr, b_ptr, s_ptr, y_ptr, q_ptr, scale_ptr, stats_ptr, M, H, eps,
                                    ids_ptr, pos_ids_ptr, type_ids_ptr, pos_ptr, type_ptr,
                                    HAS_SMOOTH: tl.constexpr, GATHER: tl.constexpr, STORE_Y: tl.constexpr,
                                    ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
        # GATHER: row r of x is word[ids[r]] + pos[pos_ids[r]] + type[type_ids[r]], x_ptr the word table.
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_H)
        inside = (rows[:, None] < M) & (cols[None, :] < H)
        offsets = rows[:, None] * H + cols[None, :]
        if GATHER:  # summed in the tables' dtype, in the eager order: (word + position) + token type
            word = tl.load(ids_ptr + rows, mask=rows < M, other=0)[:, None] * H + cols[None, :]
            pos = tl.load(pos_ids_ptr + rows, mask=rows < M, other=0)[:, None] * H + cols[None, :]
            kind = tl.load(type_ids_ptr + rows, mask=rows < M, other=0)[:, None] * H + cols[None, :]
            x = (tl.load(x_ptr + word, mask=inside, other=0.0) + tl.load(pos_ptr + pos, mask=inside, other=0.0))
            x = (x + tl.load(type_ptr + kind, mask=inside, other=0.0)).to(tl.float32)  # [ROWS, BLOCK_H]
        else:
            x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)  # [ROWS, BLOCK_H]
        g = tl.load(g_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
        y, mean, rstd = layer_norm_rows(x, inside, g, b, H, eps)
        y = y.to(x_ptr.dtype.element_ty)  # as the residual stream stores it
        if STORE_Y:
            tl.store(y_ptr + offsets, y, mask=inside)
        else:  # the reading GEMM rebuilds y from x and these
            tl.store(stats_ptr + rows * 2, mean, mask=rows < M)
            tl.store(stats_ptr + rows * 2 + 1, rstd, mask=rows < M)
        v = tl.where(inside, y.to(tl.float32), 0.0)
        if HAS_SMOOTH:
            v = v * tl.load(s_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
        _quantize_store(v, rows, cols, inside, q_ptr, scale_ptr, M, H)
