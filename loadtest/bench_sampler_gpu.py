"""One decode step's sampling on the GPU: the sampler against the sort-based filter it replaced.

``Sampler.sample`` (host inputs, top-k mask, ``kernels.sampling.sample_rows``) and, in the same run,
the sort-based chain that vLLM's PyTorch fallback and our previous sampler run: temperature,
``apply_top_k_top_p_min_p`` (a full sort for top-p), softmax, exponential noise, argmax. Logits are
fp32 [rows, vocab] as ``ModelRunner.launch_sampled`` hands them. Prints ms per step (CUDA events,
median of ``--repeats``; the sampler's includes building its per-row inputs on the host) and the
bytes of one pass over the logits at the measured copy bandwidth, for scale.

    PYTHONPATH=backends:. python3 loadtest/bench_sampler_gpu.py            # SmolLM2 vocab, 1000 rows
    PYTHONPATH=backends:. python3 loadtest/bench_sampler_gpu.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from bench_attention_gpu import _median_ms, measured_copy_bandwidth  # noqa: E402  (loadtest/, the script's dir)
from trident.engine.sampler import Sampler, apply_top_k_top_p_min_p
from trident.engine.sampling_params import SamplingParams
from trident.engine.sequence import Sequence

CASES = {
    "temperature 0.8, top_p 0.95": dict(temperature=0.8, top_p=0.95),
    "temperature 1.0": dict(temperature=1.0),
    "temperature 0.7, top_p 0.5": dict(temperature=0.7, top_p=0.5),
    "temperature 1.0, min_p 0.05": dict(temperature=1.0, min_p=0.05),
    "top_k 50, top_p 0.9": dict(temperature=0.8, top_k=50, top_p=0.9),
    "greedy": dict(temperature=0.0),
}


def sort_based(logits: torch.Tensor, params: list[SamplingParams], generator: torch.Generator) -> torch.Tensor:
    """The previous sampler's path (and vLLM's PyTorch fallback): sort for top-p, exponential race."""
    temperature = torch.tensor([p.temperature or 1.0 for p in params], device=logits.device)[:, None]
    warped = apply_top_k_top_p_min_p(logits / temperature, params)  # [rows, vocab]
    q = torch.empty_like(warped).exponential_(generator=generator)
    return (warped.softmax(dim=-1) / q).argmax(dim=-1)


SWEEP_PARAMS = {"temperature 1.0": (1.0, 1.0, 0.0), "temperature 0.8, top_p 0.95": (0.8, 0.95, 0.0),
                "temperature 0.7, top_p 0.5": (0.7, 0.5, 0.0), "min_p 0.05": (1.0, 1.0, 0.05)}
SWEEP_TILES = [(4096, 8), (2048, 8), (2048, 4), (1024, 4), (1024, 2), (512, 2)]


def kernel_sweep(logits: torch.Tensor, repeats: int) -> list[dict]:
    """GPU time of ``sample_rows`` alone per (BLOCK, num_warps): the launch rule's evidence."""
    from trident.engine.kernels.sampling import sample_rows
    rows = logits.shape[0]
    keys = torch.stack([torch.full((rows,), 5), torch.zeros(rows, dtype=torch.long), torch.arange(rows) + 1,
                        torch.full((rows,), 7)], 1).to(logits.device)
    print(f"\nkernel alone, us ({rows} x {logits.shape[1]}):")
    print(f"{'BLOCK, warps':14s}" + "".join(f"{name:>30s}" for name in SWEEP_PARAMS))
    out = []
    for block, warps in SWEEP_TILES:
        cells = []
        for name, values in SWEEP_PARAMS.items():
            params = torch.tensor([values] * rows, dtype=torch.float32, device=logits.device)
            us = _median_ms(lambda: sample_rows(logits, params, keys, block=block, num_warps=warps), repeats) * 1e3
            cells.append(us)
            out.append(dict(block=block, num_warps=warps, case=name, kernel_us=us))
        print(f"{block:6d}, {warps:<6d}" + "".join(f"{us:30.1f}" for us in cells))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--vocab", type=int, default=49152, help="49152: SmolLM2; 50257: GPT-2; 128256: Llama 3")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--kernel-sweep", action="store_true",
                   help="also the kernel alone (inputs built beforehand) over tile sizes and warps")
    args = p.parse_args()
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  rows {args.rows}  vocab {args.vocab}")
    # Logits of a trained model's spread (a few tokens well ahead), not flat random ones.
    g = torch.Generator(device).manual_seed(0)
    logits = torch.randn(args.rows, args.vocab, device=device, generator=g) * 2.0
    logits[:, :8] += 8.0
    gbs = measured_copy_bandwidth(device) / 1e9   # read + write
    one_pass_ms = logits.numel() * 4 / (gbs / 2 * 1e9) * 1e3
    print(f"device copy {gbs:.0f} GB/s: one read of the logits = {one_pass_ms:.3f} ms\n")
    print(f"{'case':32s} {'sampler ms':>11s} {'sort-based ms':>14s} {'speed-up':>9s} {'host ms':>8s}")
    sampler, rows = Sampler(seed=0), []
    for name, values in CASES.items():
        params = SamplingParams(max_tokens=64, **values)
        seqs = [Sequence(i, [1, 2, 3], params) for i in range(args.rows)]
        ours = _median_ms(lambda: sampler.sample(logits, seqs), args.repeats)
        t = time.perf_counter()
        for _ in range(args.repeats):
            sampler.sample(logits, seqs)
        host_ms = (time.perf_counter() - t) / args.repeats * 1e3   # queueing only: nothing waits
        torch.cuda.synchronize()
        theirs = _median_ms(lambda: sort_based(logits, [params] * args.rows, g), args.repeats)
        print(f"{name:32s} {ours:11.3f} {theirs:14.3f} {theirs / ours:8.1f}x {host_ms:8.3f}")
        rows.append(dict(case=name, sampler_ms=ours, sort_based_ms=theirs, host_ms=host_ms))
    sweep = kernel_sweep(logits, args.repeats) if args.kernel_sweep else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), rows=args.rows, vocab=args.vocab,
                           copy_gb_s=gbs, results=rows, kernel_sweep=sweep), f, indent=1)


if __name__ == "__main__":
    main()
