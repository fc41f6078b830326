"""Paged attention on the GPU: Triton kernels vs the plain-PyTorch gather path vs FlexAttention.

Measure-and-choose for issue 5. Each case is one engine step's attention for one layer, timed over
``--layers`` separate caches (as many as the model has, so the caches do not sit in L2) that share
one random paged layout (shuffled, non-contiguous blocks), replayed under a CUDA graph (GPU time,
no launch gaps) and eagerly (what an uncaptured Python loop pays). Prints µs per layer, achieved
GB/s against the HBM roofline (3.35 TB/s datasheet, and a measured device copy), and for prefill
TFLOP/s.

    PYTHONPATH=backends:. python3 loadtest/bench_attention_gpu.py            # all cases and sweeps
    PYTHONPATH=backends:. python3 loadtest/bench_attention_gpu.py --no-flex  # skip torch.compile
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from trident.engine import attention, kernels

HBM_BYTES_PER_S = 3.35e12


@dataclass(frozen=True)
class Case:
    name: str
    num_seqs: int
    query_len: int
    context_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 16

    @property
    def num_tokens(self) -> int:
        return self.num_seqs * self.query_len

    def bytes_moved(self, element_size: int, kv_element_size: int | None = None) -> int:
        """Fewest bytes: every cached K/V row once, queries read and outputs written once."""
        kv = self.num_seqs * self.context_len * self.num_kv_heads * self.head_dim * 2
        q_and_out = self.num_tokens * self.num_heads * self.head_dim * 2
        return kv * (kv_element_size or element_size) + q_and_out * element_size

    def flops(self) -> int:
        """QK^T and PV over the causally visible keys."""
        prefix = self.context_len - self.query_len
        visible = self.query_len * prefix + self.query_len * (self.query_len + 1) // 2
        return 4 * self.num_seqs * self.num_heads * self.head_dim * visible


CASES = [
    Case("decode SmolLM2 B=256 ctx=192", 256, 1, 192, 9, 3, 64),
    Case("decode SmolLM2 B=1000 ctx=192", 1000, 1, 192, 9, 3, 64),   # bench_gpt's 1000 x 128/128, mid-decode
    Case("decode GPT-2 B=256 ctx=192", 256, 1, 192, 12, 12, 64),
    Case("decode SmolLM2 B=16 ctx=4096", 16, 1, 4096, 9, 3, 64),
    Case("prefill SmolLM2 128x128", 128, 128, 128, 9, 3, 64),
    Case("prefill GPT-2 128x128", 128, 128, 128, 12, 12, 64),
    Case("decode Llama-8B B=64 ctx=1024", 64, 1, 1024, 32, 8, 128),
    Case("prefill Llama-8B 16x512", 16, 512, 512, 32, 8, 128),
]
FLEX_CASES = {"decode SmolLM2 B=256 ctx=192", "decode GPT-2 B=256 ctx=192", "prefill SmolLM2 128x128"}
DECODE_SWEEP = [dict(block_n=n, num_warps=w, num_stages=s) for n, w, s in
                [(16, 1, 2), (32, 2, 2), (64, 4, 2), (64, 4, 3), (64, 2, 3), (128, 4, 2), (128, 8, 3)]]
PREFILL_SWEEP = [dict(block_m=m, block_n=n, num_warps=w, num_stages=s) for m, n, w, s in
                 [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (128, 64, 8, 2), (128, 32, 4, 3), (32, 64, 4, 2)]]
# A program per KV head over (row, head) pairs of its group (``prefill_attention(pack_gqa=True)``).
PACK_GQA_SWEEP = [dict(pack_gqa=True, block_m=m, block_n=n, num_warps=w) for m, n, w in
                  [(64, 64, 4), (128, 64, 4), (128, 64, 8), (128, 32, 4), (256, 64, 8)]]


@dataclass
class Layout:
    """One step's paged layout (shared by every layer) and per-layer caches and queries."""
    case: Case
    block_tables: torch.Tensor   # [num_seqs, blocks_per_seq] int32, shuffled block ids
    cu_seqlens_q: torch.Tensor   # [num_seqs + 1] int32
    context_lens: torch.Tensor   # [num_seqs] int32
    slot_mapping: torch.Tensor   # [num_tokens] int64
    queries: list[torch.Tensor]  # per layer [num_tokens, num_heads, head_dim]
    keys: list[torch.Tensor]     # per layer [num_tokens, num_kv_heads, head_dim]
    values: list[torch.Tensor]
    k_caches: list[torch.Tensor]  # per layer [num_blocks, block_size, num_kv_heads, head_dim]
    v_caches: list[torch.Tensor]
    metadata: attention.AttentionMetadata

    @property
    def scale(self) -> float:
        return 1 / math.sqrt(self.case.head_dim)


