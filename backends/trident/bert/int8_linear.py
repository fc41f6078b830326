"""W8A8 linears for the BERT encoder: the layer's elementwise work rides on the int8 kernels.

Measured on the H200 (BERT-base, batch 128 x 128 tokens, eager, ``bench_bert --profile``): with the
INT8 engine's ``Int8Linear`` the four GEMMs took 5.6 ms per batch, but the separate bias add over
every ``[tokens, out]`` output took another 3.4 ms and GELU 0.8 ms, so INT8 ran *slower* than fp16.
``FusedInt8Linear`` runs the engine's W8A8 GEMM (``int8_kernels.w8a8_matmul``) with its bias, GELU
and residual epilogue flags, and ``QuantizingLayerNorm`` writes the next linear's int8 rows in the
same pass as the LayerNorm (``int8_kernels.layer_norm_quantize``), so a linear fed by a LayerNorm
launches no quantize of its own. ``CublasInt8Linear`` is the variant bench_bert compares: cuBLAS
``_int_mm`` (which picked an sm80 CUTLASS kernel on the H200) plus separate rescale and bias passes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trident.models import int8_kernels
from trident.models.quant import Int8Linear, int8_matmul, quantize_per_token


@dataclass(frozen=True)
class QuantizedRows:
    """A LayerNorm's output twice: ``hidden`` in the model dtype (the next residual) and its rows
    quantized for the one linear that reads it (``q`` int8 [tokens, hidden], ``scale`` fp32 [tokens, 1])."""
    hidden: torch.Tensor
    q: torch.Tensor
    scale: torch.Tensor


def hidden_of(x: torch.Tensor | QuantizedRows) -> torch.Tensor:
    return x.hidden if isinstance(x, QuantizedRows) else x


class QuantizingLayerNorm(nn.Module):
    """``nn.LayerNorm`` whose forward also quantizes its output for the linear it feeds, with that
    linear's ``inv_smooth``: returns ``QuantizedRows`` (one kernel on CUDA)."""

    def __init__(self, norm: nn.LayerNorm, inv_smooth: torch.Tensor) -> None:
        super().__init__()
        self.norm = norm
        self.register_buffer("inv_smooth", inv_smooth)  # [hidden]

    def forward(self, x: torch.Tensor) -> QuantizedRows:
        rows = x.reshape(-1, x.shape[-1])  # [tokens, hidden]
        if int8_kernels.supports(rows):
            y, q, scale = int8_kernels.layer_norm_quantize(rows, self.norm.weight, self.norm.bias, self.norm.eps,
                                                           self.inv_smooth)
        else:
            y = self.norm(rows)
            q, scale = quantize_per_token(y * self.inv_smooth)
        return QuantizedRows(y, q, scale)


class FusedInt8Linear(Int8Linear):
    """``Int8Linear`` (same buffers, same quantization) whose forward also takes the epilogue:
    ``forward(x, residual=None, gelu=False) = gelu?(x @ W.T + b) + residual``; ``x`` may arrive
    already quantized (``QuantizedRows`` from a ``QuantizingLayerNorm`` or the attention kernel).
    ``gelu_impl``: "erf" (BERT's GELU) or "tanh" (its tanh form on the hardware tanh: within ~1.5e-3
    of erf GELU, some 20x below the int8 step of the down projection's input; the up projection
    then takes 106 us instead of 151 us on the H200 at 16k tokens)."""

    fuses_epilogue = True
    gelu_impl = "erf"

    def forward(self, x: torch.Tensor | QuantizedRows, residual: torch.Tensor | None = None,
                gelu: bool = False) -> torch.Tensor:
        rows = hidden_of(x).reshape(-1, self.in_features)  # [tokens, in]
        if not int8_kernels.supports(rows):
            out = super().forward(rows)  # [tokens, out]
            out = F.gelu(out, approximate="tanh" if self.gelu_impl == "tanh" else "none") if gelu else out
            return out if residual is None else out + residual
        if isinstance(x, QuantizedRows):
            qx, x_scale = x.q, x.scale
        else:
            qx, x_scale = int8_kernels.quantize_rows(rows, self.inv_smooth)  # [tokens, in] int8, [tokens, 1]
        res = None if residual is None else residual.reshape(-1, self.out_features).contiguous()
        return int8_kernels.w8a8_matmul(qx, x_scale, self.weight, self.weight_scale, rows.dtype,
                                        bias=self.bias, residual=res, gelu=gelu, gelu_impl=self.gelu_impl)


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
