"""Where a BERT-base batch's GPU time goes, kernel by kernel, and what the knobs around it buy (CUDA).

    PYTHONPATH=backends:. python3 loadtest/profile_bert_gpu.py                  # fp16, int8 (and HF) tables
    PYTHONPATH=backends:. python3 loadtest/profile_bert_gpu.py --knobs --json $OUT/profile_bert.json
    PYTHONPATH=backends:. python3 loadtest/profile_bert_gpu.py --precisions int8 --gemm-sweep   # + GEMM tiles

1. Kernel table: one eager forward of a batch of 128 sequences x 128 tokens (BERT-base shape, random
   weights: values do not change speed) under ``torch.profiler``; CUDA time summed per kernel name,
   the top 25, then the same time summed per category (GEMM, attention, LayerNorm, quantize, ...).
   Eager, because a graph replay shows as one event; the kernels are the same ones the graph replays.
2. Batch time: the batch's CUDA graph replayed alone (GPU ms from CUDA events) against
   ``TorchRuntime.run`` end to end (host packing, copies, the sync on the result), ``pack`` alone,
   and ``TorchRuntime.run_many`` per batch (packing overlapped with the previous batch's GPU work).
   ``--precisions int8_dynamic int8_static int8_dynamic_attn``: INT8 with its hand-offs pinned (VARIANTS).
3. ``--knobs``: attention at [128, 12, 128, 64] fp16 (varlen FlashAttention as the runtime called it,
   SDPA's flash / efficient / cuDNN backends on the dense batch, our ``attention_quantize`` with and
   without its int8 rows against FlashAttention + ``quantize_rows``) and the GELU epilogue's erf
   variants (``int8_kernels.GELU_IMPLS``), and the FFN's int8 hand-off, dynamic against static.
   ``--row-sweep``: the LayerNorm + quantize and the attention kernels over launch shapes.
   ``--gemm-sweep``: the four W8A8 GEMMs
   at M = 16384 with tile variants (Triton's warp specialization, wider tiles). GPU time from
   CUDA-graph replays (loadtest/bench_int8_gemm_gpu.py).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "backends"), str(ROOT / "loadtest")]
from bench_int8_gemm_gpu import SHAPES, bench_shape, gpu_ms, operands, tops  # noqa: E402
from trident.bert.torch_model import BertShape, PackedBert, varlen_attention  # noqa: E402
from trident.bert.torch_runtime import TorchRuntime, TorchRuntimeOptions, pack, prepare  # noqa: E402
from trident.models import int8_kernels  # noqa: E402
from trident.models.int8_kernels import LARGE_M_TILES, W8A8Tiles  # noqa: E402

BATCH, SEQLEN = 128, 128
CATEGORIES = [  # first match wins; kernel names lower-cased (FlashAttention's name mentions cutlass)
    ("attention", r"flash|fmha|attention|cudnn"),
    ("gemm", r"w8a8|nvjet|gemm|cutlass|xmma|_int_mm"),
    ("layernorm (+quantize)", r"layer_norm"),
    ("pooling", r"mean_pool"),
    ("quantize", r"quantize"),
    ("gelu", r"gelu"),
    ("embedding / gather", r"embedding|index_select|gather|index_add|indexing|scatter"),
    ("copy / cast / fill", r"copy|memcpy|memset|fill|cat_|catarray"),
    ("elementwise / reduce", r"elementwise|vectorized|reduce|norm|add|mul"),
]


def batch_of(vocab_size: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(1000, vocab_size, SEQLEN).tolist(), [0] * SEQLEN) for _ in range(BATCH)]


# --precisions: "int8" is the runtime's default INT8; the others pin its hand-offs (attention and GELU outputs).
VARIANTS = {"int8_dynamic": ("int8", {"int8_ffn": "dynamic", "int8_attn": "dynamic"}),
            "int8_static": ("int8", {"int8_ffn": "static", "int8_attn": "static"}),
            "int8_dynamic_attn": ("int8", {"int8_attn": "dynamic"}),  # the fifth session's default
            "int8_fp32_epilogue": ("int8", {"int8_epilogue": "fp32"}),   # the GEMM epilogues in fp32, not fp16 pairs
            "int8_gluon": ("int8", {"int8_gemm_kernel": "gluon"}),        # the GEMMs on int8_gluon
            "int8_gluon_fp32": ("int8", {"int8_gemm_kernel": "gluon", "int8_epilogue": "fp32"})}


def runtime(precision: str, use_cuda_graphs: bool) -> TorchRuntime:
    torch.manual_seed(0)
    precision, extra = VARIANTS.get(precision, (precision, {}))
    options = TorchRuntimeOptions(precision=precision, use_cuda_graphs=use_cuda_graphs, **extra)
    return TorchRuntime(prepare(PackedBert(BertShape()).eval(), options), options, max_seqlen=SEQLEN)


class HfRunner:
    """HF ``BertModel`` eager fp16 on the padded batch (what bench_bert compares against)."""

    def __init__(self) -> None:
        from transformers import BertConfig, BertModel
        torch.manual_seed(0)
        self.model = BertModel(BertConfig()).eval().cuda().half()

    @torch.inference_mode()
    def run(self, sequences) -> np.ndarray:
        ids = torch.tensor([s for s, _ in sequences], device="cuda")  # [batch, seq]
        hidden = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return F.normalize(hidden.float().mean(1), dim=-1).cpu().numpy()


def kernel_times(runner, batch) -> dict[str, tuple[int, float]]:
    """{kernel name: (calls, total CUDA us)} of one ``runner.run(batch)`` after a warm-up call."""
    runner.run(batch)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        runner.run(batch)
    totals: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name][0] += 1
            totals[event.name][1] += event.time_range.elapsed_us()
    return {name: (calls, us) for name, (calls, us) in totals.items()}


def category(name: str) -> str:
    lowered = name.lower()
    return next((label for label, pattern in CATEGORIES if re.search(pattern, lowered)), "other")


def print_kernel_table(label: str, times: dict[str, tuple[int, float]], top: int = 25) -> dict:
    total = sum(us for _, us in times.values())
    print(f"\n### {label}: one batch of {BATCH} x {SEQLEN}, eager, GPU time {total / 1e3:.2f} ms "
          f"(bound: {BATCH / total * 1e6:,.0f} seq/s)\n")
    print("| kernel | calls | total us | us/call | share |\n|---|---:|---:|---:|---:|")
    for name, (calls, us) in sorted(times.items(), key=lambda kv: -kv[1][1])[:top]:
        short = name if len(name) <= 90 else name[:87] + "..."
        print(f"| `{short}` | {calls} | {us:,.0f} | {us / calls:,.1f} | {us / total:.1%} |")
    by_category: dict[str, float] = defaultdict(float)
    for name, (_, us) in times.items():
        by_category[category(name)] += us
    print("\n| category | ms per batch | share |\n|---|---:|---:|")
    for name, us in sorted(by_category.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {us / 1e3:.3f} | {us / total:.1%} |")
    return {"total_us": total, "kernels": {k: list(v) for k, v in times.items()}, "categories": dict(by_category)}


def batch_times(rt: TorchRuntime, batch, repeats: int = 20) -> dict[str, float]:
    """GPU ms of the batch's graph replay, wall ms of ``run`` and host ms of ``pack``, medians."""
    rt.run(batch)
    graph = next(iter(rt._graphs.values())).graph  # the one bucket this batch captured
    gpu, wall, host = [], [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end))
        t0 = time.perf_counter()
        rt.run(batch)
        wall.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        pack(batch, BATCH * SEQLEN, BATCH)
        host.append((time.perf_counter() - t0) * 1e3)
    result = {"graph_gpu_ms": statistics.median(gpu), "run_wall_ms": statistics.median(wall),
              "pack_host_ms": statistics.median(host)}
    result["seq_per_s"] = BATCH / result["run_wall_ms"] * 1e3
    # run_many: the same batch `repeats` times, the next one packed while the GPU runs this one
    rt.run_many([batch] * 2)
    t0 = time.perf_counter()
    rt.run_many([batch] * repeats)
    result["run_many_wall_ms"] = (time.perf_counter() - t0) * 1e3 / repeats
    result["pipelined_seq_per_s"] = BATCH / result["run_many_wall_ms"] * 1e3
    return result | loop_times(rt, graph)


