"""Triton kernels for the INT8 linears on CUDA.

* ``w8a16_matmul``: ``out = (x @ qweight.T) * scale``. Decode is weight-bandwidth bound, so the
  point of int8 weights is to read half the bytes of bf16: the weight tile is loaded as int8 and
  converted in registers, never written back dequantized. The per-output-channel scale factors
  out of the K sum and is applied once to the fp32 accumulator.
* ``quantize_rows`` + ``w8a8_matmul``: SmoothQuant's activation side in one launch (smooth, row
  absmax, round to int8), then an int8 x int8 -> int32 tensor-core GEMM whose epilogue applies
  both scales and casts: two launches per linear instead of a dozen small elementwise ones.

Tile sizes are picked by a fixed rule on the number of rows (no autotuning), so the first call of
a shape compiles once and nothing is benchmarked while a CUDA graph is being captured.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

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
    _quantize_rows_kernel[(m,)](x, inv_smooth, qx, scale, k, x.stride(0), BLOCK_K=block_k,
                                num_warps=4 if block_k <= 2048 else 8)
    return qx, scale


def w8a8_matmul(qx: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """qx [M, K] int8 @ qweight [N, K] int8 .T (int32 accumulate) * x_scale [M, 1] * w_scale [N] -> dtype."""
    m, k = qx.shape
    n = qweight.shape[0]
    out = torch.empty(m, n, dtype=dtype, device=qx.device)
    # Not swept: int8 MMA wants K steps of at least 32; 64-wide N tiles past decode sizes.
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n, block_k = 64, 128 if m <= 32 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w8a8_kernel[grid](qx, x_scale, qweight, w_scale, out, m, n, k, qx.stride(0), qweight.stride(0), out.stride(0),
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=4)
    return out


if IS_AVAILABLE:
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
    def _quantize_rows_kernel(x_ptr, s_ptr, q_ptr, scale_ptr, K, stride_xm, BLOCK_K: tl.constexpr):
        row = tl.program_id(0)
        rk = tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + rk, mask=rk < K, other=0.0).to(tl.float32)  # [BLOCK_K]
        x = x * tl.load(s_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-8) / 127.0
        q = x / scale
        q = tl.where(q >= 0, tl.floor(q + 0.5), tl.ceil(q - 0.5))  # round half away from zero
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_ptr + row * K + rk, q.to(tl.int8), mask=rk < K)
        tl.store(scale_ptr + row, scale)

    @triton.jit
    def _w8a8_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :],
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)  # [BLOCK_M, BLOCK_K] int8
            w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None],
                        mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)  # [BLOCK_K, BLOCK_N] int8
            acc = tl.dot(x, w, acc, out_dtype=tl.int32)  # int8 x int8 accumulates in int32
        xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)  # [BLOCK_M]
        ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)  # [BLOCK_N]
        out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))
