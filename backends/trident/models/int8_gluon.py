"""The W8A8 GEMM in Gluon (Hopper, sm_90): ``int8_kernels.w8a8_matmul``'s large-M kernel with the K step's
wgmma kept in flight.

Why a second kernel: Triton's compiler keeps a wgmma in flight only when its accumulator is fp32
(``WGMMAPipeline.cpp``, ``dotCanBeProperlyAsync``, "Rule 2.1"). int8 accumulates in int32, so every K
step of the Triton kernels ends in ``WARPGROUP.DEPBAR.LE gsb0, 0x0``: the step's MMAs must finish before
the next step can be waited on and issued, and the tensor cores drain once per K step
(``loadtest/sass_int8_gemm.py`` shows the waits). Gluon states the waits itself: here step k's MMAs
stay in flight (``warpgroup_mma_wait(num_outstanding=1)``) while step k+1's TMA barrier is waited on and
its MMAs issued, and step k-1's slot, read by then, is refilled with step k + STAGES - 1.

Scope (``supports``): CUDA sm_90, Gluon importable, at least ``MIN_ROWS`` rows, operands that TMA can
read (16-byte aligned), fp16 or int8 output: BERT's four linears at batch sizes, the GPT engine's prefill.
The epilogue is ``int8_kernels``' in the same order of operations: per-row scale or a static step folded
into the weight scale, bias, the tanh GELU, an int8 output at a static step per column, the residual
(LayerNorm'd from row statistics or not), and the fp16-pair variant (``half_epilogue``, the same PTX).

Status: written and compiled for sm_90 in the ninth session (no GPU was lent); opt-in
(``TorchRuntimeOptions(int8_gemm_kernel="gluon")``) until tests/gpu and the benchmarks have run it.
"""
from __future__ import annotations

import torch

from trident.models import int8_kernels

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    IS_AVAILABLE = True
except ImportError:  # CPU-only installs, or a triton without Gluon
    IS_AVAILABLE = False

MIN_ROWS = 1024          # below this, int8_kernels' small-M tiles (fewer, shorter tiles) are the better fit
BLOCK = (128, 128, 128)  # (M, N, K) of a tile; two programs per SM at three stages (98 KB of shared memory)
STAGES = 3
GROUP_M = 8


def supports(qx: torch.Tensor, qweight: torch.Tensor, residual: torch.Tensor | None, gelu: bool, gelu_impl: str | None,
             dtype: torch.dtype, out_inv_step: torch.Tensor | None) -> bool:
    """Whether ``w8a8_matmul`` here takes this call: the rest goes to ``int8_kernels.w8a8_matmul``."""
    if not (IS_AVAILABLE and qx.is_cuda and qx.shape[0] >= MIN_ROWS):
        return False
    if residual is not None and (residual.dtype != torch.float16 or not residual.is_contiguous()):
        return False
    if gelu and (gelu_impl or int8_kernels.GELU_IMPL) != "tanh":
        return False
    if out_inv_step is None and dtype != torch.float16:
        return False
    out_row_bytes = qweight.shape[0] * (1 if out_inv_step is not None else 2)  # the output's TMA store needs 16 B rows
    return (torch.cuda.get_device_capability(qx.device)[0] == 9 and out_row_bytes % 16 == 0
            and int8_kernels._is_tma_ready(qx, qweight))


def w8a8_matmul(qx: torch.Tensor, x_scale: torch.Tensor | None, qweight: torch.Tensor, w_scale: torch.Tensor,
                dtype: torch.dtype, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                gelu: bool = False, out_inv_step: torch.Tensor | None = None,
                residual_norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                half_epilogue: bool = False, stages: int = STAGES, block: tuple[int, int, int] = BLOCK) -> torch.Tensor:
    """``int8_kernels.w8a8_matmul``'s contract for the calls ``supports`` accepts (GELU is its tanh form):
    ``gelu?(qx @ qweight.T * x_scale * w_scale + bias) + (LayerNorm?)(residual)`` -> [M, N] fp16, or int8 at
    ``out_inv_step`` (no residual then)."""
    assert out_inv_step is None or residual is None, "an int8 output takes no residual"
    assert residual_norm is None or residual is not None, "residual_norm normalizes a residual"
    m, k = qx.shape
    n = qweight.shape[0]
    if residual is not None:
        assert residual.shape == (m, n) and residual.is_contiguous(), "residual must be [M, N] contiguous"
    stats, norm_weight, norm_bias = residual_norm or (w_scale, w_scale, w_scale)
    block_m, block_n, block_k = block
    out_dtype = torch.int8 if out_inv_step is not None else dtype
    out = torch.empty(m, n, dtype=out_dtype, device=qx.device)  # [M, N]
    gl_out = gl.int8 if out_inv_step is not None else gl.float16
    a_desc = TensorDescriptor.from_tensor(qx, [block_m, block_k],
                                          gl.NVMMASharedLayout.get_default_for([block_m, block_k], gl.int8))
    b_desc = TensorDescriptor.from_tensor(qweight, [block_n, block_k],
                                          gl.NVMMASharedLayout.get_default_for([block_n, block_k], gl.int8))
    out_desc = TensorDescriptor.from_tensor(out, [block_m, block_n],
                                            gl.NVMMASharedLayout.get_default_for([block_m, block_n], gl_out))
    num_tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    _w8a8_kernel[(num_tiles,)](
        a_desc, b_desc, out_desc, w_scale if x_scale is None else x_scale, w_scale, w_scale if bias is None else bias,
        w_scale if out_inv_step is None else out_inv_step, out if residual is None else residual, stats, norm_weight,
        norm_bias, m, n, k, HAS_X_SCALE=x_scale is not None, HAS_BIAS=bias is not None, GELU=gelu,
        QUANTIZE_OUT=out_inv_step is not None, HAS_RESIDUAL=residual is not None,
        NORM_RESIDUAL=residual_norm is not None, HALF=half_epilogue, STAGES=stages, GROUP_M=GROUP_M, num_warps=4)
    return out