def make_layout(case: Case, num_layers: int, dtype: torch.dtype, device: torch.device) -> Layout:
    blocks_per_seq = -(-case.context_len // case.block_size)
    num_blocks = case.num_seqs * blocks_per_seq
    block_tables = torch.randperm(num_blocks, device=device).view(case.num_seqs, blocks_per_seq).int()
    positions = torch.arange(case.context_len - case.query_len, case.context_len, device=device)
    slots = block_tables[:, positions // case.block_size].long() * case.block_size + positions % case.block_size
    cache_shape = (num_blocks, case.block_size, case.num_kv_heads, case.head_dim)
    randn = lambda *shape: torch.randn(*shape, dtype=dtype, device=device)  # noqa: E731
    slot_mapping = slots.reshape(-1)  # [num_tokens]
    return Layout(
        case=case, block_tables=block_tables,
        cu_seqlens_q=torch.arange(0, case.num_tokens + 1, case.query_len, dtype=torch.int32, device=device),
        context_lens=torch.full((case.num_seqs,), case.context_len, dtype=torch.int32, device=device),
        slot_mapping=slot_mapping,
        queries=[randn(case.num_tokens, case.num_heads, case.head_dim) for _ in range(num_layers)],
        keys=[randn(case.num_tokens, case.num_kv_heads, case.head_dim) for _ in range(num_layers)],
        values=[randn(case.num_tokens, case.num_kv_heads, case.head_dim) for _ in range(num_layers)],
        k_caches=[randn(*cache_shape) for _ in range(num_layers)],
        v_caches=[randn(*cache_shape) for _ in range(num_layers)],
        metadata=attention.AttentionMetadata.build(
            slot_mapping, block_tables, [case.query_len] * case.num_seqs, [case.context_len] * case.num_seqs,
            case.block_size, use_kernels=False),
    )


# --- the contenders: each returns a function that runs layer i ---------------------------------

def triton_attention(layout: Layout, **tuning) -> Callable[[int], torch.Tensor]:
    case = layout.case

    def run(i: int) -> torch.Tensor:
        q, k, v = layout.queries[i], layout.k_caches[i], layout.v_caches[i]
        if case.query_len == 1:
            return kernels.decode_attention(q, k, v, layout.block_tables, layout.context_lens, layout.scale,
                                            max_context_len=case.context_len, **tuning)
        return kernels.prefill_attention(q, k, v, layout.block_tables, layout.cu_seqlens_q, layout.context_lens,
                                         layout.scale, max_query_len=case.query_len, **tuning)
    return run


def int8_cache_attention(layout: Layout) -> Callable[[int], torch.Tensor]:
    """The kernels over int8 copies of the caches (``kv_cache_dtype="int8"``: static per-head scales)."""
    from trident.models.quant import quantize_kv

    case, caches = layout.case, []
    for k, v in zip(layout.k_caches, layout.v_caches):
        scales = torch.stack([k.float().abs().amax(dim=(0, 1, 3)), v.float().abs().amax(dim=(0, 1, 3))]) / 127  # [2, kv_heads]
        caches.append((quantize_kv(k, scales[0]), quantize_kv(v, scales[1]), scales))

    def run(i: int) -> torch.Tensor:
        k, v, scales = caches[i]
        return kernels.paged_attention(layout.queries[i], k, v, layout.block_tables, layout.cu_seqlens_q,
                                       layout.context_lens, layout.scale, max_query_len=case.query_len,
                                       max_context_len=case.context_len, kv_scales=scales)
    return run


def plain_attention(layout: Layout) -> Callable[[int], torch.Tensor]:
    def run(i: int) -> torch.Tensor:
        return attention.paged_attention(layout.queries[i], layout.keys[i], layout.values[i], layout.k_caches[i],
                                         layout.v_caches[i], layout.metadata, layout.scale)
    return run


def plain_store(key, value, k_cache, v_cache, slot_mapping) -> None:
    """attention.py's CPU store (on CUDA, attention.store_kv is the kernel)."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def flex_attention(layout: Layout) -> Callable[[int], torch.Tensor]:
    """FlexAttention over the physical cache, viewed as one long sequence of pages: a BlockMask
    lists each query block's pages straight from our block table, and the mask_mod maps a
    physical key back to its logical position for the causal and length checks."""
    from torch.nn.attention.flex_attention import BlockMask
    from torch.nn.attention.flex_attention import flex_attention as flex

    case = layout.case
    compiled = torch.compile(flex, dynamic=False)
    block_mask = _flex_block_mask(layout, BlockMask)
    # Tiles no larger than a page (each kv_indices entry is one page); flex's decode kernel takes
    # only power-of-two GQA groups, so SmolLM2's group of 3 runs its main kernel at a small BLOCK_M.
    options = {"BLOCK_M": 16 if case.query_len == 1 else 64, "BLOCK_N": case.block_size}
    num_blocks = layout.k_caches[0].shape[0]

    def as_sequence(cache: torch.Tensor) -> torch.Tensor:
        return cache.view(1, num_blocks * case.block_size, case.num_kv_heads, case.head_dim).transpose(1, 2)

    def run(i: int) -> torch.Tensor:
        q = layout.queries[i].view(case.num_seqs, case.query_len, case.num_heads, case.head_dim).transpose(1, 2)
        out = compiled(q, as_sequence(layout.k_caches[i]), as_sequence(layout.v_caches[i]), block_mask=block_mask,
                       scale=layout.scale, enable_gqa=True, kernel_options=options)  # [B, heads, query_len, head_dim]
        return out.transpose(1, 2).reshape(case.num_tokens, case.num_heads, case.head_dim)
    return run


def _flex_block_mask(layout: Layout, block_mask_cls):
    case, device = layout.case, layout.block_tables.device
    num_blocks = layout.k_caches[0].shape[0]
    q_block = 128
    num_q_blocks = -(-case.query_len // q_block)
    prefix = case.context_len - case.query_len
    last_query = torch.clamp((torch.arange(num_q_blocks, device=device) + 1) * q_block, max=case.query_len)
    pages = -(-(prefix + last_query) // case.block_size)  # [q_blocks] pages visible to each query block
    kv_num_blocks = pages.int().expand(case.num_seqs, 1, num_q_blocks).contiguous()
    # As wide as the physical cache: BlockMask densifies by indexing with these (physical) ids.
    kv_indices = torch.zeros(case.num_seqs, 1, num_q_blocks, num_blocks, dtype=torch.int32, device=device)
    kv_indices[..., :layout.block_tables.shape[1]] = layout.block_tables[:, None, None, :]
    logical_page = torch.full((case.num_seqs, num_blocks), -1, dtype=torch.int32, device=device)
    pages_per_seq = layout.block_tables.shape[1]
    logical_page.scatter_(1, layout.block_tables.long(),
                          torch.arange(pages_per_seq, dtype=torch.int32, device=device).expand(case.num_seqs, -1))
    block_size, context_len = case.block_size, case.context_len

    def mask_mod(b, h, q_idx, kv_idx):
        logical = logical_page[b, kv_idx // block_size] * block_size + kv_idx % block_size
        return (logical >= 0) & (logical <= prefix + q_idx) & (logical < context_len)

    return block_mask_cls.from_kv_blocks(kv_num_blocks, kv_indices, BLOCK_SIZE=(q_block, block_size),
                                         mask_mod=mask_mod, seq_lengths=(case.query_len, num_blocks * block_size))


# --- timing -------------------------------------------------------------------------------------

def time_graph(fn: Callable[[], None], repeats: int) -> float:
    """Median ms of one replay of ``fn`` captured in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _median_ms(graph.replay, repeats)


def time_eager(fn: Callable[[], None], repeats: int) -> float:
    fn()
    return _median_ms(fn, repeats)


def _median_ms(fn: Callable[[], None], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measured_copy_bandwidth(device: torch.device) -> float:
    """Bytes read plus written per second by a 1 GiB device-to-device copy."""
    src = torch.randn(1 << 28, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), 10)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


# --- reporting ----------------------------------------------------------------------------------

@dataclass
class Row:
    case: str
    method: str
    graph_us: float | None
    eager_us: float | None
    gbps: float | None
    tflops: float | None
    error: float | None
    note: str = ""


def measure(layout: Layout, method: str, make_run: Callable, reference: torch.Tensor | None, repeats: int,
            dtype: torch.dtype, kv_element_size: int | None = None) -> Row:
    case, num_layers = layout.case, len(layout.k_caches)
    try:
        run = make_run()
        out = run(0)
        error = None if reference is None else float((out.float() - reference.float()).norm() / reference.float().norm())
        all_layers = lambda: [run(i) for i in range(num_layers)]  # noqa: E731
        eager = time_eager(all_layers, repeats) * 1e3 / num_layers
        try:
            graph, note = time_graph(all_layers, repeats) * 1e3 / num_layers, ""
        except Exception as exc:  # noqa: BLE001 - report and keep the eager number
            graph, note = None, f"graph capture failed: {type(exc).__name__}"
    except Exception as exc:  # noqa: BLE001 - a contender that cannot run is a result too
        return Row(case.name, method, None, None, None, None, None, f"failed: {type(exc).__name__}: {exc}"[:160])
    best = graph if graph is not None else eager
    seconds = best * 1e-6
    return Row(case.name, method, graph, eager,
               case.bytes_moved(torch.finfo(dtype).bits // 8, kv_element_size) / seconds / 1e9,
               case.flops() / seconds / 1e12, error, note)


def store_kv_rows(layout: Layout, repeats: int) -> list[Row]:
    case, n = layout.case, len(layout.k_caches)
    contenders = {"triton store_kv": kernels.store_kv, "plain index_copy_": plain_store}
    rows = []
    bytes_moved = 4 * case.num_tokens * case.num_kv_heads * case.head_dim * layout.k_caches[0].element_size()
    for name, store in contenders.items():
        fn = lambda: [store(layout.keys[i], layout.values[i], layout.k_caches[i], layout.v_caches[i],  # noqa: E731
                            layout.slot_mapping) for i in range(n)]
        graph, eager = time_graph(fn, repeats) * 1e3 / n, time_eager(fn, repeats) * 1e3 / n
        rows.append(Row(case.name, name, graph, eager, bytes_moved / (graph * 1e-6) / 1e9, None, None))
    return rows


def print_rows(rows: list[Row], copy_bw: float) -> None:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"\n{'case':32} {'method':34} {'graph us':>9} {'eager us':>9} {'GB/s':>7} {'%3.35T':>6} "
          f"{'%copy':>6} {'TFLOP/s':>8} {'rel.err':>8}  note")
    for r in rows:
        pct = None if r.gbps is None else 100 * r.gbps * 1e9 / HBM_BYTES_PER_S
        pct_copy = None if r.gbps is None else 100 * r.gbps * 1e9 / copy_bw
        print(f"{r.case:32} {r.method:34} {fmt(r.graph_us, '9.1f')} {fmt(r.eager_us, '9.1f')} "
              f"{fmt(r.gbps, '7.0f')} {fmt(pct, '6.1f')} {fmt(pct_copy, '6.1f')} {fmt(r.tflops, '8.2f')} "
              f"{fmt(r.error, '8.1e')}  {r.note}")


def run_case(case: Case, args, dtype: torch.dtype, device: torch.device) -> list[Row]:
    layout = make_layout(case, args.layers, dtype, device)
    for i in range(args.layers):  # the step's own tokens are in the cache before attention runs
        kernels.store_kv(layout.keys[i], layout.values[i], layout.k_caches[i], layout.v_caches[i], layout.slot_mapping)
    reference = plain_attention(layout)(0)
    rows = [measure(layout, "plain PyTorch (gather + SDPA)", lambda: plain_attention(layout), None, args.repeats, dtype),
            measure(layout, "triton (default)", lambda: triton_attention(layout), reference, args.repeats, dtype)]
    # int8 KV: half the bytes per cached token (its GB/s counts the int8 bytes; the error is against
    # the unquantized cache, so it includes the quantization)
    rows.append(measure(layout, "triton int8 cache", lambda: int8_cache_attention(layout), reference, args.repeats,
                        dtype, kv_element_size=1))
    if case.query_len > 1 and case.num_heads > case.num_kv_heads:   # GQA prefill: packed tiles, always shown
        for tuning in PACK_GQA_SWEEP if args.sweep else PACK_GQA_SWEEP[:2]:
            label = "triton " + ",".join(f"{k.replace('num_', '')}={v}" for k, v in tuning.items())
            rows.append(measure(layout, label, lambda t=tuning: triton_attention(layout, **t), reference,
                                args.repeats, dtype))
    if args.sweep:
        sweep = DECODE_SWEEP if case.query_len == 1 else PREFILL_SWEEP
        for tuning in sweep:
            label = "triton " + ",".join(f"{k.replace('num_', '')}={v}" for k, v in tuning.items())
            rows.append(measure(layout, label, lambda t=tuning: triton_attention(layout, **t), reference,
                                args.repeats, dtype))
    if case.query_len == 1 and case.num_seqs * case.num_kv_heads < 264:
        rows.append(measure(layout, "triton splits=1 (no split-K)",
                            lambda: triton_attention(layout, num_splits=1), reference, args.repeats, dtype))
    if args.flex and case.name in FLEX_CASES:
        t0 = time.perf_counter()
        row = measure(layout, "FlexAttention (block-table mask)", lambda: flex_attention(layout), reference,
                      args.repeats, dtype)
        row.note = (row.note + f" compile+measure {time.perf_counter() - t0:.0f}s").strip()
        rows.append(row)
    if case.query_len == 1 and case.num_seqs == 256 and case.num_kv_heads == 3:
        rows += store_kv_rows(layout, args.repeats)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--layers", type=int, default=30, help="caches rotated per timing (SmolLM2 has 30)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-flex", dest="flex", action="store_false")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false")
    args = parser.parse_args()
    if not (torch.cuda.is_available() and kernels.IS_AVAILABLE):
        raise SystemExit("needs CUDA and triton")
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {args.dtype}  layers {args.layers}")
    copy_bw = measured_copy_bandwidth(device)
    print(f"measured device copy: {copy_bw / 1e12:.2f} TB/s (read + write); datasheet {HBM_BYTES_PER_S / 1e12:.2f}")
    rows = []
    for case in CASES:
        case_rows = run_case(case, args, dtype, device)
        print_rows(case_rows, copy_bw)
        rows += case_rows
        torch.cuda.empty_cache()
    print("\n=== summary ===")
    print_rows(rows, copy_bw)


if __name__ == "__main__":
    main()
