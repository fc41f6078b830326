"""W8A8 linear for the BERT encoder with the layer's elementwise work in the GEMM's epilogue.

Measured on the H200 (BERT-base, batch 128 x 128 tokens, eager, ``bench_bert --profile``): with the
INT8 engine's ``Int8Linear`` the four GEMMs took 5.6 ms per batch, but the separate bias add over
every ``[tokens, out]`` output took another 3.4 ms and GELU 0.8 ms, so INT8 ran *slower* than fp16.
This kernel reuses the engine's fused smooth+quantize launch (``int8_kernels.quantize_rows``) and
replaces its GEMM with one that adds the bias, applies GELU (up projection) or adds the residual
(output projections) before the single fp16 store, with 128x128 tiles for large token counts (the
engine's 64x64 tiles are sized for decode's few rows). ``CublasInt8Linear`` is the third variant
bench_bert compares: cuBLAS ``_int_mm`` (which picked an sm80 CUTLASS kernel on the H200) plus
separate rescale and bias passes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trident.models import int8_kernels
from trident.models.quant import Int8Linear, int8_matmul, quantize_per_token

if int8_kernels.IS_AVAILABLE:
    import triton
    import triton.language as tl


def tiles(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for M rows: big tiles once there are rows to fill them.

    Our own rule, not the engine's: its tile rule is tuned for decode's W8A16 and changes with it.
    Below 1024 rows these are the tiles the engine's W8A8 GEMM ran with when it was written."""
    if m >= 1024:
        return 128, 128, 64, 8
    if m <= 16:
        return 16, 64, 128, 4
    if m <= 32:
        return 32, 64, 128, 4
    return 64, 64, 64, 4


def w8a8_linear(qx: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, residual: torch.Tensor | None, gelu: bool,
                dtype: torch.dtype) -> torch.Tensor:
    """``act(qx @ qweight.T * x_scale * w_scale + bias) + residual`` in one launch.

    qx [M, K] int8, x_scale [M, 1] fp32, qweight [N, K] int8, w_scale [N] fp32, bias [N],
    residual [M, N] (contiguous) -> [M, N] in ``dtype``.
    """
    m, k = qx.shape
    n = qweight.shape[0]
    out = torch.empty(m, n, dtype=dtype, device=qx.device)  # [M, N]
    block_m, block_n, block_k, num_warps = tiles(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w8a8_epilogue_kernel[grid](
        qx, x_scale, qweight, w_scale, out if bias is None else bias, out if residual is None else residual,
        out, m, n, k, qx.stride(0), qweight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, GELU=gelu,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=4)
    return out


class FusedInt8Linear(Int8Linear):
    """``Int8Linear`` (same buffers, same quantization) whose forward also takes the epilogue:
    ``forward(x, residual=None, gelu=False) = gelu?(x @ W.T + b) + residual``."""

    fuses_epilogue = True

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # [tokens, in]
        if not int8_kernels.supports(rows):
            out = super().forward(rows)  # [tokens, out]
            out = F.gelu(out) if gelu else out
            return out if residual is None else out + residual
        qx, x_scale = int8_kernels.quantize_rows(rows, self.inv_smooth)  # [tokens, in] int8, [tokens, 1]
        res = None if residual is None else residual.reshape(-1, self.out_features).contiguous()
        return w8a8_linear(qx, x_scale, self.weight, self.weight_scale, self.bias, res, gelu, x.dtype)


class CublasInt8Linear(Int8Linear):
    """``Int8Linear`` with the GEMM on cuBLAS ``_int_mm`` (``weight.t()`` is column-major) and the
    rescale as a separate elementwise pass; measured against the fused Triton GEMM in bench_bert."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # [tokens, in]
        if int8_kernels.supports(rows):
            qx, x_scale = int8_kernels.quantize_rows(rows, self.inv_smooth)  # [tokens, in] int8, [tokens, 1]
        else:
            qx, x_scale = quantize_per_token(rows * self.inv_smooth)
        acc = int8_matmul(qx, self.weight)  # [tokens, out] int32
        out = (acc.float() * (x_scale * self.weight_scale)).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


if int8_kernels.IS_AVAILABLE:
    @triton.jit
    def _w8a8_epilogue_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, r_ptr, out_ptr, M, N, K,
                              stride_xm, stride_wn, stride_om,
                              HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GELU: tl.constexpr,
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
            acc = tl.dot(x, w, acc, out_dtype=tl.int32)
        xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)  # [BLOCK_M]
        ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)  # [BLOCK_N]
        out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if GELU:  # exact (erf) GELU, as BERT's hidden_act "gelu"
            out = 0.5 * out * (1.0 + tl.math.erf(out * 0.7071067811865476))
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        if HAS_RESIDUAL:
            out += tl.load(r_ptr + rm[:, None] * stride_om + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
