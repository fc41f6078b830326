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

from trident.models import int8_gluon, int8_kernels
from trident.models.quant import INT8_MAX, Int8Linear, int8_matmul, quantize_per_token


@dataclass(frozen=True)
class NormedRows:
    """``norm(rows)`` left unwritten: the rows before the LayerNorm and each row's (mean, rstd). The
    fused GEMM that adds them as its residual rebuilds the normalized rows in its epilogue
    (``w8a8_matmul(residual_norm=...)``); anything else calls ``materialize``."""
    rows: torch.Tensor   # [tokens, hidden] in the model dtype, before the norm
    stats: torch.Tensor  # [tokens, 2] fp32: mean, rstd
    norm: nn.LayerNorm

    @property
    def shape(self) -> torch.Size:
        return self.rows.shape

    def materialize(self) -> torch.Tensor:
        mean, rstd = self.stats[:, :1], self.stats[:, 1:]  # [tokens, 1] each
        normed = (self.rows.float() - mean) * rstd * self.norm.weight.float() + self.norm.bias.float()
        return normed.to(self.rows.dtype)  # [tokens, hidden]


def materialized(x: torch.Tensor | NormedRows | None) -> torch.Tensor | None:
    return x.materialize() if isinstance(x, NormedRows) else x


@dataclass(frozen=True)
class QuantizedRows:
    """A linear's input, already quantized for the one linear that reads it: ``q`` int8 [tokens, in]
    with ``scale`` fp32 [tokens, 1] (per-row dynamic), or ``scale`` None (one static step, folded into
    the reading linear's ``static_weight_scale``). ``hidden``: the same rows in the model dtype when
    the producer also writes them (a LayerNorm's output is the next residual), or ``NormedRows`` to
    rebuild them from, else None."""
    hidden: torch.Tensor | NormedRows | None
    q: torch.Tensor
    scale: torch.Tensor | None


def hidden_of(x: torch.Tensor | QuantizedRows) -> torch.Tensor | None:
    return x.hidden if isinstance(x, QuantizedRows) else x


