"""Experiment (not used by the runtime): warp-specialized W8A8 GEMMs in Gluon (Hopper) against
``int8_kernels.w8a8_matmul``, with BERT's up-projection (bias, tanh GELU, int8 out) and QKV epilogues.

Why: on an H100 BERT-base's four INT8 GEMMs take 276 us a layer at 16k tokens, their mainloop runs at
about half of the int8 tensor-core peak, and the up projection's epilogue adds ~24 us that two programs
per SM do not hide. Each variant is a persistent program with a 1-warp TMA load partition feeding a
ring of STAGES shared-memory slots through mbarriers:
  --consumers 1  one 4-warp consumer runs the MMAs and then the tile's epilogue;
  --consumers 0  the 4-warp MMA partition stores each finished int32 tile to shared memory and goes on
                 to the next; a 4-warp epilogue partition reads it and writes the output.
Measured on an H100 (eighth session), both exact against w8a8_matmul: --consumers 1: up 143.4 us, QKV
69.8 (w8a8_matmul: 102.9, 64.1); --consumers 0: up 113.7 us (200 registers for the epilogue), QKV 66.0
(99.6, 62.4). Two 4-warp consumer partitions taking alternate tiles (CUTLASS's ping-pong) compiled but
failed at launch ("unspecified launch failure") in every arrangement tried (loader first or last, 1 or
4 loader warps, with and without maxnreg) under Triton 3.6.

    PYTHONPATH=backends:. python3 loadtest/bench_gluon_gemm_gpu.py --shape up --consumers 0
    PYTHONPATH=backends:. python3 loadtest/bench_gluon_gemm_gpu.py --shape all --pipelined --json $OUT/gluon.json

--pipelined (ninth session, compiled for sm_90 but not yet run): ``trident.models.int8_gluon``, the
runtime's opt-in kernel (no warp specialization, one output tile per program like int8_kernels' LARGE_M
kernel, the K step's wgmma kept in flight; see its docstring for why), over PIPELINED_CONFIGS tiles and
stage counts.
"""
from __future__ import annotations

import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path[:0] = ["backends", "loadtest"]
from bench_int8_gemm_gpu import gpu_ms  # noqa: E402
from trident.models import int8_gluon, int8_kernels  # noqa: E402
from trident.models.int8_gluon import _tile_position  # noqa: E402


@gluon.jit
def _epilogue(acc, rm, rn, xs_ptr, ws_ptr, b_ptr, qs_ptr, M, N, GELU: gl.constexpr, QUANTIZE_OUT: gl.constexpr):
    # acc [BLOCK_M, BLOCK_N] int32 at rows rm, columns rn: the runtime's up / QKV epilogue (tanh GELU).
    xs = gl.load(xs_ptr + rm, mask=rm < M, other=0.0)
    ws = gl.load(ws_ptr + rn, mask=rn < N, other=0.0)
    v = acc.to(gl.float32) * xs[:, None] * ws[None, :]
    v = v + gl.load(b_ptr + rn, mask=rn < N, other=0.0).to(gl.float32)[None, :]
    if GELU:
        u = 0.7978845608028654 * v * (1.0 + 0.044715 * v * v)
        th = gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [u], dtype=gl.float32, is_pure=True, pack=1)
        v = 0.5 * v * (1.0 + th)
    if QUANTIZE_OUT:
        v = v * gl.load(qs_ptr + rn, mask=rn < N, other=0.0)[None, :]
        v = gl.minimum(gl.maximum(v, -127.0), 127.0)
        v = ((v + 12582912.0).to(gl.int32, bitcast=True) - 0x4B400000).to(gl.int8)
    return v


@gluon.jit
def _load_partition(a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, NUM_PROGRAMS,
                    GROUP_M: gl.constexpr):
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    k_steps = gl.cdiv(K, BLOCK_K)
    step = 0
    for tile in range(gl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS):
        pid_m, pid_n = _tile_position(tile, num_pid_m, num_pid_n, GROUP_M)
        for ks in range(k_steps):
            slot = step % STAGES
            mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)  # barriers start as phase 1 done
            mbarrier.expect(ready.index(slot), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [pid_m * BLOCK_M, ks * BLOCK_K], ready.index(slot), a_bufs.index(slot))
            tma.async_copy_global_to_shared(b_desc, [pid_n * BLOCK_N, ks * BLOCK_K], ready.index(slot), b_bufs.index(slot))
            step += 1


