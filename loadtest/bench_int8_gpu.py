"""The decoder's linear layers on the GPU: bf16/fp16 vs W8A16 vs W8A8, SmolLM2 and GPT-2 shapes.

Each case is one projection of one layer at a batch of M rows (decode: M = running sequences),
timed over ``num_layers`` separate weight copies (as many as the model has, so the weights do not
sit in L2 between layers as they would not in a real step), under a CUDA graph (GPU time only).
Prints µs per layer-projection, the summed per-layer time, and the weight read rate against the
HBM roofline (the decode bound: small M reads every weight byte once).

    PYTHONPATH=backends:. python3 loadtest/bench_int8_gpu.py [--dtype bfloat16] [--batches 1,16,...]

Methods:
  fp       F.linear in the model dtype (cuBLAS)
  w8a16    int8 weights, Triton kernel (trident.models.int8_kernels), what Int8WeightOnlyLinear runs
  w8a16pk  torch._weight_int8pack_mm (when this torch has it for CUDA)
  w8a16dq  dequantize-then-matmul baseline (weights converted every call)
  w8a8     Int8Linear.forward on CUDA: Triton fused smooth+quantize, Triton int8 GEMM with the rescale fused
  w8a8im   the same quantize kernel, then torch._int_mm (column-major weight) and a PyTorch rescale
  int_mm   torch._int_mm alone on already-int8 activations (the GEMM's share of w8a8im)
  best16   the fastest of a few w8a16 tile configs for the case (what a better tile rule could reach)
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trident.models import int8_kernels
from trident.models.quant import Int8Linear, int8_matmul, quantize_per_channel

HBM_BYTES_PER_S = 3.35e12


@dataclass(frozen=True)
class Model:
    name: str
    num_layers: int
    projections: tuple[tuple[str, int, int], ...]  # (name, in, out)


MODELS = [
    Model("SmolLM2-135M", 30, (("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576))),
    Model("GPT-2-124M", 12, (("c_attn", 768, 2304), ("attn.c_proj", 768, 768), ("c_fc", 768, 3072),
                              ("mlp.c_proj", 3072, 768))),
    # Not served here: shows where int8 weights pay, once a layer's weights are large.
    Model("Llama-2-7B (4 of 32 layers)", 4, (("qkv", 4096, 12288), ("o", 4096, 4096), ("gate_up", 4096, 22016),
                                             ("down", 11008, 4096))),
]
W8A16_CONFIGS = [(16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (32, 64, 128, 4, 4),
                 (64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (128, 64, 64, 8, 3), (32, 32, 256, 4, 3),
                 (16, 32, 256, 4, 3), (16, 16, 256, 4, 3), (64, 32, 128, 4, 3), (128, 128, 64, 8, 3)]
BEST_CONFIGS: dict[tuple[int, int, int], tuple] = {}  # (M, K, N) -> fastest w8a16 tile config


def main() -> None:
    args = _parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {args.dtype} | "
          f"µs per layer-projection under a CUDA graph, weights rotated over the model's layers")
    has_pack = args.with_int8pack and _has_int8pack_cuda(dtype)
    methods = ["fp", "w8a16"] + (["w8a16pk"] if has_pack else []) + ["w8a16dq", "w8a8", "w8a8im", "int_mm", "best16"]
    for model in MODELS:
        print(f"\n## {model.name} ({model.num_layers} layers)")
        print(f"{'proj':<12}{'M':>5} " + "".join(f"{m:>10}" for m in methods) + f"{'fp GB/s':>10}{'w8a16 GB/s':>12}  best16 tiles (M, N, K, warps, stages)")
        totals = {m: {b: 0.0 for b in args.batches} for m in methods}
        for name, k, n in model.projections:
            for batch in args.batches:
                times = {m: time_method(m, model.num_layers, batch, k, n, dtype) for m in methods}
                for m, t in times.items():
                    totals[m][batch] += t
                fp_rate = n * k * dtype.itemsize / (times["fp"] * 1e-6) / 1e9
                q_rate = n * k / (times["w8a16"] * 1e-6) / 1e9
                best = BEST_CONFIGS.get((batch, k, n), "")
                print(f"{name:<12}{batch:>5} " + "".join(f"{times[m]:>10.2f}" for m in methods)
                      + f"{fp_rate:>10.0f}{q_rate:>12.0f}  {best}", flush=True)
        print(f"{'layer total':<12}")
        for batch in args.batches:
            fp = totals["fp"][batch]
            cells = "".join(f"{totals[m][batch]:>10.2f}" for m in methods)
            speedups = "  ".join(f"{m} {fp / totals[m][batch]:.2f}x" for m in methods[1:])
            print(f"{'':<12}{batch:>5} {cells}   vs fp: {speedups}")
    print(f"\nHBM roofline {HBM_BYTES_PER_S / 1e12:.2f} TB/s (H100 SXM datasheet); GB/s columns count weight bytes only.")


def time_method(method: str, num_layers: int, batch: int, k: int, n: int, dtype: torch.dtype,
                replays: int = 20) -> float:
    """µs per call of ``method`` for x [batch, k] against one of ``num_layers`` [n, k] weights."""
    if method == "best16":
        t, config = min((time_method(("w8a16", c), num_layers, batch, k, n, dtype, replays), c) for c in W8A16_CONFIGS)
        BEST_CONFIGS[(batch, k, n)] = config
        return t
    x = torch.randn(batch, k, device="cuda", dtype=dtype)
    fns = [_make(method, x, n, k, dtype) for _ in range(num_layers)]
    for fn in fns:  # compile / warm up outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * num_layers)


def _make(method: str, x: torch.Tensor, n: int, k: int, dtype: torch.dtype):
    w = torch.randn(n, k, device="cuda", dtype=torch.float32) * 0.05
    if method == "fp":
        w = w.to(dtype)
        return lambda: F.linear(x, w)
    qweight, scale = quantize_per_channel(w)  # [n, k] int8 row-major: .t() is column-major for _int_mm
    scale_x = scale.to(dtype)
    if isinstance(method, tuple):  # ("w8a16", tile config)
        return lambda: int8_kernels.w8a16_matmul(x, qweight, scale, method[1])
    if method == "w8a16":
        return lambda: int8_kernels.w8a16_matmul(x, qweight, scale)
    if method == "w8a16pk":
        return lambda: torch._weight_int8pack_mm(x, qweight, scale_x)
    if method == "w8a16dq":
        return lambda: F.linear(x, qweight.to(dtype) * scale_x[:, None])
    if method == "w8a8":
        linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=dtype)
        linear.weight.data.copy_(w)
        module = Int8Linear.from_linear(linear, torch.rand(k, device="cuda") + 0.5)
        return lambda: module(x)
    if method == "w8a8im":
        inv_smooth = torch.ones(k, device="cuda", dtype=dtype)

        def w8a8_int_mm():
            qx, x_scale = int8_kernels.quantize_rows(x, inv_smooth)
            return (int8_matmul(qx, qweight).float() * x_scale * scale).to(dtype)
        return w8a8_int_mm
    if method == "int_mm":
        qx = torch.randint(-127, 128, x.shape, device="cuda", dtype=torch.int8)
        return lambda: int8_matmul(qx, qweight)
    raise ValueError(method)


def _has_int8pack_cuda(dtype: torch.dtype) -> bool:
    try:
        torch._weight_int8pack_mm(torch.ones(2, 64, device="cuda", dtype=dtype),
                                  torch.ones(64, 64, device="cuda", dtype=torch.int8),
                                  torch.ones(64, device="cuda", dtype=dtype))
        torch.cuda.synchronize()
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--with-int8pack", action="store_true",
                   help="also time torch._weight_int8pack_mm (10-100x slower than bf16 on H100 in torch 2.11)")
    p.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 16, 32, 64, 128, 256])
    return p.parse_args()


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")
