"""A SmolLM2-shaped decode step on the GPU with the fused norm/RoPE/activation kernels and without.

Random bf16 weights of the real shape (30 layers, hidden 576, 9 heads / 3 KV heads, head_dim 64,
intermediate 1536, vocab 49,152, tied head), a decode batch of ``--batch`` sequences at context
``--context`` over a shuffled paged KV cache, the real attention kernels. Each case is captured
as a CUDA graph (as the engine replays decode steps) and timed with CUDA events: GPU time per
replay, median of ``--repeats`` runs of ``--iters`` replays. Both paths run in the same process
(``use_fused_kernels``), and the kernels each case launches are counted with the profiler. A
GPT-2 124M-shaped step (12 layers, hidden 768) is timed the same way: there only the GELU changes.

    PYTHONPATH=backends:. python3 loadtest/bench_layer_gpu.py

Measured on one H200 (torch 2.11+cu130, triton 3.6), batch 256 at context 192, GPU ms per replay
(two interleaved runs):

| case | plain PyTorch | fused kernels | kernels launched |
|---|---:|---:|---:|
| one SmolLM2 decoder layer | 0.100 / 0.113 | 0.039 / 0.042 | 43 -> 9 |
| SmolLM2 whole step (30 layers, LM head, argmax) | 3.095 / 3.531 | 1.341 / 1.340 | 1301 -> 274 |
| GPT-2 124M whole step | 1.261 / 1.260 | 1.261 / 1.259 | 138 -> 138 |

A fused SmolLM2 layer is 4 GEMMs (~17.5 µs), the decode attention (~13.5 µs), RoPE + KV store
(3.0 µs), two add+RMSNorms (1.8 µs each) and SiLU·mul (2.5 µs). GPT-2 gains nothing: ``F.gelu``
was already one kernel; its next kernels to fuse are the residual adds into its LayerNorms.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
from collections.abc import Callable

import torch
from transformers import LlamaConfig

from trident.engine.attention import AttentionMetadata
from trident.models.layers import use_fused_kernels
from trident.models.llama import LlamaForCausalLM

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
               rope_theta=100000.0, tie_word_embeddings=True)
BLOCK_SIZE = 16


def build_model(max_positions: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM.from_hf_config(LlamaConfig(**SMOLLM2), max_positions)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def decode_inputs(model: LlamaForCausalLM, batch: int, context: int, max_context: int):
    """Token ids, positions, a filled paged cache and the decode metadata for one step."""
    shape = model.shape
    blocks_per_seq = -(-max_context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    kv_cache = torch.randn(2, shape.num_layers, num_blocks, BLOCK_SIZE, shape.num_kv_heads, shape.head_dim,
                           device="cuda", dtype=torch.bfloat16)  # [2, layers, blocks, block_size, kv_heads, head_dim]
    order = list(range(num_blocks))
    random.Random(0).shuffle(order)
    tables = torch.tensor(order, dtype=torch.int32, device="cuda").view(batch, blocks_per_seq)  # [batch, max_blocks]
    position = context - 1
    slots = tables[:, position // BLOCK_SIZE].long() * BLOCK_SIZE + position % BLOCK_SIZE  # [batch]
    metadata = AttentionMetadata(
        slot_mapping=slots, cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
        context_lens=torch.full((batch,), context, dtype=torch.int32, device="cuda"), block_tables=tables,
        block_size=BLOCK_SIZE, decode=None, prefills=[], max_query_len=1, max_context_len=max_context,
        use_kernels=True)
    input_ids = torch.randint(256, shape.vocab_size, (batch,), device="cuda")
    positions = torch.full((batch,), position, dtype=torch.long, device="cuda")
    return input_ids, positions, kv_cache, metadata


def capture(fn: Callable[[], object], fused: bool) -> torch.cuda.CUDAGraph:
    with torch.inference_mode(), use_fused_kernels(fused):
        fn()  # compile the kernels and build the RoPE table outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    return graph


def time_replays(graph: torch.cuda.CUDAGraph, iters: int, repeats: int) -> float:
    """Median GPU milliseconds per replay."""
    graph.replay()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return statistics.median(samples)


def profile_kernels(fn: Callable[[], object], fused: bool) -> list[tuple[str, int, float]]:
    """(kernel name, launches, total GPU µs) of one eager call, most time first (memcpy/memset left out)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), use_fused_kernels(fused):
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
            fn()
            torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for e in prof.events():
        name = e.name.lower()
        if e.device_type.name == "CUDA" and "memcpy" not in name and "memset" not in name:
            entry = totals.setdefault(e.name, [0, 0.0])
            entry[0] += 1
            entry[1] += e.time_range.elapsed_us()
    return sorted(((k, int(n), us) for k, (n, us) in totals.items()), key=lambda row: -row[2])


