"""RMSNorm, optionally fused with the residual add before it (vLLM's ``fused_add_rms_norm``).

One program per token row reads the row (and its residual) once and writes the normalised row
(and the new residual) once: the plain PyTorch form costs ~8 kernels and as many round trips.
The arithmetic is the reference's, rounding where it rounds:
``residual = (x + residual).to(dtype)``; ``out = weight * (r.float() * rsqrt(mean(r.float()^2) + eps)).to(dtype)``.
Only the order of the row sum differs from torch's reduction (a few fp32 ulp).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from trident.engine.kernels.device import pad


@triton.jit
def _rms_norm_kernel(
    x, residual, weight, out, residual_out, stride_x, stride_r, stride_o, stride_ro,
    hidden_size, inv_hidden_size, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    h = tl.load(x + row * stride_x + cols, mask=mask, other=0.0)  # [hidden] model dtype
    if HAS_RESIDUAL:
        r = tl.load(residual + row * stride_r + cols, mask=mask, other=0.0)
        # Rounded to the model dtype, as the plain residual stream is.
        h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)
        tl.store(residual_out + row * stride_ro + cols, h, mask=mask)
    hf = h.to(tl.float32)
    mean_square = tl.sum(hf * hf, axis=0) * inv_hidden_size  # torch's CUDA mean: sum times 1/n
    normed = (hf * tl.math.rsqrt(mean_square + eps)).to(h.dtype)  # the reference rounds here
    w = tl.load(weight + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out + row * stride_o + cols, y.to(out.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``weight * rmsnorm(x)`` for x [num_tokens, hidden]; with ``residual`` (same shape and dtype)
    first ``residual = x + residual`` and normalise that, returning ``(out, residual)``.

    Inputs are not modified (outputs are fresh tensors, from the graph pool under capture); rows
    may be strided, the hidden dimension must be contiguous. The output dtype is what
    ``weight * x`` promotes to, as in the reference.
    """
    hidden_size = x.shape[-1]
    x2 = x.reshape(-1, hidden_size)  # [num_tokens, hidden]
    r2 = residual.reshape(-1, hidden_size) if residual is not None else x2
    if x2.stride(-1) != 1 or r2.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("x, residual and weight must be contiguous in the hidden dimension")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not match x "
                         f"{tuple(x.shape)} {x.dtype}")
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    residual_out = torch.empty_like(x2) if residual is not None else out
    num_tokens = x2.shape[0]
    if num_tokens:
        block = pad(hidden_size, 1)
        _rms_norm_kernel[(num_tokens,)](
            x2, r2, weight, out, residual_out, x2.stride(0), r2.stride(0), out.stride(0), residual_out.stride(0),
            hidden_size, 1.0 / hidden_size, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(max(block // 256, 1), 16),
            enable_fp_fusion=False,  # a fused multiply-add would round differently from torch's kernels
        )
    out = out.view(x.shape)
    if residual is None:
        return out
    return out, residual_out.view(x.shape)
