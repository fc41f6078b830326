"""BERT-base's four GEMMs at a batch of 128 x 128 tokens: fp16 cuBLAS vs int8 cuBLAS vs our W8A8 Triton GEMM.

One run times, per shape (M = 16384 tokens; (N, K) = QKV, attention out, up, down):
  fp16     ``F.linear`` in fp16 (cuBLAS), the bar INT8 has to beat
  int_mm   ``torch._int_mm`` with a column-major weight (int32 out, no epilogue)
  triton   ``int8_kernels.w8a8_matmul`` over a sweep of tile configs (BLOCK_M/N/K, warps, stages,
           GROUP_M swizzle, TMA descriptors, persistent grid), fp16 out with both scales applied
Each config is first checked: with unit scales and an fp32 output the result must *equal* the int32
product (int32 -> fp32 rounds the same way on both sides); the best config per shape is also checked
with BERT's epilogue (bias, GELU, residual) against PyTorch on the int32 product. GPU time comes from
CUDA events around CUDA-graph replays of 10 calls (no host launch cost), median of 25 replays after
warm-up. Prints TOPS per config, the best per shape, and the whole-layer sums.

    PYTHONPATH=backends:. python3 loadtest/bench_int8_gemm_gpu.py [--json out.json] [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict

import torch
import torch.nn.functional as F

from trident.models import int8_kernels
from trident.models.int8_kernels import W8A8Tiles

M = 16384
SHAPES = {"qkv": (2304, 768), "attn_out": (768, 768), "up": (3072, 768), "down": (768, 3072)}
CALLS_PER_GRAPH = 10
REPLAYS = 25


def sweep() -> list[W8A8Tiles]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, GROUP_M, is_tma, is_persistent)."""
    rows = [
        (128, 128, 64, 8, 4, 8, False, False),   # the tiles BERT ran with before this sweep
        (128, 128, 128, 8, 3, 8, False, False),
        (128, 256, 128, 8, 3, 8, False, False),
        (128, 128, 64, 8, 4, 8, True, False),
        (128, 128, 128, 8, 3, 8, True, False),
        (128, 128, 128, 8, 4, 8, True, False),
        (128, 128, 128, 4, 4, 8, True, False),
        (128, 256, 64, 8, 4, 8, True, False),
        (128, 256, 128, 8, 3, 8, True, False),
        (128, 256, 128, 8, 4, 8, True, False),
        (256, 128, 128, 8, 3, 8, True, False),
        (128, 128, 256, 8, 3, 8, True, False),
        (64, 256, 128, 4, 4, 8, True, False),
        (128, 256, 128, 8, 3, 1, True, False),   # no swizzle: what GROUP_M buys
        (128, 128, 128, 8, 3, 8, True, True),
        (128, 128, 128, 8, 4, 8, True, True),
        (128, 256, 64, 8, 4, 8, True, True),
        (128, 256, 128, 8, 3, 8, True, True),
        (256, 128, 128, 8, 3, 8, True, True),
        (128, 256, 128, 4, 3, 8, True, True),
    ]
    return [W8A8Tiles(*r) for r in rows]


