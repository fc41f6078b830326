"""A Triton kernel for W8A16: ``out = (x @ qweight.T) * scale`` with int8 weights read from HBM.

Decode is weight-bandwidth bound, so the point of int8 weights is to read half the bytes of bf16:
the weight tile is loaded as int8 and converted in registers, never written back dequantized.
The per-output-channel scale factors out of the K sum and is applied once to the fp32 accumulator.
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


def w8a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32) @ qweight [N, K] int8 .T, times scale [N] -> [M, N] in x's dtype."""
    m, k = x.shape
    n = qweight.shape[0]
    x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64 if m <= 64 else 128
    block_k = 128
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w8a16_kernel[grid](
        x, qweight, scale, out, m, n, k,
        x.stride(0), qweight.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32,
        num_warps=4, num_stages=4,
    )
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
