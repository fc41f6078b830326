"""Our engine vs Hugging Face ``generate`` on this CPU, in one run (vLLM benchmark style).

    python loadtest/bench_engine_cpu.py [--model DIR] [--num-requests 32] [--input-len 64]
                                        [--output-len 64] [--threads 1] [--hf-requests K]
    python loadtest/bench_engine_cpu.py --host [--num-requests 256] [--output-len-min 16] [--arrivals-per-step 4]
                                        [--cprofile 25]

N requests of random-token prompts (fixed lengths, EOS ignored, greedy) go to the engine all at
once (twice: before and after the peer); the peer is ``generate`` run request by request on the same weights, in the same process,
with the same torch threads. Prints output tok/s for each, the ratio, and the engine's TTFT and
TPOT percentiles; writes the figures as JSON under loadtest/results/.

``--host`` measures the engine's own host time instead: a tiny random Llama whose forward is taken
out (the runner still packs each step's inputs as on the GPU: decode steps into the CUDA-graph
buffers, others through ``prepare``; random tokens come back at once), N concurrent requests, the
host microseconds per output token of the whole step (scheduling, staging, append, stop checks,
detokenization, outputs) and of its phases, for each output kind, and optionally a cProfile.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "backends")]

from trident.engine.config import EngineConfig  # noqa: E402
from trident.engine.engine import LLMEngine  # noqa: E402
from trident.engine.sampling_params import SamplingParams  # noqa: E402

DEFAULT_MODEL = REPO_ROOT / "model_repository" / "gpt" / "1" / "artifacts" / "smollm2-135m-instruct"
RESULTS_DIR = REPO_ROOT / "loadtest" / "results"


def random_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(length)] for _ in range(num)]


def bench_engine(model: Path, prompts: list[list[int]], output_len: int) -> dict:
    config = EngineConfig(model=str(model), device="cpu", dtype="float32", max_model_len=256,
                          max_num_seqs=len(prompts), max_num_batched_tokens=2048)
    engine = LLMEngine(config)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    engine.generate([prompts[0][:8]], SamplingParams(temperature=0.0, max_tokens=2))   # warm-up
    t0 = time.perf_counter()
    outputs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    num_tokens = sum(len(o.output_token_ids) for o in outputs)
    ttft = [o.timings.time_to_first_token for o in outputs]
    tpot = [(o.timings.finished - o.timings.first_token) / (len(o.output_token_ids) - 1) for o in outputs]
    return {"seconds": elapsed, "output_tokens": num_tokens, "tok_per_s": num_tokens / elapsed,
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
            "tpot_p50_s": _pct(tpot, 50), "tpot_p99_s": _pct(tpot, 99),
            "first_output": outputs[0].output_token_ids}


def bench_hf(model: Path, prompts: list[list[int]], output_len: int) -> dict:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    _hf_generate(hf, prompts[0][:8], 2)   # warm-up
    t0 = time.perf_counter()
    outputs = [_hf_generate(hf, prompt, output_len) for prompt in prompts]
    elapsed = time.perf_counter() - t0
    num_tokens = sum(len(o) for o in outputs)
    return {"seconds": elapsed, "output_tokens": num_tokens, "tok_per_s": num_tokens / elapsed,
            "first_output": outputs[0]}


@torch.inference_mode()
def _hf_generate(model, prompt: list[int], output_len: int) -> list[int]:
    input_ids = torch.tensor([prompt])
    # min_new_tokens = max_new_tokens: the peer also ignores EOS.
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=output_len, min_new_tokens=output_len)
    return out[0, len(prompt):].tolist()


def _report(name: str, run: dict, note: str = "") -> None:
    line = f"[bench] {name:<15}: {run['tok_per_s']:8.1f} output tok/s ({run['output_tokens']} tokens in {run['seconds']:.1f} s"
    if "ttft_p50_s" in run:
        line += (f"; TTFT p50 {run['ttft_p50_s']:.2f} s p99 {run['ttft_p99_s']:.2f} s; "
                 f"TPOT p50 {run['tpot_p50_s'] * 1e3:.0f} ms p99 {run['tpot_p99_s'] * 1e3:.0f} ms")
    print(line + (f"; {note})" if note else ")"), flush=True)


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def bench_host(num_requests: int, input_len: int, output_len: int, output_kind: str | None,
               cprofile_top: int = 0, detokenize: bool = True, output_len_min: int | None = None,
               arrivals_per_step: int = 0) -> dict:
    """Engine host microseconds per output token, with the model taken out: the runner's forward
    packs its inputs as on the GPU (a decode step stages the CUDA-graph buffers, anything else runs
    ``prepare``) and returns random tokens at once, so every other line of the step is timed.
    ``output_len_min``: each request's output length is drawn from [output_len_min, output_len], so
    rows end at different steps (as EOS would end them) instead of all in the last ones.
    ``arrivals_per_step``: requests arrive that many per step (online serving) instead of all at
    once; the result says how many steps were launched ahead of the previous one's tokens."""
    import cProfile
    import pstats
    import tempfile

    from trident.models.testing import save_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_llama(Path(tmp) / "tiny-llama", max_position_embeddings=input_len + output_len + 16)
        config = EngineConfig(model=str(model), device="cpu", dtype="float32",
                              max_model_len=input_len + output_len + 16, max_num_seqs=num_requests,
                              max_num_batched_tokens=16384, enable_prefix_caching=False)  # bench_gpt's budget
        engine = LLMEngine(config)
    kind = {} if output_kind is None else {"output_kind": output_kind}
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=detokenize, **kind)
    phases = _host_only_forward(engine)
    for name in ("_launch_ahead", "_resolve", "_postprocess"):
        _time_calls(engine, (name,), phases, name.strip("_"))
    prompts = random_prompts(num_requests, input_len, engine.runner.vocab_size, seed=0)
    rng = random.Random(1)
    lengths = [output_len if output_len_min is None else rng.randint(output_len_min, output_len) for _ in prompts]
    profiler = cProfile.Profile() if cprofile_top else None
    pending = [(str(i), prompt, dataclasses.replace(params, max_tokens=length))
               for i, (prompt, length) in enumerate(zip(prompts, lengths))][::-1]
    for _ in range(len(pending) if not arrivals_per_step else 0):
        engine.add_request(*pending.pop())
    steps = 0
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    while pending or engine.has_unfinished():
        for _ in range(min(arrivals_per_step, len(pending))):
            engine.add_request(*pending.pop())
        engine.step()
        steps += 1
    if profiler:
        profiler.disable()
    elapsed = time.perf_counter() - t0
    num_tokens = engine.generation_tokens_total
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(cprofile_top)
    staged_rows = phases.pop("_staged_rows")
    return {"output_kind": (output_kind or "cumulative") + ("" if detokenize else " ids"), "num_requests": num_requests, "output_tokens": num_tokens,
            "steps": steps, "launched_ahead": engine.num_launched_ahead,
            "seconds": elapsed, "host_us_per_token": elapsed / num_tokens * 1e6,
            "phase_us_per_token": {k: v / num_tokens * 1e6 for k, v in phases.items()},
            "stage_us_per_row": phases["decode staging"] / max(staged_rows, 1) * 1e6}