def gpt2_model() -> torch.nn.Module:
    """GPT-2 124M's shape: the fused path changes only its GELU (its LayerNorms stay PyTorch)."""
    from transformers import GPT2Config

    from trident.models.gpt2 import GPT2LMHeadModel

    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT2LMHeadModel.from_hf_config(GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024))
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=192)
    parser.add_argument("--max-context", type=int, default=256, help="the graph's fixed max_context_len")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    model = build_model(args.max_context)
    input_ids, positions, kv_cache, metadata = decode_inputs(model, args.batch, args.context, args.max_context)
    layer = model.layers[0]
    hidden = torch.randn(args.batch, SMOLLM2["hidden_size"], device="cuda", dtype=torch.bfloat16)
    residual = torch.randn_like(hidden)

    def one_layer():
        return layer(hidden, residual, positions, kv_cache[:, 0], metadata)

    def whole_step():  # what a decode graph of the engine runs: forward, LM head, greedy argmax
        return model.compute_logits(model(input_ids, positions, kv_cache, metadata)).argmax(dim=-1)

    results = {"device": torch.cuda.get_device_name(), "batch": args.batch, "context": args.context}
    gpt2 = gpt2_model()
    gpt2_inputs = decode_inputs(gpt2, args.batch, args.context, args.max_context)

    def gpt2_step():
        return gpt2.compute_logits(gpt2(*gpt2_inputs)).argmax(dim=-1)

    cases = (("one decoder layer", "layer", one_layer), ("whole step (30 layers)", "step", whole_step),
             ("GPT-2 124M whole step", "gpt2_step", gpt2_step))
    for _ in range(2):  # twice, interleaved: the two runs show the noise
        for _, key, fn in cases:
            for path in ("plain", "fused"):
                ms = time_replays(capture(fn, path == "fused"), args.iters, args.repeats)
                results.setdefault(f"{key}_ms_{path}", []).append(round(ms, 4))
    tops = {}
    for _, key, fn in cases:
        for path in ("plain", "fused"):
            kernels_run = profile_kernels(fn, path == "fused")
            results[f"{key}_kernels_{path}"] = sum(n for _, n, _ in kernels_run)
            tops[f"{key}_{path}"] = kernels_run[:8]
        results[f"{key}_speedup"] = round(min(results[f"{key}_ms_plain"]) / min(results[f"{key}_ms_fused"]), 2)
    results["top_kernels"] = tops

    print(f"SmolLM2 shape (and GPT-2 124M), bf16, decode batch {args.batch} at context {args.context}, "
          f"CUDA-graph replays, GPU ms per replay, two runs ({results['device']})")
    print(f"{'':26}{'plain PyTorch':>20}{'fused kernels':>20}{'speedup':>10}")
    for what, key, _ in cases:
        plain, fused = results[f"{key}_ms_plain"], results[f"{key}_ms_fused"]
        print(f"{what:26}{' / '.join(f'{v:.3f}' for v in plain):>20}{' / '.join(f'{v:.3f}' for v in fused):>20}"
              f"{results[f'{key}_speedup']:>9.2f}x")
        print(f"{'  kernels launched':26}{results[f'{key}_kernels_plain']:>20}{results[f'{key}_kernels_fused']:>20}")
    print("\nfused whole step, GPU time by kernel (eager run under the profiler):")
    for name, n, us in tops["step_fused"]:
        print(f"  {us:9.1f} µs  {n:5d} x  {name[:90]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