def gpu_ms(fn) -> float:
    """Median GPU milliseconds of one ``fn()`` call, from graph replays of CALLS_PER_GRAPH calls."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_GRAPH):
            fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / CALLS_PER_GRAPH)
    return statistics.median(times)


def tops(n: int, k: int, ms: float) -> float:
    return 2 * M * n * k / ms / 1e9


def operands(n: int, k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(n * 7 + k)
    qx = torch.randint(-127, 128, (M, k), device="cuda", dtype=torch.int8, generator=g)  # [M, K]
    qw = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8, generator=g)  # [N, K]
    return {"qx": qx, "qw": qw,
            "x_scale": torch.rand(M, 1, device="cuda", generator=g) * 1e-3 + 1e-4,     # [M, 1]
            "w_scale": torch.rand(n, device="cuda", generator=g) * 1e-3 + 1e-4,        # [N]
            "bias": torch.randn(n, device="cuda", generator=g).half(),                # [N]
            "residual": torch.randn(M, n, device="cuda", generator=g).half(),         # [M, N]
            "x16": torch.randn(M, k, device="cuda", generator=g).half(),              # [M, K]
            "w16": torch.randn(n, k, device="cuda", generator=g).half() * 0.02}       # [N, K]


def is_exact(ops: dict, exact: torch.Tensor, tiles: W8A8Tiles) -> bool:
    ones_m = torch.ones(M, 1, device="cuda")
    ones_n = torch.ones(ops["qw"].shape[0], device="cuda")
    out = int8_kernels.w8a8_matmul(ops["qx"], ones_m, ops["qw"], ones_n, torch.float32, tiles=tiles)
    return torch.equal(out, exact.float())


def epilogue_error(ops: dict, exact: torch.Tensor, tiles: W8A8Tiles) -> float:
    """Max abs error of the fp16 output with bias, GELU and residual against PyTorch in fp32."""
    reference = F.gelu(exact.float() * ops["x_scale"] * ops["w_scale"] + ops["bias"].float()) + ops["residual"].float()
    out = int8_kernels.w8a8_matmul(ops["qx"], ops["x_scale"], ops["qw"], ops["w_scale"], torch.float16,
                                   bias=ops["bias"], residual=ops["residual"], gelu=True, tiles=tiles)
    error = (out.float() - reference).abs()
    if not bool((error <= 2e-3 + 2e-3 * reference.abs()).all()):
        print(f"  EPILOGUE MISMATCH: max abs error {error.max().item():.3e}", flush=True)
    return error.max().item()


def bench_shape(name: str, n: int, k: int, configs: list[W8A8Tiles]) -> dict:
    ops = operands(n, k)
    exact = torch._int_mm(ops["qx"], ops["qw"].t())  # [M, N] int32, the reference
    row = {"shape": name, "M": M, "N": n, "K": k}
    row["fp16_ms"] = gpu_ms(lambda: F.linear(ops["x16"], ops["w16"]))
    row["int_mm_ms"] = gpu_ms(lambda: torch._int_mm(ops["qx"], ops["qw"].t()))
    print(f"\n{name}: M={M} N={n} K={k}   fp16 cuBLAS {row['fp16_ms'] * 1e3:7.1f} us {tops(n, k, row['fp16_ms']):6.0f} TFLOP/s"
          f"   int_mm {row['int_mm_ms'] * 1e3:7.1f} us {tops(n, k, row['int_mm_ms']):6.0f} TOPS", flush=True)
    row["configs"] = []
    for tiles in configs:
        try:
            ok = is_exact(ops, exact, tiles)
            ms = gpu_ms(lambda: int8_kernels.w8a8_matmul(ops["qx"], ops["x_scale"], ops["qw"], ops["w_scale"],
                                                         torch.float16, tiles=tiles))
        except Exception as e:  # a config that does not compile or fit shared memory is a result too
            print(f"  {_label(tiles):44s} FAILED {type(e).__name__}: {str(e).splitlines()[0][:80]}", flush=True)
            continue
        row["configs"].append({**asdict(tiles), "ms": ms, "tops": tops(n, k, ms), "exact": ok})
        print(f"  {_label(tiles):44s} {ms * 1e3:7.1f} us {tops(n, k, ms):6.0f} TOPS {'exact' if ok else 'WRONG'}", flush=True)
    good = [c for c in row["configs"] if c["exact"]]
    best = min(good, key=lambda c: c["ms"])
    best_tiles = W8A8Tiles(**{f: best[f] for f in W8A8Tiles.__dataclass_fields__})
    row["best"] = best
    row["best_epilogue_max_err"] = epilogue_error(ops, exact, best_tiles)
    row["epilogue_ms"] = gpu_ms(lambda: int8_kernels.w8a8_matmul(
        ops["qx"], ops["x_scale"], ops["qw"], ops["w_scale"], torch.float16, bias=ops["bias"],
        residual=ops["residual"] if name in ("attn_out", "down") else None, gelu=name == "up", tiles=best_tiles))
    row["rule_ms"] = gpu_ms(lambda: int8_kernels.w8a8_matmul(ops["qx"], ops["x_scale"], ops["qw"], ops["w_scale"],
                                                             torch.float16))
    print(f"  best: {_label(best_tiles)} {best['tops']:.0f} TOPS; with BERT's epilogue "
          f"{row['epilogue_ms'] * 1e3:.1f} us (max err {row['best_epilogue_max_err']:.2e}); "
          f"tile rule {row['rule_ms'] * 1e3:.1f} us {tops(n, k, row['rule_ms']):.0f} TOPS", flush=True)
    return row


def norm_quantize_row(hidden: int = 768) -> dict:
    """LayerNorm then quantize (two launches) vs the fused layer_norm_quantize, at [M, hidden] fp16."""
    x = torch.randn(M, hidden, device="cuda").half()
    g, b = torch.randn(hidden, device="cuda").half(), torch.randn(hidden, device="cuda").half()
    ones = torch.ones(hidden, device="cuda").half()
    two = gpu_ms(lambda: int8_kernels.quantize_rows(F.layer_norm(x, (hidden,), g, b, 1e-12), ones))
    fused = gpu_ms(lambda: int8_kernels.layer_norm_quantize(x, g, b, 1e-12))
    print(f"\nLayerNorm + quantize [{M}, {hidden}] fp16: separate {two * 1e3:.1f} us, fused {fused * 1e3:.1f} us", flush=True)
    return {"separate_ms": two, "fused_ms": fused}


def _label(t: W8A8Tiles) -> str:
    kind = ("tma+persistent" if t.is_persistent else "tma") if t.is_tma else "pointers"
    return f"{t.block_m}x{t.block_n}x{t.block_k} w{t.num_warps} s{t.num_stages} g{t.group_m} {kind}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--quick", action="store_true", help="only the tile rule's config and the baseline")
    args = p.parse_args()
    torch.manual_seed(0)
    configs = sweep()[:1] + [int8_kernels.w8a8_tiles(M, 768, 768)] if args.quick else sweep()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    rows = [bench_shape(name, n, k, configs) for name, (n, k) in SHAPES.items()]
    layer = {key: sum(r[key] for r in rows) for key in ("fp16_ms", "int_mm_ms", "epilogue_ms", "rule_ms")}
    layer["best_ms"] = sum(r["best"]["ms"] for r in rows)
    ops_per_layer = sum(2 * M * r["N"] * r["K"] for r in rows)
    print("\none layer (4 GEMMs), 12 layers = BERT-base:")
    for key, value in layer.items():
        print(f"  {key:12s} {value * 1e3:7.1f} us/layer  x12 = {value * 12:.2f} ms   {ops_per_layer / value / 1e9:6.0f} T(FL)OP/s")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": rows, "layer": layer,
              "norm_quantize": norm_quantize_row()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
