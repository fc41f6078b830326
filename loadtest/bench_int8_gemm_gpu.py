"""BERT-base's four GEMMs at a batch of 128 x 128 tokens: fp16 cuBLAS vs int8 cuBLAS vs our W8A8 Triton GEMM.

One run times, per shape (M = 16384 tokens; (N, K) = QKV, attention out, up, down):
  fp16     ``F.linear`` in fp16 (cuBLAS), the bar INT8 has to beat
  int_mm   ``torch._int_mm`` with a column-major weight (int32 out, no epilogue)
  triton   ``int8_kernels.w8a8_matmul`` over a sweep of tile configs (BLOCK_M/N/K, warps, stages,
           GROUP_M swizzle, TMA descriptors, persistent grid), fp16 out with both scales applied
Every config is timed as the INT8 runtime calls it (``bert_call``: bias always, per-row scales on QKV
and up, static input steps on attn_out and down, tanh GELU and an int8 output on up, the residual
LayerNorm'd from its row statistics on the two output projections; the ninth session added the norm,
so earlier runs' attn_out and down figures carry a plain residual) and checked twice: with unit
scales, no epilogue and an fp32 output the result must *equal* the int32 product (int32 -> fp32
rounds the same way on both sides), and the epilogue's output must match PyTorch's fp32 epilogue on
that product. GPU time comes from CUDA events
around CUDA-graph replays of 10 calls (no host launch cost), median of 25 replays after warm-up.
Prints TOPS per config, the best per shape, the rule's tiles with the fp16-pair epilogue
(``half_epilogue``) against the fp32 one, ``int8_gluon`` (both epilogues), the whole-layer sums and
the row kernels (LayerNorm + quantize, quantize alone).

    PYTHONPATH=backends:. python3 loadtest/bench_int8_gemm_gpu.py [--json out.json] [--quick] [--rows 128]
        [--half-epilogue]
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict

import torch
import torch.nn.functional as F

from trident.models import int8_gluon, int8_kernels
from trident.models.int8_kernels import W8A8Tiles

M = 16384
SHAPES = {"qkv": (2304, 768), "attn_out": (768, 768), "up": (3072, 768), "down": (768, 3072)}
STATIC_STEP = 6e-4  # a static input step, folded into the weight scale (the per-row scales' middle)
CALLS_PER_GRAPH = 10
REPLAYS = 25


def sweep() -> list[W8A8Tiles]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, GROUP_M, is_tma, is_persistent, is_subtiled,
    programs_per_sm).

    Earlier sweeps, H200, same shapes. 1st (20 configs, no epilogue): 128x128 tiles 460-620 TOPS;
    128x256 / 256x128 with BLOCK_K 128 and 3 stages 650-1100; a persistent 256x128 grid first on three
    shapes (810-1100); 4 warps on 128x256 collapsed (230). 2nd (15 configs, BERT's epilogue in):
    persistent 256x128x128 with the split epilogue won QKV/attn_out/down; GELU costs the up projection
    ~40% (742 -> 437 TOPS) whatever the tiles: the epilogue runs after the MMAs of its tile, and at K=768
    the erf epilogue of a tile takes about as long as its MMAs. 3rd (these six): hide the epilogue
    behind another program's MMAs with tiles small enough for two programs per SM. The plain grid of
    128x128x128, 3 stages, split epilogue won (326 us per layer, vs 361 for the 2nd sweep's winner):
    now the rule; persistent grids with two programs per SM only won QKV (59 us)."""
    rows = [
        (256, 128, 128, 8, 3, 8, True, True, True, 1),     # the 2nd sweep's winner
        (128, 128, 128, 8, 3, 8, True, True, True, 2),
        (128, 128, 128, 4, 3, 8, True, True, True, 2),
        (128, 256, 64, 8, 3, 8, True, True, True, 2),
        (128, 128, 128, 8, 3, 8, True, False, True, 1),    # the 3rd sweep's winner: the rule now
        (128, 128, 64, 8, 4, 8, False, False, False, 1),   # the tiles BERT ran with before
        (128, 128, 64, 8, 5, 8, True, False, True, 1),     # 6th session: deeper K pipeline, still 2 per SM
        (128, 256, 128, 8, 3, 8, True, True, True, 1),     # wider N tile, persistent
        (128, 256, 64, 8, 4, 8, True, True, True, 1),
        (128, 64, 128, 4, 3, 8, True, False, True, 1),     # smaller tiles, more programs per SM
        (64, 128, 128, 4, 3, 8, True, False, True, 1),
        (256, 128, 128, 8, 3, 8, True, False, True, 1),    # for the 768-wide outputs: taller tiles, plain grid
        (128, 128, 256, 8, 2, 8, True, False, True, 1),    # half the K steps
        (128, 128, 128, 8, 4, 8, True, False, True, 1),
    ]
    return [W8A8Tiles(*r) for r in rows]