@gluon.jit
def _tile_mainloop(a_bufs, b_bufs, ready, empty, t, k_steps, mma_layout: gl.constexpr):
    # The program's t-th output tile: its k_steps slots are the loader's steps from t * k_steps on.
    BLOCK_M: gl.constexpr = a_bufs.type.shape[1]
    BLOCK_N: gl.constexpr = b_bufs.type.shape[1]
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.int32, layout=mma_layout)
    for ks in range(k_steps):
        step = t * k_steps + ks
        slot = step % STAGES
        mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
        acc = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        # The MMA before this one has finished reading its slot: hand it back to the loader.
        mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES), count=1, pred=ks > 0)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    mbarrier.arrive(empty.index((t * k_steps + k_steps - 1) % STAGES), count=1)
    return acc


@gluon.jit
def _mma_partition(a_bufs, b_bufs, ready, empty, c_smem, out_desc, xs_ptr, ws_ptr, b_ptr, qs_ptr, M, N, K,
                   NUM_PROGRAMS, GROUP_M: gl.constexpr, GELU: gl.constexpr, QUANTIZE_OUT: gl.constexpr):
    BLOCK_M: gl.constexpr = c_smem.type.shape[0]
    BLOCK_N: gl.constexpr = c_smem.type.shape[1]
    BLOCK_K: gl.constexpr = a_bufs.type.shape[2]
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_N, 32])
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    k_steps = gl.cdiv(K, BLOCK_K)
    for tile in range(gl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS):
        t = (tile - gl.program_id(0)) // NUM_PROGRAMS
        pid_m, pid_n = _tile_position(tile, num_pid_m, num_pid_n, GROUP_M)
        acc = _tile_mainloop(a_bufs, b_bufs, ready, empty, t, k_steps, mma_layout)

        rm = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_layout))
        rn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_layout))
        v = _epilogue(acc, rm, rn, xs_ptr, ws_ptr, b_ptr, qs_ptr, M, N, GELU, QUANTIZE_OUT)
        tma.store_wait(pendings=0)  # the previous tile's store has left c_smem
        c_smem.store(v.to(out_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [pid_m * BLOCK_M, pid_n * BLOCK_N], c_smem)
    tma.store_wait(pendings=0)


@gluon.jit
def _w8a8_ws_kernel(a_desc, b_desc, out_desc, xs_ptr, ws_ptr, b_ptr, qs_ptr, M, N, K, NUM_PROGRAMS,
                    STAGES: gl.constexpr, GROUP_M: gl.constexpr, GELU: gl.constexpr, QUANTIZE_OUT: gl.constexpr):
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    c_bufs = gl.allocate_shared_memory(out_desc.dtype, [1] + out_desc.block_type.shape, out_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    gl.warp_specialize([
        (_mma_partition, (a_bufs, b_bufs, ready, empty, c_bufs.index(0), out_desc, xs_ptr, ws_ptr, b_ptr, qs_ptr,
                          M, N, K, NUM_PROGRAMS, GROUP_M, GELU, QUANTIZE_OUT)),
        (_load_partition, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, NUM_PROGRAMS, GROUP_M)),
    ], [1], [24])


def w8a8_ws(qx, x_scale, qweight, w_scale, bias, out_inv_step=None, gelu=False, block=(128, 128, 128), stages=4,
            group_m=8, maxnreg=168, **_):
    m, k = qx.shape
    n = qweight.shape[0]
    block_m, block_n, block_k = block
    out = torch.empty(m, n, dtype=torch.int8 if out_inv_step is not None else torch.float16, device=qx.device)
    gl_out = gl.int8 if out_inv_step is not None else gl.float16
    a_desc = TensorDescriptor.from_tensor(qx, [block_m, block_k], gl.NVMMASharedLayout.get_default_for([block_m, block_k], gl.int8))
    b_desc = TensorDescriptor.from_tensor(qweight, [block_n, block_k], gl.NVMMASharedLayout.get_default_for([block_n, block_k], gl.int8))
    out_desc = TensorDescriptor.from_tensor(out, [block_m, block_n], gl.NVMMASharedLayout.get_default_for([block_m, block_n], gl_out))
    num_tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    num_programs = min(num_tiles, torch.cuda.get_device_properties(qx.device).multi_processor_count)
    _w8a8_ws_kernel[(num_programs,)](
        a_desc, b_desc, out_desc, x_scale, w_scale, bias, w_scale if out_inv_step is None else out_inv_step,
        m, n, k, num_programs, STAGES=stages, GROUP_M=group_m, GELU=gelu, QUANTIZE_OUT=out_inv_step is not None,
        num_warps=4, **({"maxnreg": maxnreg} if maxnreg else {}))
    return out


@gluon.jit
def _mma_handoff_partition(a_bufs, b_bufs, ready, empty, acc_smem, acc_ready, acc_empty, M, N, K, NUM_PROGRAMS,
                           GROUP_M: gl.constexpr):
    # Mainloop only: each finished int32 tile goes to shared memory for the epilogue partition.
    BLOCK_M: gl.constexpr = acc_smem.type.shape[0]
    BLOCK_N: gl.constexpr = acc_smem.type.shape[1]
    BLOCK_K: gl.constexpr = a_bufs.type.shape[2]
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_N, 32])
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    k_steps = gl.cdiv(K, BLOCK_K)
    for tile in range(gl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS):
        t = (tile - gl.program_id(0)) // NUM_PROGRAMS
        acc = _tile_mainloop(a_bufs, b_bufs, ready, empty, t, k_steps, mma_layout)
        mbarrier.wait(acc_empty, (t & 1) ^ 1)  # the epilogue has read the previous tile
        acc_smem.store(acc)
        mbarrier.arrive(acc_ready, count=1)