def _host_only_forward(engine) -> dict[str, float]:
    """Replace the model: ``runner.forward`` packs the step's inputs as the GPU path does (decode
    steps into ``DecodeBuffers``, what a CUDA-graph replay stages; others through ``prepare``) and
    returns random token ids. Returns the seconds spent packing, by kind, filled as steps run."""
    from trident.engine.cuda_graph import DecodeBuffers, decode_buckets
    from trident.engine.model_runner import StepLogits, is_decode_step

    runner, config = engine.runner, engine.config
    buckets = decode_buckets(config.max_num_seqs)
    buffers = DecodeBuffers(buckets[-1], -(-runner.max_model_len // config.block_size), torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    phases = {"decode staging": 0.0, "prepare": 0.0, "_staged_rows": 0}

    def forward(seqs, num_new_tokens, inputs_from=None):
        t = time.perf_counter()
        if is_decode_step(seqs, num_new_tokens, inputs_from):   # what a CUDA graph would replay
            bucket = next(b for b in buckets if b >= len(seqs))
            buffers.stage(seqs, bucket, config.block_size, None if inputs_from is None else inputs_from.rows)
            phases["decode staging"] += time.perf_counter() - t
            phases["_staged_rows"] += len(seqs)
            num_sampled = len(seqs)
        else:
            batch = runner.prepare(seqs, num_new_tokens)
            phases["prepare"] += time.perf_counter() - t
            num_sampled = batch.sample_rows.shape[0]
        token_ids = torch.randint(runner.vocab_size, (num_sampled,), generator=generator)  # [num_sampled]
        return StepLogits(logits=None, token_ids=token_ids)
    runner.forward = forward
    return phases


def _time_calls(owner, names: tuple[str, ...], totals: dict[str, float], key: str) -> None:
    """Accumulate the wall time of ``owner``'s methods ``names`` into ``totals[key]``."""
    totals.setdefault(key, 0.0)
    for name in names:
        inner = getattr(owner, name)

        def timed(*args, _inner=inner, **kwargs):
            t = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                totals[key] += time.perf_counter() - t
        setattr(owner, name, timed)


def main_host(args: argparse.Namespace) -> list[dict]:
    results = []
    # DELTA without detokenization is what the Triton model asks of the engine for a stream.
    for kind, detokenize in ((None, True), ("delta", True), ("delta", False), ("final_only", True)):
        run = bench_host(args.num_requests, args.input_len, args.output_len, kind, args.cprofile, detokenize,
                         args.output_len_min, args.arrivals_per_step)
        results.append(run)
        phases = ", ".join(f"{k} {v:.2f}" for k, v in run["phase_us_per_token"].items())
        print(f"[host] {run['output_kind']:<13}: {run['host_us_per_token']:6.2f} us/token host "
              f"({run['output_tokens']} tokens, {run['steps']} steps, {run['launched_ahead']} launched ahead, "
              f"{run['seconds']:.2f} s; "
              f"decode staging {run['stage_us_per_row']:.2f} us/row); per token: {phases}", flush=True)
    return results


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(argv)
    if args.host:
        torch.set_num_threads(1)
        return {"host": main_host(args)}
    if args.threads:
        torch.set_num_threads(args.threads)
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise SystemExit(f"no model at {model}: run `python -m build.gpt_convert` first")
    vocab_size = json.loads((model / "config.json").read_text())["vocab_size"]
    prompts = random_prompts(args.num_requests, args.input_len, vocab_size, args.seed)
    print(f"[bench] {args.num_requests} requests x ({args.input_len} in, {args.output_len} out), greedy, "
          f"ignore_eos; torch threads {torch.get_num_threads()}; model {model.name}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)

    # The engine runs before and after the peer, so a neighbour's load on shared cores weighs on
    # both sides alike; its figure is the mean of the two runs.
    runs = [bench_engine(model, prompts, args.output_len)]
    _report("trident engine", runs[0])
    hf_prompts = prompts[:args.hf_requests or len(prompts)]
    hf = bench_hf(model, hf_prompts, args.output_len)
    _report("HF generate", hf, f"{len(hf_prompts)} requests one by one")
    runs.append(bench_engine(model, prompts, args.output_len))
    _report("trident engine", runs[1])
    engine_tok_per_s = statistics.mean(run["tok_per_s"] for run in runs)
    ratio = engine_tok_per_s / hf["tok_per_s"]
    same = runs[0]["first_output"] == hf["first_output"]
    print(f"[bench] engine mean    : {engine_tok_per_s:8.1f} output tok/s")
    print(f"[bench] ratio          : {ratio:8.2f}x  (target >= 4x); request 0 token-identical: {same}; "
          f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    result = {"args": vars(args), "torch_threads": torch.get_num_threads(), "engine_runs": runs,
              "engine_tok_per_s": engine_tok_per_s, "hf": hf, "ratio": ratio, "request0_identical": same}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"bench_engine_cpu_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[bench] wrote {path.relative_to(REPO_ROOT)}")
    return result


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="Hugging Face model directory")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    # One thread by default: on shared cores, OpenMP threads that wait on each other collapse
    # (measured here: both sides 5-6x slower at 2 threads under a neighbour's load).
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice)")
    parser.add_argument("--hf-requests", type=int, default=0,
                        help="run the peer on only the first K requests (its tok/s does not depend on K)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host", action="store_true",
                        help="host us/token of the engine itself (tiny random model, forward subtracted)")
    parser.add_argument("--cprofile", type=int, default=0, help="with --host: print the top N functions")
    parser.add_argument("--output-len-min", type=int, default=None,
                        help="with --host: output lengths uniform in [this, --output-len], so rows end apart")
    parser.add_argument("--arrivals-per-step", type=int, default=0,
                        help="with --host: requests arrive this many per step instead of all at once")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