if IS_AVAILABLE:
    _GELU_ROUND_INT8_F16X2 = gl.constexpr(int8_kernels.GELU_ROUND_INT8_F16X2_ASM)
    _GELU_F16X2 = gl.constexpr(int8_kernels.GELU_F16X2_ASM)
    _NORMED_RESIDUAL_F16X2 = gl.constexpr(int8_kernels.NORMED_RESIDUAL_F16X2_ASM)

    @gluon.jit
    def _tile_position(tile, num_pid_m, num_pid_n, GROUP_M: gl.constexpr):
        # int8_kernels._tile_position's grouped order: GROUP_M row tiles share each weight tile in L2.
        group_size = GROUP_M * num_pid_n
        first_m = (tile // group_size) * GROUP_M
        rows_in_group = gl.minimum(num_pid_m - first_m, GROUP_M)
        return first_m + (tile % group_size) % rows_in_group, (tile % group_size) // rows_in_group

    @gluon.jit
    def _load_k_step(a_desc, b_desc, a_bufs, b_bufs, ready, step, off_m, off_n, pred):
        # TMA loads of K step ``step`` into slot step % STAGES, signalled on that slot's barrier.
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        slot = step % STAGES
        mbarrier.expect(ready.index(slot), a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(a_desc, [off_m, step * BLOCK_K], ready.index(slot), a_bufs.index(slot), pred=pred)
        tma.async_copy_global_to_shared(b_desc, [off_n, step * BLOCK_K], ready.index(slot), b_bufs.index(slot), pred=pred)

    @gluon.jit
    def _w8a8_kernel(a_desc, b_desc, out_desc, xs_ptr, ws_ptr, b_ptr, qs_ptr, r_ptr, rs_ptr, rg_ptr, rb_ptr, M, N, K,
                     HAS_X_SCALE: gl.constexpr, HAS_BIAS: gl.constexpr, GELU: gl.constexpr, QUANTIZE_OUT: gl.constexpr,
                     HAS_RESIDUAL: gl.constexpr, NORM_RESIDUAL: gl.constexpr, HALF: gl.constexpr,
                     STAGES: gl.constexpr, GROUP_M: gl.constexpr):
        # r_ptr: the residual [M, N] fp16 (contiguous); rs_ptr: its rows' (mean, rstd) [M, 2] fp32 and
        # rg_ptr / rb_ptr the norm's weight and bias [N] when NORM_RESIDUAL.
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, BLOCK_N, 32])
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
        pid_m, pid_n = _tile_position(gl.program_id(0), gl.cdiv(M, BLOCK_M), gl.cdiv(N, BLOCK_N), GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        k_steps = gl.cdiv(K, BLOCK_K)
        for s in gl.static_range(STAGES - 1):
            _load_k_step(a_desc, b_desc, a_bufs, b_bufs, ready, s, off_m, off_n, s < k_steps)
        acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.int32, layout=mma_layout)  # exact int8 x int8 sums
        for ks in range(k_steps):
            slot = ks % STAGES
            mbarrier.wait(ready.index(slot), (ks // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            # Step ks - 1's MMAs have retired: its slot takes step ks + STAGES - 1.
            _load_k_step(a_desc, b_desc, a_bufs, b_bufs, ready, ks + STAGES - 1, off_m, off_n,
                         ks + STAGES - 1 < k_steps)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))
        rm = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_layout))
        rn = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_layout))
        v = _epilogue(acc, rm, rn, xs_ptr, ws_ptr, b_ptr, qs_ptr, M, N, HAS_X_SCALE, HAS_BIAS, GELU, QUANTIZE_OUT, HALF)
        if HAS_RESIDUAL:  # pointer loads in the accumulator's layout: pairs of fp16 columns per thread
            res = gl.load(r_ptr + rm[:, None] * N + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
            v = _plus_residual(v, res, rm, rn, rs_ptr, rg_ptr, rb_ptr, M, N, NORM_RESIDUAL, HALF)
        c_smem = gl.allocate_shared_memory(out_desc.dtype, out_desc.block_type.shape, out_desc.layout)
        c_smem.store(v.to(out_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [off_m, off_n], c_smem)  # rows / columns past the edges: not written
        tma.store_wait(pendings=0)

    @gluon.jit
    def _epilogue(acc, rm, rn, xs_ptr, ws_ptr, b_ptr, qs_ptr, M, N, HAS_X_SCALE: gl.constexpr, HAS_BIAS: gl.constexpr,
                  GELU: gl.constexpr, QUANTIZE_OUT: gl.constexpr, HALF: gl.constexpr):
        # acc [BM, BN] int32 at rows rm, columns rn -> int8_kernels._epilogue's value for these flags, its
        # operations in its order (the two kernels' outputs are compared in tests/gpu).
        ws = gl.load(ws_ptr + rn, mask=rn < N, other=0.0)  # [BN]
        if HAS_X_SCALE:
            xs = gl.load(xs_ptr + rm, mask=rm < M, other=0.0)  # [BM]
            v = acc.to(gl.float32) * xs[:, None] * ws[None, :]
        else:
            v = acc.to(gl.float32) * ws[None, :]
        if HAS_BIAS:
            v += gl.load(b_ptr + rn, mask=rn < N, other=0.0).to(gl.float32)[None, :]
        if HALF:
            if GELU and QUANTIZE_OUT:
                step = gl.load(qs_ptr + rn, mask=rn < N, other=0.0)  # [BN]
                v = gl.inline_asm_elementwise(_GELU_ROUND_INT8_F16X2, "=h,f,f,f,f", [v, (0.5 * step)[None, :]],
                                              dtype=gl.int8, is_pure=True, pack=2)  # args broadcast to [BM, BN]
            else:
                if GELU:
                    half = gl.full(v.shape, 0.5, gl.float16, layout=v.type.layout)
                    v = gl.inline_asm_elementwise(_GELU_F16X2, "=r,r,r", [v.to(gl.float16), half], dtype=gl.float16,
                                                  is_pure=True, pack=2)
                if QUANTIZE_OUT:
                    v = _round_int8(v.to(gl.float32) * gl.load(qs_ptr + rn, mask=rn < N, other=0.0)[None, :])
        else:
            if GELU:  # the tanh form on the hardware tanh, as int8_kernels._gelu(v, "tanh")
                u = 0.7978845608028654 * v * (1.0 + 0.044715 * v * v)
                th = gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [u], dtype=gl.float32, is_pure=True,
                                               pack=1)
                v = 0.5 * v * (1.0 + th)
            if QUANTIZE_OUT:
                v = _round_int8(v * gl.load(qs_ptr + rn, mask=rn < N, other=0.0)[None, :])
        return v

    @gluon.jit
    def _plus_residual(v, res, rm, rn, rs_ptr, rg_ptr, rb_ptr, M, N, NORM: gl.constexpr, HALF: gl.constexpr):
        # int8_kernels._plus_residual: v [BM, BN] fp32 (fp16 after a fp16-pair GELU), res [BM, BN] fp16
        # -> v + (LayerNorm?)(res).
        if NORM:
            mean = gl.load(rs_ptr + rm * 2, mask=rm < M, other=0.0)      # [BM]
            rstd = gl.load(rs_ptr + rm * 2 + 1, mask=rm < M, other=0.0)  # [BM]
            g = gl.load(rg_ptr + rn, mask=rn < N, other=0.0)             # [BN]
            b = gl.load(rb_ptr + rn, mask=rn < N, other=0.0)             # [BN]
            if HALF:
                total = gl.inline_asm_elementwise(
                    _NORMED_RESIDUAL_F16X2, "=r,r,f,f,f,f,f,f,r,r",
                    [res, v.to(gl.float32), rstd[:, None], (-mean * rstd)[:, None], g.to(gl.float16)[None, :],
                     b.to(gl.float16)[None, :]], dtype=gl.float16, is_pure=True, pack=2)  # args broadcast to [BM, BN]
            else:
                normed = (res.to(gl.float32) - mean[:, None]) * rstd[:, None] * g.to(gl.float32)[None, :]
                total = v + (normed + b.to(gl.float32)[None, :])
        else:
            if HALF:
                total = v.to(gl.float16) + res
            else:
                total = v + res.to(gl.float32)
        return total

    @gluon.jit
    def _round_int8(v):
        # int8_kernels._round_int8: clamp to +-127, round to nearest even by adding 1.5 * 2^23 -> int8.
        v = gl.minimum(gl.maximum(v, -127.0), 127.0)
        return ((v + 12582912.0).to(gl.int32, bitcast=True) - 0x4B400000).to(gl.int8)