@gluon.jit
def _epilogue_partition(acc_smem, acc_ready, acc_empty, out_ptr, xs_ptr, ws_ptr, b_ptr, qs_ptr, M, N, NUM_PROGRAMS,
                        GROUP_M: gl.constexpr, GELU: gl.constexpr, QUANTIZE_OUT: gl.constexpr):
    BLOCK_M: gl.constexpr = acc_smem.type.shape[0]
    BLOCK_N: gl.constexpr = acc_smem.type.shape[1]
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [gl.num_warps(), 1], [1, 0])
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    for tile in range(gl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS):
        t = (tile - gl.program_id(0)) // NUM_PROGRAMS
        pid_m, pid_n = _tile_position(tile, num_pid_m, num_pid_n, GROUP_M)
        mbarrier.wait(acc_ready, t & 1)
        acc = acc_smem.load(layout)
        mbarrier.arrive(acc_empty, count=1)
        rm = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
        rn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
        v = _epilogue(acc, rm, rn, xs_ptr, ws_ptr, b_ptr, qs_ptr, M, N, GELU, QUANTIZE_OUT)
        gl.store(out_ptr + rm[:, None] * N + rn[None, :], v.to(out_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


@gluon.jit
def _w8a8_handoff_kernel(a_desc, b_desc, out_ptr, xs_ptr, ws_ptr, b_ptr, qs_ptr, M, N, K, NUM_PROGRAMS,
                         STAGES: gl.constexpr, GROUP_M: gl.constexpr, GELU: gl.constexpr, QUANTIZE_OUT: gl.constexpr,
                         EPILOGUE_REGS: gl.constexpr):
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    acc_smem = gl.allocate_shared_memory(gl.int32, [BLOCK_M, BLOCK_N],
                                         gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=8, order=[1, 0]))
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    acc_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    mbarrier.init(acc_bars.index(0), count=1)
    mbarrier.init(acc_bars.index(1), count=1)
    gl.warp_specialize([
        (_mma_handoff_partition, (a_bufs, b_bufs, ready, empty, acc_smem, acc_bars.index(0), acc_bars.index(1),
                                  M, N, K, NUM_PROGRAMS, GROUP_M)),
        (_epilogue_partition, (acc_smem, acc_bars.index(0), acc_bars.index(1), out_ptr, xs_ptr, ws_ptr, b_ptr, qs_ptr,
                               M, N, NUM_PROGRAMS, GROUP_M, GELU, QUANTIZE_OUT)),
        (_load_partition, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, NUM_PROGRAMS, GROUP_M)),
    ], [4, 1], [EPILOGUE_REGS, 24])


def w8a8_handoff(qx, x_scale, qweight, w_scale, bias, out_inv_step=None, gelu=False, block=(128, 128, 128), stages=4,
                 group_m=8, consumer_regs=232, maxnreg=168, **_):
    m, k = qx.shape
    n = qweight.shape[0]
    block_m, block_n, block_k = block
    out = torch.empty(m, n, dtype=torch.int8 if out_inv_step is not None else torch.float16, device=qx.device)
    a_desc = TensorDescriptor.from_tensor(qx, [block_m, block_k], gl.NVMMASharedLayout.get_default_for([block_m, block_k], gl.int8))
    b_desc = TensorDescriptor.from_tensor(qweight, [block_n, block_k], gl.NVMMASharedLayout.get_default_for([block_n, block_k], gl.int8))
    num_tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    num_programs = min(num_tiles, torch.cuda.get_device_properties(qx.device).multi_processor_count)
    _w8a8_handoff_kernel[(num_programs,)](
        a_desc, b_desc, out, x_scale, w_scale, bias, w_scale if out_inv_step is None else out_inv_step,
        m, n, k, num_programs, STAGES=stages, GROUP_M=group_m, GELU=gelu, QUANTIZE_OUT=out_inv_step is not None,
        EPILOGUE_REGS=consumer_regs, num_warps=4, **({"maxnreg": maxnreg} if maxnreg else {}))
    return out