def small_m_sweep() -> list[W8A8Tiles]:
    """``--rows`` below 1024 (one text of 128 tokens: the batch-1 latency path): the old rule's 64x64x64
    pointer tiles launch 24-96 programs on 132 SMs, and the down projection walks 48 K steps in each.
    Narrower tiles make more programs, longer K steps fewer steps. (Split-K was measured too, eighth
    session: 2-4 programs a tile through int32 atomics lost on every shape, 8.4-18 us.)"""
    return [W8A8Tiles(64, 64, 64),  # the rule's tiles at 33-1023 rows before the eighth session
            W8A8Tiles(32, 64, 128), W8A8Tiles(32, 32, 128), W8A8Tiles(16, 64, 128), W8A8Tiles(16, 32, 256, 4, 3),
            W8A8Tiles(64, 32, 128), W8A8Tiles(64, 64, 128, 4, 3, is_tma=True), W8A8Tiles(32, 32, 256, 4, 3),
            W8A8Tiles(64, 32, 256, 4, 3), W8A8Tiles(16, 32, 256, 4, 4), W8A8Tiles(16, 32, 512, 4, 2)]


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
            "residual_norm": (torch.stack([torch.randn(M, device="cuda", generator=g) * 0.1,             # [M, 2]:
                                           torch.rand(M, device="cuda", generator=g) + 0.5], 1),      # mean, rstd
                              (torch.rand(n, device="cuda", generator=g) + 0.5).half(),                # [N] weight
                              (torch.randn(n, device="cuda", generator=g) * 0.1).half()),              # [N] bias
            "out_inv_step": torch.full((n,), 127 / 6.0, device="cuda"),               # [N]: GELU outputs up to ~6
            "x16": torch.randn(M, k, device="cuda", generator=g).half(),              # [M, K]
            "w16": torch.randn(n, k, device="cuda", generator=g).half() * 0.02}       # [N, K]


def is_exact(ops: dict, exact: torch.Tensor, tiles: W8A8Tiles) -> bool:
    ones_m = torch.ones(M, 1, device="cuda")
    ones_n = torch.ones(ops["qw"].shape[0], device="cuda")
    out = int8_kernels.w8a8_matmul(ops["qx"], ones_m, ops["qw"], ones_n, torch.float32, tiles=tiles)
    return torch.equal(out, exact.float())


def bert_call(name: str, ops: dict, tiles: W8A8Tiles | None, gelu_impl: str = "tanh", half: bool = False,
              gluon: bool = False):
    """The shape's GEMM as the INT8 runtime runs it (its defaults): bias always; QKV and up read per-row
    scaled rows (from a LayerNorm), attn_out and down rows at a static step (folded into the weight
    scale); up applies GELU (``gelu_impl``) and writes int8 rows at the down projection's static step;
    attn_out and down add the residual, LayerNorm'd from its row statistics (the runtime's NormedRows).
    ``half``: the fp16-pair epilogue (``half_epilogue=True``); ``gluon``: ``int8_gluon.w8a8_matmul`` (its
    own tiles, tanh GELU) instead of ``int8_kernels.w8a8_matmul``."""
    is_static_input = name in ("attn_out", "down")
    args = (ops["qx"], None if is_static_input else ops["x_scale"], ops["qw"],
            ops["w_scale"] * STATIC_STEP if is_static_input else ops["w_scale"], torch.float16)
    kwargs = dict(bias=ops["bias"], residual=ops["residual"] if is_static_input else None, gelu=name == "up",
                  out_inv_step=ops["out_inv_step"] if name == "up" else None,
                  residual_norm=ops["residual_norm"] if is_static_input else None, half_epilogue=half)
    if gluon:
        return lambda: int8_gluon.w8a8_matmul(*args, **kwargs)
    return lambda: int8_kernels.w8a8_matmul(*args, tiles=tiles, gelu_impl=gelu_impl, **kwargs)


