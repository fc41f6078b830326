"""Where BERT-base's batch-1 latency goes on the GPU: Triton serving variants, then in-process steps.

    # GPU machine (carry .gpu), from the checkout root:
    source .gpu/env.sh && PYTHONPATH=backends:. /opt/torch/.venv/bin/python3 loadtest/profile_bert_latency.py

Through Triton first: the same model served several ways in one server (instance count and kind,
queue delay), each with batch-1 p50 / p99 over ``--latency-calls`` sequential one-text gRPC calls,
Triton's server-side split and the stub's execute() phases, beside `floor` models that answer zeros
at once; ``--throughput`` variants also run bench_bert's closed-loop throughput test.

Then in-process (BERT-base shape, random weights, fp16, CUDA graphs, texts of exactly 128 tokens): one
text's tokenization (the tokenizer file as shipped vs trident's TextTokenizer), the runtime's steps
(pack, host-to-device copies, graph replay, device-to-host copy) and the whole ``encode``, each
"hot" (back to back, as a benchmark loop runs them) and "cold" (after a ``--gap-ms`` pause, as a
Triton stub runs them between a user's sequential calls: caches and clocks cool down).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "loadtest"), str(ROOT / "backends")]
import bench_bert  # noqa: E402

# name -> (instances, kind, max queue delay us)
VARIANTS = {"g4_d100": (4, "GPU", 100), "g4_d0": (4, "GPU", 0), "g2_d0": (2, "GPU", 0), "g1_d0": (1, "GPU", 0),
            "c4_d0": (4, "CPU", 0)}
FLOORS = {"floor_c1_d100": (1, "CPU", 100), "floor_c1_d0": (1, "CPU", 0), "floor_g4_d0": (4, "GPU", 0)}


def timed(fn, items, gap_s: float) -> np.ndarray:
    """Microseconds of ``fn(item)`` per item, after ``gap_s`` of sleep before each (0: back to back)."""
    times = []
    for item in items:
        if gap_s:
            time.sleep(gap_s)
        start = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - start)
    return np.array(times[len(times) // 10:]) * 1e6


def report(label: str, fn, items, gap_s: float) -> None:
    try:
        hot, cold = timed(fn, items, 0.0), timed(fn, items, gap_s)
    except Exception as e:  # one broken measurement must not hide the others
        print(f"  {label:48s} FAILED: {type(e).__name__}: {e}", flush=True)
        return
    print(f"  {label:48s} hot p50 {np.median(hot):7.1f} us   cold p50 {np.median(cold):7.1f} us "
          f"p99 {np.percentile(cold, 99):7.1f}", flush=True)


@torch.inference_mode()  # the runtime's graph buffers are inference tensors
def inprocess(artifacts: Path, texts: list[str], args) -> None:
    from tokenizers import Tokenizer

    from trident.bert.encoder import BertEncoder
    from trident.bert.torch_runtime import pack

    gap = args.gap_ms / 1e3
    singles = texts[:args.num_singles]
    shipped = Tokenizer.from_file(str(artifacts / "tokenizer.json"))
    shipped.no_padding()
    shipped.enable_truncation(max_length=128)
    encoder = BertEncoder.from_artifacts(artifacts, precision="fp16", runtime="torch", device="cuda", max_length=128)
    ours = encoder._tokenizer
    print(f"in-process, one text of 128 tokens ({len(singles)} calls, cold = after {args.gap_ms} ms idle):")
    report("tokenize: shipped tokenizer, encode_batch_fast([t])", lambda t: shipped.encode_batch_fast([t]), singles, gap)
    report("tokenize: shipped tokenizer, encode(t)", lambda t: shipped.encode(t), singles, gap)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    report("tokenize: shipped, encode_batch_fast, no rayon", lambda t: shipped.encode_batch_fast([t]), singles, gap)
    del os.environ["TOKENIZERS_PARALLELISM"]
    report("tokenize: TextTokenizer.encode([t]) (ASCII path)", lambda t: ours.encode([t]), singles, gap)
    runtime = encoder._runtime
    encodings = [ours.encode([t])[0] for t in singles]
    sequences = [[(e.ids, e.type_ids)] for e in encodings]
    for seqs in sequences[:3]:
        runtime.run(seqs)
    graph = runtime._graphs[(1, 128)]
    report("runtime.run (pack, copies, replay, D2H)", runtime.run, sequences, gap)
    report("  pack", lambda s: pack(s, 128, 1), sequences, gap)
    rows, cu = pack(sequences[0], 128, 1)

    def copies(_):
        graph.rows.copy_(torch.from_numpy(rows), non_blocking=True)
        graph.cu_seqlens.copy_(torch.from_numpy(cu), non_blocking=True)
        torch.cuda.current_stream().synchronize()

    report("  H2D copies (pageable, then synchronize)", copies, sequences, gap)
    pinned = torch.empty(4 * 128 + 4, dtype=torch.int64, pin_memory=True)

    def pinned_copy(_):
        pinned[:4 * 128].numpy()[:] = rows.reshape(-1)
        graph.rows.view(-1).copy_(pinned[:4 * 128], non_blocking=True)
        torch.cuda.current_stream().synchronize()

    report("  H2D copy (one pinned buffer, then synchronize)", pinned_copy, sequences, gap)

    def replay(_):
        graph.graph.replay()
        torch.cuda.current_stream().synchronize()

    report("  graph replay + synchronize", replay, sequences, gap)
    out_pinned = torch.empty(graph.out[:1].shape, dtype=graph.out.dtype, pin_memory=True)

    def d2h(_):
        graph.out[:1].cpu()

    def d2h_pinned(_):
        out_pinned.copy_(graph.out[:1], non_blocking=True)
        torch.cuda.current_stream().synchronize()

    report("  D2H .cpu() (pageable)", d2h, sequences, gap)
    report("  D2H into pinned + synchronize", d2h_pinned, sequences, gap)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(100):
        graph.graph.replay()
    end.record()
    end.synchronize()
    print(f"  graph replay, GPU time back to back: {start.elapsed_time(end) * 10:.1f} us", flush=True)
    report("encoder.encode([t]) (all of the above)", lambda t: encoder.encode([t]), singles, gap)
    del encoder, runtime, graph
    torch.cuda.empty_cache()


def write_variants(repository: Path, artifacts: Path, args) -> None:
    from build.bert_gpu import GpuModelOptions, write_gpu_model

    for name, (count, kind, delay) in VARIANTS.items():
        options = GpuModelOptions(name=name, precision="fp16", num_instances=count, max_queue_delay_us=delay)
        model_dir = write_gpu_model(repository, artifacts, options)
        config = (model_dir / "config.pbtxt").read_text()
        if kind == "CPU":  # the model still runs on cuda:0 (device parameter "cuda")
            config = config.replace("kind: KIND_GPU, gpus: [ 0 ]", "kind: KIND_CPU")
        if args.smoke:  # a CPU check of this script: ONNX Runtime instead of torch on CUDA
            config = config.replace('"torch"', '"onnxruntime"').replace('"cuda"', '"cpu"')
            config = config.replace('"fp16"', '"fp32"').replace("KIND_GPU, gpus: [ 0 ]", "KIND_CPU")
        (model_dir / "config.pbtxt").write_text(config)
    for name, (count, kind, delay) in FLOORS.items():
        (repository / name / "1").mkdir(parents=True)
        config = bench_bert.FLOOR_CONFIG.replace('"floor"', f'"{name}"') % (128, delay)
        group = "KIND_GPU, gpus: [ 0 ]" if kind == "GPU" and not args.smoke else "KIND_CPU"
        config = config.replace("count: 1, kind: KIND_CPU", f"count: {count}, kind: {group}")
        (repository / name / "config.pbtxt").write_text(config)
        (repository / name / "1" / "model.py").write_text(bench_bert.FLOOR_MODEL)


def through_triton(artifacts: Path, texts_file: Path, work: Path, args) -> list[dict]:
    from triton_server import TritonServer, run_text_clients

    write_variants(work / "repository", artifacts, args)
    phases_dir = work / "phases"
    os.environ[bench_bert.BERT_PHASES_ENV] = str(phases_dir)
    started = time.perf_counter()
    server = TritonServer(work / "repository", work, extra=[bench_bert.RATE_LIMIT] if args.rate_limit else [])
    print(f"triton: {len(VARIANTS) + len(FLOORS)} models ready in {time.perf_counter() - started:.0f} s", flush=True)
    rows = []
    try:
        for name in list(FLOORS) + list(VARIANTS):
            row = {"name": name}
            if name in args.throughput:
                run_text_clients(server.grpc_url, name, "embedding", texts_file, num_clients=1,
                                 num_threads=2 * VARIANTS[name][0], sizes=[1 << i for i in range(8)])
                before = bench_bert.model_counters(server.metrics, name)
                records, errors = run_text_clients(server.grpc_url, name, "embedding", texts_file,
                                                   num_clients=args.num_clients, num_threads=args.client_threads,
                                                   max_texts=16, duration_s=args.warmup_s + args.measure_s)
                after = bench_bert.model_counters(server.metrics, name)
                start = min(sent for sent, _, _ in records) + args.warmup_s
                row["seq_per_s"] = bench_bert.triton_throughput(records, start, args.measure_s)
                row["mean_batch"] = (after["nv_inference_count"] - before["nv_inference_count"]) / max(
                    after["nv_inference_exec_count"] - before["nv_inference_exec_count"], 1.0)
                row["throughput_errors"] = len(errors)
            latency = bench_bert.batch1_latency(server, name, texts_file, args)
            row.update({k: v for k, v in latency.items() if k != "errors"}, latency_errors=len(latency["errors"]))
            rows.append(row)
            print(f"{name:14s} batch-1 p50 {row['p50_ms']:.3f} p99 {row['p99_ms']:.3f} ms  server "
                  f"{row['server_ms']:.3f} (queue {row['queue_ms']:.3f}, execute {row['execute_ms']:.3f}, output "
                  f"{row['output_ms']:.3f})" + (f"   throughput {row['seq_per_s']:.0f} seq/s, mean batch "
                                                f"{row['mean_batch']:.1f}" if "seq_per_s" in row else ""), flush=True)
    finally:
        server.stop()
        os.environ.pop(bench_bert.BERT_PHASES_ENV, None)
    for row in rows:
        if row["name"] in VARIANTS:
            row["phases_ms"] = bench_bert.stub_phases_ms(phases_dir, row["name"], row["window"])
            phases = row["phases_ms"]
            print(f"{row['name']:14s} execute() phases (median ms over {phases.get('num_executes', 0)}): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in phases.items() if k != "num_executes")
                  + f"; execute (mean) outside them {row['execute_ms'] - phases.get('total_mean', float('nan')):.3f}",
                  flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-singles", type=int, default=300, help="in-process calls per measurement")
    p.add_argument("--gap-ms", type=float, default=2.0, help="idle time before each 'cold' call")
    p.add_argument("--latency-calls", type=int, default=1000)
    p.add_argument("--latency-warmup", type=int, default=100)
    p.add_argument("--throughput", nargs="*", default=["g4_d100", "g4_d0", "g2_d0", "c4_d0"])
    p.add_argument("--num-clients", type=int, default=8)
    p.add_argument("--client-threads", type=int, default=6)
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--measure-s", type=float, default=4.0)
    p.add_argument("--cases", nargs="+", default=["inprocess", "triton"], choices=["inprocess", "triton"])
    p.add_argument("--rate-limit", action="store_true",
                   help=f"serve with {bench_bert.RATE_LIMIT}: build/bert_gpu.py's preferred instance takes sequential "
                        "calls (default: the instances take turns)")
    p.add_argument("--smoke", action="store_true", help="CPU check: tiny ONNX model, few calls, no in-process part")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "loadtest" / "results")))
    args = p.parse_args(argv)
    if args.smoke:
        args.cases, args.latency_calls, args.latency_warmup, args.throughput = ["triton"], 30, 5, ["g4_d0"]
        args.num_clients, args.client_threads, args.warmup_s, args.measure_s = 2, 2, 1.0, 1.0
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="profile_bert_latency_"))
    artifacts = bench_bert.bench_artifacts("bert-base", work, smoke=args.smoke)
    texts = bench_bert.texts_of_length(artifacts / "tokenizer.json", 128, 1536, seed=0)
    texts_file = work / "texts.json"
    texts_file.write_text(json.dumps(texts))
    rows = through_triton(artifacts, texts_file, work, args) if "triton" in args.cases else []
    if "inprocess" in args.cases:
        inprocess(artifacts, texts, args)
    (args.out / "profile_bert_latency.json").write_text(json.dumps(
        {"machine": bench_bert.machine(), "command": " ".join(sys.argv), "variants": VARIANTS, "floors": FLOORS,
         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
