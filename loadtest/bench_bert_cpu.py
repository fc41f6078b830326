"""INT8 ONNX Runtime (our BertEncoder) vs FP32 PyTorch Hugging Face, sentence embeddings on this CPU.

    python loadtest/bench_bert_cpu.py [--batch-size 32] [--iterations 5] [--threads N]
                                      [--num-sentences 256] [--max-length 128]

Both sides get the same held-out English sentences (build/text.py), the same batch size, the same
truncation length and the same thread count, in one process, after a warm-up, taking turns so that load from other processes hits all alike. Each side's time
includes tokenization and pooling (HF: AutoTokenizer + BertModel + mean pooling + L2 normalisation;
ours: BertEncoder.encode). FP32 through our ONNX Runtime path is shown too, to separate the gain
from INT8 from the gain from the runtime. Prints sentences/s, the ratio, and batch-1 latency p50.
Needs the default build (python -m build.bert).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "backends")]

from build.bert import DEFAULT_OUT  # noqa: E402
from build.text import held_out_texts  # noqa: E402
from trident.bert.encoder import BertEncoder  # noqa: E402

RESULTS_DIR = REPO_ROOT / "loadtest" / "results"
Encode = Callable[[list[str]], np.ndarray]


def hf_encoder(checkpoint: Path, max_length: int) -> Encode:
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(checkpoint), AutoModel.from_pretrained(checkpoint).eval()

    def encode(texts: list[str]) -> np.ndarray:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state                            # [batch, seq, hidden]
        mask = batch["attention_mask"].unsqueeze(-1).float()                     # [batch, seq, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)           # [batch, hidden]
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()

    return encode


def our_encoder(artifacts: Path, precision: str, max_length: int, threads: int) -> Encode:
    encoder = BertEncoder.from_artifacts(artifacts, precision=precision, max_length=max_length, num_threads=threads)
    return lambda texts: encoder.encode(texts)["embedding"]


def throughput(sides: dict[str, Encode], texts: list[str], batch_size: int, iterations: int) -> dict[str, float]:
    """Best sentences/s of each side over ``iterations`` passes.

    The sides take turns pass by pass, and the best pass counts: other processes share this CPU,
    and interleaving gives every side the same chance at a quiet moment.
    """
    batches = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
    for encode in sides.values():
        encode(batches[0])  # warm-up: first-run allocations and ORT/torch lazy initialisation
    best = dict.fromkeys(sides, float("inf"))
    for _ in range(iterations):
        for name, encode in sides.items():
            started = time.perf_counter()
            for batch in batches:
                encode(batch)
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: len(texts) / seconds for name, seconds in best.items()}


def latency_ms(sides: dict[str, Encode], texts: list[str]) -> dict[str, list[float]]:
    """Batch-1 latency of each side, text by text, the sides again taking turns."""
    samples: dict[str, list[float]] = {name: [] for name in sides}
    for text in texts:
        for name, encode in sides.items():
            started = time.perf_counter()
            encode([text])
            samples[name].append((time.perf_counter() - started) * 1e3)
    return samples


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    manifest = json.loads((args.artifacts / "manifest.json").read_text())
    texts = held_out_texts(args.num_sentences)
    sides = {
        "HF PyTorch FP32": hf_encoder(Path(manifest["source"]["path"]), args.max_length),
        "ORT FP32 (ours)": our_encoder(args.artifacts, "fp32", args.max_length, args.threads),
        "ORT INT8 (ours)": our_encoder(args.artifacts, "int8", args.max_length, args.threads),
    }
    agreement = float((sides["ORT INT8 (ours)"](texts) * sides["HF PyTorch FP32"](texts)).sum(-1).mean())
    print(f"{manifest['name']}: {len(texts)} sentences, batch {args.batch_size}, max_length {args.max_length}, "
          f"{args.threads} threads, best of {args.iterations}; mean cosine INT8 vs HF {agreement:.4f}")
    rates = throughput(sides, texts, args.batch_size, args.iterations)
    latencies = latency_ms(sides, texts[:args.latency_samples])
    results = {}
    for name in sides:
        p50 = statistics.median(latencies[name])
        results[name] = {"sentences_per_s": rates[name], "batch1_p50_ms": p50}
        print(f"  {name:<16} {rates[name]:8.1f} sentences/s   batch-1 p50 {p50:6.2f} ms", flush=True)
    ratio = results["ORT INT8 (ours)"]["sentences_per_s"] / results["HF PyTorch FP32"]["sentences_per_s"]
    print(f"  INT8 ORT / FP32 PyTorch throughput: {ratio:.2f}x")
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results, "ratio": ratio,
               "mean_cosine_int8_vs_hf": agreement, "cpu_count": os.cpu_count()}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "bench_bert_cpu.json").write_text(json.dumps(summary, indent=2))
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--num-sentences", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--latency-samples", type=int, default=64)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