def epilogue_error(name: str, ops: dict, exact: torch.Tensor, tiles: W8A8Tiles | None, gelu_impl: str = "tanh",
                   half: bool = False) -> tuple[float, bool]:
    """(max abs error, within bounds) of ``bert_call``'s output against PyTorch in fp32 on the int32
    product: fp16 outputs (|ref| <~ 10) within 8e-3 (fp16 rounding alone is <= 4e-3 there; 3e-2 for the
    fp16-pair epilogue's three roundings); the int8 output of up within one step of the fp32 reference
    rounded (GELU forms differ by <= ~1e-3)."""
    is_static_input = name in ("attn_out", "down")
    reference = exact.float() * ops["w_scale"] * (STATIC_STEP if is_static_input else ops["x_scale"]) + ops["bias"].float()
    if name == "up":
        reference = torch.round((F.gelu(reference) * ops["out_inv_step"]).clamp(-127, 127))
    if is_static_input:
        stats, weight, bias = ops["residual_norm"]
        normed = (ops["residual"].float() - stats[:, :1]) * stats[:, 1:] * weight.float() + bias.float()
        reference = reference + normed
    error = (bert_call(name, ops, tiles, gelu_impl, half)().float() - reference).abs().max().item()
    return error, error <= (1.0 if name == "up" else 3e-2 if half else 8e-3)


def bench_shape(name: str, n: int, k: int, configs: list[W8A8Tiles], half: bool = False) -> dict:
    """``half``: the sweep's configs run the fp16-pair epilogue (the rule runs both, always)."""
    ops = operands(n, k)
    exact = torch._int_mm(ops["qx"], ops["qw"].t())  # [M, N] int32, the reference
    row = {"shape": name, "M": M, "N": n, "K": k}
    row["fp16_ms"] = gpu_ms(lambda: F.linear(ops["x16"], ops["w16"], ops["bias"]))
    row["int_mm_ms"] = gpu_ms(lambda: torch._int_mm(ops["qx"], ops["qw"].t()))
    print(f"\n{name}: M={M} N={n} K={k}   fp16 cuBLAS (+bias) {row['fp16_ms'] * 1e3:6.1f} us "
          f"{tops(n, k, row['fp16_ms']):4.0f} TFLOP/s   int_mm {row['int_mm_ms'] * 1e3:6.1f} us "
          f"{tops(n, k, row['int_mm_ms']):4.0f} TOPS   ours with BERT's epilogue:", flush=True)
    row["configs"] = []
    for tiles in configs:
        try:
            exact_ok = is_exact(ops, exact, tiles)
            error, close = epilogue_error(name, ops, exact, tiles, half=half)
            ms = gpu_ms(bert_call(name, ops, tiles, half=half))
        except Exception as e:  # a config that does not compile or fit shared memory is a result too
            print(f"  {_label(tiles):52s} FAILED {type(e).__name__}: {str(e).splitlines()[0][:70]}", flush=True)
            continue
        ok = exact_ok and close
        row["configs"].append({**asdict(tiles), "ms": ms, "tops": tops(n, k, ms), "max_err": error,
                               "exact": exact_ok, "ok": ok})
        print(f"  {_label(tiles):52s} {ms * 1e3:6.1f} us {tops(n, k, ms):5.0f} TOPS  "
              f"{'exact' if exact_ok else 'NOT EXACT'}, epilogue err {error:.1e}{'' if ok else '  WRONG'}", flush=True)
    best = min((c for c in row["configs"] if c["ok"]), key=lambda c: c["ms"])
    best_tiles = W8A8Tiles(**{f: best[f] for f in W8A8Tiles.__dataclass_fields__})
    row["best"] = best
    row["best_plain_ms"] = gpu_ms(lambda: int8_kernels.w8a8_matmul(ops["qx"], ops["x_scale"], ops["qw"],
                                                                   ops["w_scale"], torch.float16, tiles=best_tiles))
    row["rule_ms"] = gpu_ms(bert_call(name, ops, None))
    row["rule_err"] = epilogue_error(name, ops, exact, None)[0]
    row["half_rule_ms"] = gpu_ms(bert_call(name, ops, None, half=True))  # the fp16-pair epilogue, rule tiles
    row["half_rule_err"], half_ok = epilogue_error(name, ops, exact, None, half=True)
    print(f"  fp16-pair epilogue (rule tiles): {row['half_rule_ms'] * 1e3:.1f} us against {row['rule_ms'] * 1e3:.1f}, "
          f"err {row['half_rule_err']:.1e}{'' if half_ok else '  WRONG'}", flush=True)
    is_static_input = name in ("attn_out", "down")
    if int8_gluon.supports(ops["qx"], ops["qw"], ops["residual"] if is_static_input else None, name == "up", "tanh",
                           torch.float16, ops["out_inv_step"] if name == "up" else None):
        for half in (False, True):  # int8_gluon: the K step's wgmma kept in flight
            diff = (bert_call(name, ops, None, half=half, gluon=True)().float()
                    - bert_call(name, ops, None, half=half)().float()).abs().max().item()
            key = "gluon_half_ms" if half else "gluon_ms"
            row[key] = gpu_ms(bert_call(name, ops, None, half=half, gluon=True))
            print(f"  int8_gluon{' fp16-pair' if half else ''}: {row[key] * 1e3:.1f} us "
                  f"{tops(n, k, row[key]):.0f} TOPS, max diff from the Triton kernel {diff:.3g}", flush=True)
    if name == "up":  # the GELU forms, with the rule's tiles
        row["gelu_us"] = {impl: gpu_ms(bert_call(name, ops, None, impl)) * 1e3 for impl in int8_kernels.GELU_IMPLS}
        row["gelu_err"] = {impl: epilogue_error(name, ops, exact, None, impl)[0] for impl in int8_kernels.GELU_IMPLS}
        print(f"  GELU forms (rule tiles, int8 out): " + ", ".join(
            f"{impl} {us:.1f} us (err {row['gelu_err'][impl]:.0f} steps)" for impl, us in row["gelu_us"].items()), flush=True)
    print(f"  best: {_label(best_tiles)} {best['tops']:.0f} TOPS with the epilogue, "
          f"{tops(n, k, row['best_plain_ms']):.0f} without; "
          f"tile rule {row['rule_ms'] * 1e3:.1f} us {tops(n, k, row['rule_ms']):.0f} TOPS (err {row['rule_err']:.1e})",
          flush=True)
    return row