def loop_times(rt: TorchRuntime, graph: torch.cuda.CUDAGraph, num_batches: int = 12) -> dict[str, float]:
    """ms per batch over ``num_batches`` distinct batches as bench_bert runs them: ``run`` one after
    the other, ``run_many`` on all, and the graph replayed back to back with no host work between
    (the GPU's own pace when it never waits; the ceiling of ``run_many``)."""
    batches = [batch_of(BertShape().vocab_size, seed) for seed in range(num_batches)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for batch in batches:
        rt.run(batch)
    run_ms = (time.perf_counter() - t0) * 1e3 / num_batches
    t0 = time.perf_counter()
    rt.run_many(batches)
    many_ms = (time.perf_counter() - t0) * 1e3 / num_batches
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(num_batches):
        graph.replay()
    end.record()
    end.synchronize()
    return {"loop_run_ms": run_ms, "loop_run_many_ms": many_ms, "loop_replay_gpu_ms": start.elapsed_time(end) / num_batches}


# ---- knobs ----------------------------------------------------------------------------------------

def attention_variants(heads: int = 12, head_dim: int = 64) -> dict[str, float]:
    """GPU us of the attention of one layer on the batch, per implementation, checked against the first."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    num_tokens = BATCH * SEQLEN
    qkv = torch.randn(num_tokens, 3, heads, head_dim, device="cuda", dtype=torch.float16)  # [num_tokens, 3, heads, head_dim]
    cu_seqlens = torch.arange(0, num_tokens + 1, SEQLEN, device="cuda", dtype=torch.int32)   # [batch + 1]
    q, k, v = (t.contiguous() for t in qkv.unbind(1))
    dense = qkv.view(BATCH, SEQLEN, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # [3, batch, heads, seq, head_dim]
    ones = torch.ones(heads * head_dim, device="cuda", dtype=torch.float16)

    def flash_then_quantize():
        out = varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, SEQLEN).reshape(num_tokens, -1)
        int8_kernels.quantize_rows(out, ones)
        return out

    def sdpa(backend):
        def call():
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(dense[0], dense[1], dense[2])  # [batch, heads, seq, head_dim]
            return out.transpose(1, 2).reshape(num_tokens, heads, head_dim)
        return call

    variants = {
        "flash varlen, views of qkv (the runtime)": lambda: varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, SEQLEN),
        "flash varlen, contiguous q/k/v": lambda: varlen_attention(q, k, v, cu_seqlens, SEQLEN),
        "sdpa flash, dense": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa efficient, dense": sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "sdpa cudnn, dense": sdpa(SDPBackend.CUDNN_ATTENTION),
        "ours (attention_quantize), fp16 out": lambda: int8_kernels.attention_quantize(qkv, cu_seqlens, SEQLEN)[0],
        "ours + int8 rows for the out-projection": lambda: int8_kernels.attention_quantize(qkv, cu_seqlens, SEQLEN, ones)[0],
        "flash varlen + quantize_rows (session 2)": lambda: flash_then_quantize(),
    }
    reference = variants["flash varlen, views of qkv (the runtime)"]().float().reshape(num_tokens, -1)  # [num_tokens, hidden]
    result = {}
    print(f"\n### attention, one layer: {BATCH} x {SEQLEN} tokens, {heads} heads x {head_dim}, fp16\n")
    for label, call in variants.items():
        try:
            error = (call().float().reshape(num_tokens, -1) - reference).abs().max().item()
            us = gpu_ms(call) * 1e3
        except Exception as e:  # a backend this build or GPU lacks is a result too
            print(f"  {label:44s} FAILED {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            continue
        result[label] = us
        print(f"  {label:44s} {us:7.1f} us   x12 layers {us * 12 / 1e3:.2f} ms   max diff {error:.1e}")
    return result


def row_kernel_sweep(hidden: int = 768, heads: int = 12, head_dim: int = 64) -> dict[str, dict[str, float]]:
    """The INT8 layer's two non-GEMM kernels over launch shapes, at the batch's tokens: the LayerNorm that
    writes row statistics + int8 rows (``layer_norm_stats_quantize``, both norms of a layer) and the
    attention that writes int8 rows at a static step (the runtime's default). GPU us from graph replays,
    the HBM bandwidth that implies, and the int8 outputs' largest difference from the rule's launch."""
    num_tokens = BATCH * SEQLEN
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(num_tokens, hidden, device="cuda", generator=g).half()                    # [tokens, hidden]
    weight, bias = torch.rand(hidden, device="cuda", generator=g).half() + 0.5, torch.randn(hidden, device="cuda").half()
    smooth = torch.rand(hidden, device="cuda", generator=g) + 0.5                               # [hidden] fp32
    qkv = torch.randn(num_tokens, 3, heads, head_dim, device="cuda", generator=g).half()      # [tokens, 3, heads, head_dim]
    cu_seqlens = torch.arange(0, num_tokens + 1, SEQLEN, device="cuda", dtype=torch.int32)     # [batch + 1]
    step = torch.full((heads * head_dim,), 127 / 4.0, device="cuda")                          # [hidden]
    kernels = {
        "layer_norm_stats_quantize": (
            lambda launch: int8_kernels.layer_norm_stats_quantize(x, weight, bias, 1e-12, smooth,
                                                                  *(launch or (None, None)))[1],
            num_tokens * (2 * hidden + hidden + 12), [(r, w) for r in (1, 2, 4, 8, 16) for w in (1, 2, 4, 8)]),
        "attention_quantize (static int8 out)": (
            lambda launch: int8_kernels.attention_quantize(qkv, cu_seqlens, SEQLEN, out_inv_step=step, launch=launch)[1],
            num_tokens * (3 * hidden * 2 + hidden), [(m, w) for m in (16, 32, 64, 128) for w in (1, 2, 4, 8)]),
    }
    result = {}
    for name, (call, num_bytes, launches) in kernels.items():
        reference = call(None)
        rule_us = gpu_ms(lambda: call(None)) * 1e3
        print(f"\n### {name}, {num_tokens} tokens: the rule's launch {rule_us:.1f} us ({num_bytes / rule_us / 1e3:.0f} GB/s)")
        result[name] = {"rule": rule_us}
        for launch in launches:
            try:
                diff = (call(launch).int() - reference.int()).abs().max().item()
                us = gpu_ms(lambda: call(launch)) * 1e3
            except Exception as e:  # a launch that does not compile or fit is a result too
                print(f"  {launch}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                continue
            result[name][str(launch)] = us
            print(f"  {launch}: {us:6.1f} us  {num_bytes / us / 1e3:5.0f} GB/s  int8 max diff {diff}", flush=True)
    return result


GEMM_VARIANTS = [
    LARGE_M_TILES,
    W8A8Tiles(128, 128, 128, 8, 3, 8, is_tma=True, is_subtiled=True, is_warp_specialized=True),
    W8A8Tiles(128, 256, 128, 8, 3, 8, is_tma=True, is_subtiled=True),
    W8A8Tiles(128, 256, 128, 8, 3, 8, is_tma=True, is_subtiled=True, is_warp_specialized=True),
]


def gelu_variants(tiles: list[W8A8Tiles]) -> dict[str, dict[str, float]]:
    """The up projection (GELU epilogue) per erf implementation, per tile config: us, and max error
    against PyTorch's erf GELU in fp32 on the exact int32 product."""
    n, k = SHAPES["up"]
    ops = operands(n, k)
    exact = torch._int_mm(ops["qx"], ops["qw"].t())  # [M, N] int32
    reference = F.gelu(exact.float() * ops["x_scale"] * ops["w_scale"] + ops["bias"].float())
    result = {}
    print("\n### up projection, GELU epilogue variants\n")
    for t in tiles:
        for impl in int8_kernels.GELU_IMPLS:
            def call(t=t, impl=impl):
                return int8_kernels.w8a8_matmul(ops["qx"], ops["x_scale"], ops["qw"], ops["w_scale"], torch.float16,
                                                bias=ops["bias"], gelu=True, tiles=t, gelu_impl=impl)
            label = f"{_label(t)} gelu={impl}"
            try:
                error = (call().float() - reference).abs().max().item()
                ms = gpu_ms(call)
            except Exception as e:
                print(f"  {label:70s} FAILED {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                continue
            result[label] = {"us": ms * 1e3, "tops": tops(n, k, ms), "max_err": error}
            print(f"  {label:70s} {ms * 1e3:6.1f} us {tops(n, k, ms):5.0f} TOPS  max err {error:.1e}", flush=True)
    return result


STATIC_UP_TILES = {  # the rule's 128x128 split TMA epilogue, and what might suit an int8 output better
    "128x128 tma unsplit": W8A8Tiles(128, 128, 128, 8, 3, 8, is_tma=True),
    "128x128 pointers split": W8A8Tiles(128, 128, 128, 8, 3, 8, is_subtiled=True),
    "128x256 tma split": W8A8Tiles(128, 256, 128, 8, 3, 8, is_tma=True, is_subtiled=True),
    "128x128 tma split 4 stages": W8A8Tiles(128, 128, 128, 8, 4, 8, is_tma=True, is_subtiled=True),
}


def ffn_handoff_variants() -> dict[str, float]:
    """One layer's FFN at M = 16384 (BERT-base), us per step: the dynamic hand-off (up writes fp16,
    quantize_rows, down with per-row scales) against the static one (up writes int8 at a static step
    per column, down without per-row scales)."""
    up, down = operands(*SHAPES["up"]), operands(*SHAPES["down"])
    inv_step = torch.full((SHAPES["up"][0],), 40.0, device="cuda")  # [intermediate]
    ones = torch.ones(SHAPES["up"][0], device="cuda", dtype=torch.float16)
    hidden = int8_kernels.w8a8_matmul(up["qx"], up["x_scale"], up["qw"], up["w_scale"], torch.float16,
                                      bias=up["bias"], gelu=True, gelu_impl="tanh")  # [M, intermediate]
    steps: dict = {
        "dynamic: up (fp16 out, tanh GELU)": lambda: int8_kernels.w8a8_matmul(
            up["qx"], up["x_scale"], up["qw"], up["w_scale"], torch.float16, bias=up["bias"], gelu=True, gelu_impl="tanh"),
        "dynamic: quantize_rows [M, 3072]": lambda: int8_kernels.quantize_rows(hidden, ones),
        "dynamic: down (per-row scales, residual)": lambda: int8_kernels.w8a8_matmul(
            down["qx"], down["x_scale"], down["qw"], down["w_scale"], torch.float16, bias=down["bias"],
            residual=down["residual"]),
        "static: up (int8 out, tanh GELU)": lambda: int8_kernels.w8a8_matmul(
            up["qx"], up["x_scale"], up["qw"], up["w_scale"], torch.float16, bias=up["bias"], gelu=True,
            gelu_impl="tanh", out_inv_step=inv_step),
        "static: down (static step, residual)": lambda: int8_kernels.w8a8_matmul(
            down["qx"], None, down["qw"], down["w_scale"], torch.float16, bias=down["bias"], residual=down["residual"]),
    }
    steps_of_the_rule = set(steps)
    for label, t in STATIC_UP_TILES.items():  # where the int8 output's extra time goes (tile shape, store path)
        steps[f"static: up (int8 out), {label}"] = lambda t=t: int8_kernels.w8a8_matmul(
            up["qx"], up["x_scale"], up["qw"], up["w_scale"], torch.float16, bias=up["bias"], gelu=True,
            gelu_impl="tanh", out_inv_step=inv_step, tiles=t)
        steps[f"dynamic: up (fp16 out), {label}"] = lambda t=t: int8_kernels.w8a8_matmul(
            up["qx"], up["x_scale"], up["qw"], up["w_scale"], torch.float16, bias=up["bias"], gelu=True,
            gelu_impl="tanh", tiles=t)
    print("\n### FFN hand-off, one layer at M = 16384\n")
    result = {}
    for label, call in steps.items():
        try:
            result[label] = gpu_ms(call) * 1e3
        except Exception as e:  # a tile shape this GPU or Triton build refuses is a result too
            print(f"  {label:60s} FAILED {type(e).__name__}: {str(e).splitlines()[0][:80]}")
    for label, us in result.items():
        print(f"  {label:60s} {us:7.1f} us")
    for kind in ("dynamic", "static"):
        total = sum(us for label, us in result.items() if label.startswith(kind) and label in steps_of_the_rule)
        print(f"  {kind} total {total:7.1f} us per layer, x12 {total * 12 / 1e3:.2f} ms")
    return result


def _label(t: W8A8Tiles) -> str:
    return (f"{t.block_m}x{t.block_n}x{t.block_k} w{t.num_warps} s{t.num_stages}"
            f"{' tma' if t.is_tma else ''}{' persistent' if t.is_persistent else ''}"
            f"{' split' if t.is_subtiled else ''}{' ws' if t.is_warp_specialized else ''}")


def gemm_variants() -> list[dict]:
    rows = []
    for name, (n, k) in SHAPES.items():
        try:
            rows.append(bench_shape(name, n, k, GEMM_VARIANTS))
        except Exception as e:  # every variant of a shape failed
            print(f"{name}: FAILED {type(e).__name__}: {e}")
    return rows


def main() -> None:
    global BATCH
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precisions", nargs="+", default=["fp16", "int8", "hf"],
                   choices=["fp16", "int8", "bf16", "hf", *VARIANTS])
    p.add_argument("--knobs", action="store_true", help="attention and GELU variants too")
    p.add_argument("--gemm-sweep", action="store_true", help="the four GEMMs over tile variants too")
    p.add_argument("--row-sweep", action="store_true", help="LayerNorm and attention launch shapes too")
    p.add_argument("--batch", type=int, default=BATCH, help="sequences of 128 tokens per batch (1: the latency path)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()
    BATCH = args.batch
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    batch = batch_of(BertShape().vocab_size)
    record: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "profiles": {}, "batch": {}}
    # Batch times first, before any torch.profiler session: its tracing may outlive the session (on the
    # H200, run() timed after one took 5.97 ms per batch in a loop, against 5.32 in bench_bert).
    for precision in [p for p in args.precisions if p != "hf"]:
        times = batch_times(runtime(precision, use_cuda_graphs=True), batch)
        record["batch"][precision] = times
        print(f"\nours {precision}, CUDA graph: replay {times['graph_gpu_ms']:.2f} ms GPU; run() {times['run_wall_ms']:.2f} ms "
              f"wall = {times['seq_per_s']:,.0f} seq/s (pack {times['pack_host_ms']:.2f} ms host); run_many() "
              f"{times['run_many_wall_ms']:.2f} ms per batch = {times['pipelined_seq_per_s']:,.0f} seq/s", flush=True)
        print(f"ours {precision}, 12 distinct batches in a loop, ms per batch: run() {times['loop_run_ms']:.2f}, "
              f"run_many() {times['loop_run_many_ms']:.2f}, graph replays back to back {times['loop_replay_gpu_ms']:.2f} GPU",
              flush=True)
        torch.cuda.empty_cache()
    for precision in args.precisions:
        if precision == "hf":
            record["profiles"]["hf fp16"] = print_kernel_table("HF eager fp16", kernel_times(HfRunner(), batch), args.top)
            continue
        eager = runtime(precision, use_cuda_graphs=False)
        record["profiles"][precision] = print_kernel_table(f"ours {precision}", kernel_times(eager, batch), args.top)
        del eager
        torch.cuda.empty_cache()
    if args.knobs:
        record["attention_us"] = attention_variants()
        record["gelu"] = gelu_variants([LARGE_M_TILES])
        record["ffn_handoff_us"] = ffn_handoff_variants()
    if args.gemm_sweep:
        record["gemms"] = gemm_variants()
    if args.row_sweep:
        record["row_kernels"] = row_kernel_sweep()
    if args.json:
        args.json.write_text(json.dumps(record, indent=1, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
