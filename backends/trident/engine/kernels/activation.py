"""The MLP activations as single kernels: ``silu_and_mul`` (SwiGLU's gate) and ``gelu_tanh``.

The math is torch's CUDA kernels' (fp32 inside, libdevice ``expf``/``tanhf``, IEEE division),
rounded to the model dtype where the PyTorch form rounds. The Triton interpreter has no libdevice:
there the same formulas use ``tl.exp`` (and ``tanh`` through ``exp``), a few ulp apart.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from trident.engine.kernels.device import pad

# Columns per program: wide enough to keep loads vectorised, small enough for many programs.
BLOCK_COLS = 1024


@triton.jit
def _exp(x, IS_CUDA: tl.constexpr):
    if IS_CUDA:
        return libdevice.exp(x)
    return tl.exp(x)


@triton.jit
def _tanh(x, IS_CUDA: tl.constexpr):
    if IS_CUDA:
        return libdevice.tanh(x)
    return 1.0 - tl.math.div_rn(2.0, tl.exp(2.0 * x) + 1.0)


@triton.jit
def _silu_and_mul_kernel(gate_up, out, stride_in, stride_out, intermediate_size,
                         BLOCK: tl.constexpr, IS_CUDA: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate_size
    gate = tl.load(gate_up + row * stride_in + cols, mask=mask, other=0.0)  # [block] model dtype
    up = tl.load(gate_up + row * stride_in + intermediate_size + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = tl.math.div_rn(g, 1.0 + _exp(-g, IS_CUDA)).to(gate.dtype)  # F.silu rounds to the model dtype
    tl.store(out + row * stride_out + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


@triton.jit
def _gelu_tanh_kernel(x, out, stride_in, stride_out, num_cols, BLOCK: tl.constexpr, IS_CUDA: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < num_cols
    v = tl.load(x + row * stride_in + cols, mask=mask, other=0.0)  # [block] model dtype
    f = v.to(tl.float32)
    beta: tl.constexpr = 0.7978845608028654  # sqrt(2 / pi)
    inner = beta * (f + 0.044715 * (f * f * f))
    y = 0.5 * f * (1.0 + _tanh(inner, IS_CUDA))
    tl.store(out + row * stride_out + cols, y.to(v.dtype), mask=mask)


def _launch_shape(num_rows: int, num_cols: int) -> tuple[tuple[int, int], int]:
    block = min(pad(num_cols, 1), BLOCK_COLS)
    return (num_rows, triton.cdiv(num_cols, block)), block


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for gate_up [num_tokens, 2 * intermediate] (gate first, as the fused
    gate/up projection lays it out); returns [num_tokens, intermediate]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"gate_up must be [num_tokens, 2 * intermediate] with contiguous rows, "
                         f"got {tuple(gate_up.shape)} strides {gate_up.stride()}")
    num_tokens, intermediate_size = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(num_tokens, intermediate_size, dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens:
        grid, block = _launch_shape(num_tokens, intermediate_size)
        _silu_and_mul_kernel[grid](gate_up, out, gate_up.stride(0), out.stride(0), intermediate_size,
                                   BLOCK=block, IS_CUDA=gate_up.is_cuda, num_warps=4)
    return out


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x, approximate="tanh")`` for x [..., num_cols] with a contiguous last dimension."""
    num_cols = x.shape[-1]
    x2 = x.reshape(-1, num_cols)  # [num_rows, num_cols]
    if x2.stride(-1) != 1:
        raise ValueError("x must be contiguous in its last dimension")
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        grid, block = _launch_shape(x2.shape[0], num_cols)
        _gelu_tanh_kernel[grid](x2, out, x2.stride(0), out.stride(0), num_cols, BLOCK=block, IS_CUDA=x.is_cuda,
                                num_warps=4)
    return out.view(x.shape)