def norm_quantize_row(hidden: int = 768) -> dict:
    """LayerNorm then quantize (two launches) vs the fused layer_norm_quantize at [M, hidden] fp16,
    over rows per program; and quantize_rows alone at the two widths BERT quantizes."""
    x = torch.randn(M, hidden, device="cuda").half()
    g, b = torch.randn(hidden, device="cuda").half(), torch.randn(hidden, device="cuda").half()
    ones = torch.ones(hidden, device="cuda").half()
    result = {"separate_ms": gpu_ms(lambda: int8_kernels.quantize_rows(F.layer_norm(x, (hidden,), g, b, 1e-12), ones))}
    for rows in (1, 2, 4, 8, 16):
        result[f"fused_rows{rows}_ms"] = gpu_ms(lambda: int8_kernels.layer_norm_quantize(x, g, b, 1e-12, rows=rows))
    result["fused_rule_ms"] = gpu_ms(lambda: int8_kernels.layer_norm_quantize(x, g, b, 1e-12))
    for width in (768, 3072):
        xw, sw = torch.randn(M, width, device="cuda").half(), torch.ones(width, device="cuda").half()
        result[f"quantize_rows_{width}_ms"] = gpu_ms(lambda: int8_kernels.quantize_rows(xw, sw))
    print(f"\nrow kernels at M={M} (fp16): " + ", ".join(f"{k} {v * 1e3:.1f} us" for k, v in result.items()), flush=True)
    return result


def _label(t: W8A8Tiles) -> str:
    kind = ("tma+persistent" if t.is_persistent else "tma") if t.is_tma else "pointers"
    return (f"{t.block_m}x{t.block_n}x{t.block_k} w{t.num_warps} s{t.num_stages} g{t.group_m} {kind}"
            f"{' split-epilogue' if t.is_subtiled else ''}{' 2/SM' if t.programs_per_sm == 2 else ''}"
            f"{' warp-specialized' if t.is_warp_specialized else ''}")


def main() -> None:
    global M
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--quick", action="store_true", help="only the old baseline config (and the tile rule)")
    p.add_argument("--rows", type=int, default=M, help="M, tokens per GEMM (128: one text of 128 tokens)")
    p.add_argument("--half-epilogue", action="store_true", help="sweep the tiles with the fp16-pair epilogue")
    args = p.parse_args()
    M = args.rows
    torch.manual_seed(0)
    configs = small_m_sweep() if M < 1024 else sweep()
    configs = configs[:1] if args.quick else configs
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    rows = [bench_shape(name, n, k, configs, args.half_epilogue) for name, (n, k) in SHAPES.items()]
    layer = {key: sum(r[key] for r in rows) for key in ("fp16_ms", "int_mm_ms", "best_plain_ms", "rule_ms", "half_rule_ms")}
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