def w8a8_pipelined(qx, x_scale, qweight, w_scale, bias, out_inv_step=None, gelu=False, block=(128, 128, 128),
                   stages=3, **_):
    """``int8_gluon.w8a8_matmul`` (the runtime's opt-in kernel) at other tiles and stage counts."""
    return int8_gluon.w8a8_matmul(qx, x_scale, qweight, w_scale, torch.float16, bias=bias, gelu=gelu,
                                  out_inv_step=out_inv_step, stages=stages, block=block)


SHAPES = {"up": (3072, 768, True, True), "qkv": (2304, 768, False, False),  # (N, K, GELU, int8 out)
          "attn_out": (768, 768, False, False), "down": (768, 3072, False, False)}
PIPELINED_CONFIGS = [((128, 128, 128), 3), ((128, 128, 128), 2), ((128, 128, 64), 4), ((64, 128, 128), 4)]


def bench_shape(shape: str, m: int, fn, configs: list[dict]) -> list[dict]:
    """``fn`` at each config against ``w8a8_matmul`` (the runtime's tile rule) on the same operands and
    epilogue: GPU us, TOPS, and the largest difference of the outputs (0 or 1 int8 step expected)."""
    n, k, gelu, quantize = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(n + k)
    qx = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8, generator=g)
    qw = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8, generator=g)
    xs = torch.rand(m, 1, device="cuda", generator=g) * 1e-3 + 1e-4
    ws = torch.rand(n, device="cuda", generator=g) * 1e-3 + 1e-4
    bias = torch.randn(n, device="cuda", generator=g).half()
    step = torch.full((n,), 127 / 6.0, device="cuda") if quantize else None
    ref_call = lambda: int8_kernels.w8a8_matmul(qx, xs, qw, ws, torch.float16, bias=bias, gelu=gelu,  # noqa: E731
                                                gelu_impl="tanh", out_inv_step=step)
    reference = ref_call()
    ref_us = gpu_ms(ref_call) * 1e3
    rows = []
    for config in configs:
        label = f"{shape} M={m} N={n} K={k} {config}"
        try:
            out = fn(qx, xs, qw, ws, bias, step, gelu, **config)
            torch.cuda.synchronize()
            diff = (out.float() - reference.float()).abs().max().item()
            us = gpu_ms(lambda: fn(qx, xs, qw, ws, bias, step, gelu, **config)) * 1e3
        except Exception as e:  # a config that fails to compile or launch is a result too
            print(f"{label}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}", flush=True)
            continue
        rows.append({"shape": shape, "config": repr(config), "us": us, "ref_us": ref_us, "max_diff": diff})
        print(f"{label}: {us:.1f} us ({2 * m * n * k / us / 1e6:.0f} TOPS) vs w8a8_matmul {ref_us:.1f} us "
              f"({2 * m * n * k / ref_us / 1e6:.0f}); max diff {diff:.3g}", flush=True)
    return rows


def main() -> None:
    import argparse
    import json
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="up", choices=[*SHAPES, "all"])
    p.add_argument("--pipelined", action="store_true",
                   help="the non-warp-specialized kernel with one wgmma group kept in flight, over PIPELINED_CONFIGS")
    p.add_argument("--consumers", type=int, default=0, choices=[0, 1],
                   help="0: MMA warpgroup hands each tile to an epilogue warpgroup; 1: one consumer, epilogue inline")
    p.add_argument("--maxnreg", type=int, default=0)
    p.add_argument("--regs", type=int, default=200, help="the epilogue partition's registers")
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--block-k", type=int, default=128)
    p.add_argument("--m", type=int, default=16384)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    shapes = list(SHAPES) if args.shape == "all" else [args.shape]
    if args.pipelined:
        fn, configs = w8a8_pipelined, [dict(block=block, stages=stages) for block, stages in PIPELINED_CONFIGS]
    else:
        fn = w8a8_handoff if args.consumers == 0 else w8a8_ws
        configs = [dict(block=(128, 128, args.block_k), stages=args.stages, consumer_regs=args.regs,
                        maxnreg=args.maxnreg)]
    rows = [row for shape in shapes for row in bench_shape(shape, args.m, fn, configs)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