class QuantizingLayerNorm(nn.Module):
    """``nn.LayerNorm`` whose forward also quantizes its output for the linear it feeds, with that
    linear's ``inv_smooth``: returns ``QuantizedRows`` (one kernel on CUDA). ``defers_output``: its
    normalized rows are only ever a fused GEMM's residual, so on CUDA they come back as
    ``NormedRows`` (row statistics) instead of being written."""

    def __init__(self, norm: nn.LayerNorm, inv_smooth: torch.Tensor, defers_output: bool = False) -> None:
        super().__init__()
        self.norm = norm
        self.defers_output = defers_output
        self.register_buffer("inv_smooth", inv_smooth)  # [hidden]

    def embeddings(self, ids: tuple[torch.Tensor, ...], tables: tuple[torch.Tensor, ...]) -> QuantizedRows:
        """``forward`` of BERT's summed embeddings: ids (input, position, token type) [tokens] index
        tables (their [rows, hidden] weights); on CUDA the gathers and adds ride in the same kernel."""
        if int8_kernels.supports(tables[0]):
            return QuantizedRows(*int8_kernels.embed_layer_norm_quantize(ids, tables, self.norm.weight, self.norm.bias,
                                                                         self.norm.eps, self.inv_smooth))
        return self((F.embedding(ids[0], tables[0]) + F.embedding(ids[1], tables[1])) + F.embedding(ids[2], tables[2]))

    def forward(self, x: torch.Tensor) -> QuantizedRows:
        rows = x.reshape(-1, x.shape[-1])  # [tokens, hidden]
        if self.defers_output and int8_kernels.supports(rows):
            stats, q, scale = int8_kernels.layer_norm_stats_quantize(rows, self.norm.weight, self.norm.bias,
                                                                     self.norm.eps, self.inv_smooth)
            return QuantizedRows(NormedRows(rows, stats, self.norm), q, scale)
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
    already quantized (``QuantizedRows`` from a ``QuantizingLayerNorm``, the attention kernel, or a
    linear that hands its output over in int8).
    ``gelu_impl``: "erf" (BERT's GELU) or "tanh" (its tanh form on the hardware tanh: within ~1.5e-3
    of erf GELU, some 20x below the int8 step of the down projection's input; the up projection
    then takes 106 us instead of 151 us on the H200 at 16k tokens).

    Static int8 input (``read_static_input(linear, step)``): the linear reads int8 rows at one static
    step per tensor instead of a per-row scale, so their producer writes them as it computes them and
    no row of the model dtype is written and read back by a quantize pass: the up projection from its
    epilogue for the down projection (``hand_off_int8(up, down, step)``; it then returns
    ``QuantizedRows(None, q, None)``), the attention kernel for the out-projection.
    """

    fuses_epilogue = True
    gelu_impl = "erf"
    half_epilogue = False  # GELU (tanh form), int8 rounding and residual in fp16 pairs (w8a8_matmul; CUDA)
    gemm_kernel = "triton"  # "gluon": int8_gluon.w8a8_matmul where it applies (wgmma kept in flight; sm_90)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("out_inv_step", None)         # [out] fp32: writes int8 rows for the next linear
        self.register_buffer("static_weight_scale", None)  # [out] fp32: weight_scale * its input's static step
        self.register_buffer("input_inv_step", None)       # [in] fp32: inv_smooth / that step, what a producer
                                                           # multiplies its rows by before rounding them to int8

    def forward(self, x: torch.Tensor | QuantizedRows, residual: torch.Tensor | None = None,
                gelu: bool = False) -> torch.Tensor | QuantizedRows:
        if isinstance(x, QuantizedRows) and x.scale is None:
            return self._from_static_rows(x.q, residual, gelu)
        if isinstance(x, QuantizedRows) and int8_kernels.supports(x.q):  # the producer quantized the rows
            return self._gemm(x.q, x.scale, self.weight_scale, self.inv_smooth.dtype, residual, gelu)
        rows = materialized(hidden_of(x)).reshape(-1, self.in_features)  # [tokens, in]
        if not int8_kernels.supports(rows):
            return self._finish(super().forward(rows), residual, gelu)
        qx, x_scale = int8_kernels.quantize_rows(rows, self.inv_smooth)  # [tokens, in] int8, [tokens, 1]
        return self._gemm(qx, x_scale, self.weight_scale, rows.dtype, residual, gelu)

    def _from_static_rows(self, q: torch.Tensor, residual: torch.Tensor | None, gelu: bool):
        assert self.static_weight_scale is not None, "int8 rows at a static step need hand_off_int8 first"
        dtype = self.inv_smooth.dtype
        if not int8_kernels.supports(q):
            out = (int8_matmul(q, self.weight).float() * self.static_weight_scale).to(dtype)  # [tokens, out]
            return self._finish(out if self.bias is None else out + self.bias, residual, gelu)
        return self._gemm(q, None, self.static_weight_scale, dtype, residual, gelu)

    def _gemm(self, qx, x_scale, weight_scale, dtype, residual, gelu) -> torch.Tensor | QuantizedRows:
        residual_norm = None
        if isinstance(residual, NormedRows):  # the epilogue normalizes the residual rows itself
            residual, residual_norm = residual.rows, (residual.stats, residual.norm.weight, residual.norm.bias)
        res = None if residual is None else residual.reshape(-1, self.out_features).contiguous()
        if self.gemm_kernel == "gluon" and int8_gluon.supports(qx, self.weight, res, gelu, self.gelu_impl, dtype,
                                                               self.out_inv_step):
            out = int8_gluon.w8a8_matmul(qx, x_scale, self.weight, weight_scale, dtype, bias=self.bias, residual=res,
                                         gelu=gelu, out_inv_step=self.out_inv_step, residual_norm=residual_norm,
                                         half_epilogue=self.half_epilogue)  # [tokens, out]
        else:
            out = int8_kernels.w8a8_matmul(qx, x_scale, self.weight, weight_scale, dtype, bias=self.bias,
                                           residual=res, gelu=gelu, gelu_impl=self.gelu_impl,
                                           out_inv_step=self.out_inv_step, residual_norm=residual_norm,
                                           half_epilogue=self.half_epilogue)  # [tokens, out]
        return out if self.out_inv_step is None else QuantizedRows(None, out, None)

    def _finish(self, out: torch.Tensor, residual: torch.Tensor | None, gelu: bool) -> torch.Tensor | QuantizedRows:
        # The reference path (CPU): the epilogue's steps one op each, rounding as the kernels do.
        out = F.gelu(out, approximate="tanh" if self.gelu_impl == "tanh" else "none") if gelu else out
        out = out if residual is None else out + materialized(residual)
        if self.out_inv_step is None:
            return out
        return QuantizedRows(None, round_to_int8(out.float() * self.out_inv_step), None)


def round_to_int8(v: torch.Tensor) -> torch.Tensor:
    """Clamp to +-127 and round to nearest, ties to even, as the kernels' ``_round_int8`` does."""
    return torch.round(v.clamp(-INT8_MAX, INT8_MAX)).to(torch.int8)


def read_static_input(linear: FusedInt8Linear, step: torch.Tensor) -> None:
    """``linear`` reads int8 rows at the static ``step`` (fp32 scalar: its smoothed input's calibrated
    absmax / 127): ``round(x * linear.input_inv_step)``, the step folded into its weight scales."""
    step = step.float().to(linear.weight_scale.device)
    linear.register_buffer("static_weight_scale", linear.weight_scale * step)  # [out]
    linear.register_buffer("input_inv_step", linear.inv_smooth.float() / step)  # [in]


def hand_off_int8(up: FusedInt8Linear, down: FusedInt8Linear, step: torch.Tensor) -> None:
    """``down`` reads int8 rows at the static ``step`` and ``up`` writes them in its epilogue:
    ``round(gelu(...) * down.inv_smooth / step)``."""
    read_static_input(down, step)
    up.register_buffer("out_inv_step", down.input_inv_step)  # [intermediate]


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
