#!/usr/bin/env python3
"""GPT throughput, vLLM style: random token prompts, fixed input/output lengths, EOS ignored, every
request sent at once. Peers run in the same process, on the same random weights of the real shape:

* ``hf_static``   Hugging Face ``generate``, static batches of ``--hf-batch``;
* ``hf_cb``       Hugging Face ``generate_batch`` (continuous batching, ``paged|sdpa``, default config);
* ``engine``      our ``LLMEngine`` in-process (CUDA graphs for decode);
* ``triton``      our engine behind Triton (``gpt`` model, gRPC ``stream_infer``), non-streaming and
                  streaming, from several client processes so that the client is not the bottleneck.

Prints output tok/s, TTFT and TPOT p50/p99 and the fraction of the decode roofline; writes JSON
(``--out``) for ``docs/benchmarks.md`` and its plots (``--plot results.json``).

    # GPU machine, from the checkout root. `.gpu/env.sh` puts Triton and a python3 with tritonclient
    # on PATH (server and clients use it); the benchmark runs under the machine's own interpreter:
    source .gpu/env.sh && PYTHONPATH=backends:. /opt/torch/.venv/bin/python3 loadtest/bench_gpt.py --out results.json
    # CPU, tiny shapes, every system, to check the script itself:
    PYTHONPATH=backends:. python loadtest/bench_gpt.py --smoke
    # plots from a results file
    python loadtest/bench_gpt.py --plot results.json --img-dir docs/img
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "backends"))

sys.path.insert(0, str(REPO_ROOT / "loadtest"))

from triton_server import TritonServer, site_dir, triton_python  # noqa: E402
from trident.phase_log import GPT_PHASES_ENV, read_records  # noqa: E402

HBM_BYTES_PER_S = 3.35e12   # H100 SXM datasheet (reference.md); 3.03e12 measured copy

# Real shapes (random weights: values do not change speed). SmolLM2-135M and GPT-2 124M.
SHAPES = {
    "smollm2-135m": dict(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "gpt2-124m": dict(arch="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                      bos_token_id=50256, eos_token_id=50256),
    # --smoke: the same code paths on the CPU in seconds
    "tiny-llama": dict(arch="llama", vocab_size=49152, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2),
}
TOKENIZER_FOR = {"smollm2-135m": "smollm2", "gpt2-124m": "gpt2", "tiny-llama": "smollm2"}


@dataclass(frozen=True)
class Case:
    shape: str
    input_len: int
    output_len: int
    num_requests: int

    @property
    def name(self) -> str:
        return f"{self.shape} {self.input_len}/{self.output_len} x{self.num_requests}"


@dataclass
class Result:
    """One system on one case."""
    system: str
    case: str
    num_requests: int
    output_tokens: int
    elapsed_s: float
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.elapsed_s if self.elapsed_s else 0.0

    def summary(self) -> dict:
        return {"system": self.system, "case": self.case, "num_requests": self.num_requests,
                "output_tokens": self.output_tokens, "elapsed_s": round(self.elapsed_s, 3),
                "output_tok_s": round(self.output_tok_s, 1),
                "ttft_p50_ms": _ms(_pct(self.ttft_s, 50)), "ttft_p99_ms": _ms(_pct(self.ttft_s, 99)),
                "tpot_p50_ms": _ms(_pct(self.tpot_s, 50)), "tpot_p99_ms": _ms(_pct(self.tpot_s, 99)),
                **self.notes}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


# -- model directories ---------------------------------------------------------------------------
def make_model_dir(shape: str, path: Path, tokenizer_dir: Path | None, dtype: torch.dtype) -> Path:
    """config.json + random safetensors of ``shape`` (+ the tokenizer files) at ``path``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from trident.models.testing import save_byte_tokenizer

    values = dict(SHAPES[shape])
    arch = values.pop("arch")
    config = LlamaConfig(**values) if arch == "llama" else GPT2Config(**values)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = (LlamaForCausalLM if arch == "llama" else GPT2LMHeadModel)(config).to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            if f.is_file() and ("token" in f.name or f.name in ("vocab.json", "merges.txt")):
                shutil.copy(f, path / f.name)
    else:
        save_byte_tokenizer(path)
    return path


def make_kv8_dir(model_dir: Path, path: Path) -> Path:
    """``model_dir`` as a built W8A16 directory whose int8 KV cache scales are stand-ins (the
    weights are random: speed is what is measured, and it does not depend on the scales' values).
    Real scales come from ``build.gpt_int8 --kv-cache-dtype int8``, gated on perplexity."""
    from trident.models.loader import load_model
    from trident.models.quant import QuantManifest, attention_modules, save_quantized, set_kv_cache_scales

    model = load_model(model_dir, torch.device("cpu"), torch.float32, quantization="int8_weight_only")
    num_kv_heads = attention_modules(model)[0].num_kv_heads
    set_kv_cache_scales(model, torch.full((len(attention_modules(model)), 2, num_kv_heads), 0.05))
    path.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():   # config, generation config, tokenizer files
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, path / f.name)
    save_quantized(model, path, QuantManifest(quantization="int8_weight_only", has_kv_cache_scales=True,
                                              source_model=str(model_dir)))
    return path


def random_prompts(case: Case, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the first ids: special tokens live there in both vocabularies.
    return [[rng.randrange(256, vocab_size) for _ in range(case.input_len)] for _ in range(case.num_requests)]


def decode_roofline(model_dir: Path, case: Case, batch: int, dtype: torch.dtype) -> dict:
    """Decode-step bytes (weights incl. LM head + batch x mean context x KV bytes/token) / HBM."""
    config = json.loads((model_dir / "config.json").read_text())
    element = torch.tensor([], dtype=dtype).element_size()
    layers = config.get("num_hidden_layers") or config["n_layer"]
    heads = config.get("num_attention_heads") or config["n_head"]
    kv_heads = config.get("num_key_value_heads") or heads
    hidden = config.get("hidden_size") or config["n_embd"]
    head_dim = hidden // heads
    # A tied embedding counts once: as the LM head, read whole every step (the lookup reads a few rows).
    weight_bytes = sum(math.prod(shape) for shape in _safetensors_shapes(model_dir)) * element
    kv_per_token = 2 * layers * kv_heads * head_dim * element
    batch = min(batch, case.num_requests)
    context = case.input_len + case.output_len / 2
    step_bytes = weight_bytes + batch * context * kv_per_token
    step_s = step_bytes / HBM_BYTES_PER_S
    return {"batch": batch, "mean_context": context, "weight_bytes": weight_bytes,
            "kv_bytes_per_token": kv_per_token, "step_bytes": step_bytes, "step_ms": step_s * 1e3,
            "roofline_tok_s": batch / step_s}


def _safetensors_shapes(model_dir: Path):
    from safetensors import safe_open

    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as handle:
            for name in handle.keys():
                yield handle.get_slice(name).get_shape()


# -- Hugging Face peers --------------------------------------------------------------------------
def _hf_model(model_dir: Path, device: str, dtype: torch.dtype, attn: str | None = None):
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn} if attn else {}
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, **kwargs).to(device).eval()


class _StepClock:
    """A logits processor that only records when each generation step's logits arrive."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def run_hf_static(model_dir: Path, case: Case, prompts, device: str, dtype, batch: int) -> Result:
    from transformers import LogitsProcessorList

    model = _hf_model(model_dir, device, dtype)
    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    _hf_generate(model, prompts[:2], 4, pad, None)    # warm-up
    ttft, tpot, total = [], [], 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        clock = _StepClock()
        out = _hf_generate(model, chunk, case.output_len, pad, LogitsProcessorList([clock]))
        _sync(device)
        done = time.perf_counter()
        total += (out.shape[1] - case.input_len) * len(chunk)
        first = clock.times[0] - t0
        ttft += [first] * len(chunk)
        tpot += [(done - clock.times[0]) / max(case.output_len - 1, 1)] * len(chunk)
    elapsed = time.perf_counter() - t0
    del model
    _free(device)
    return Result("hf_static", case.name, len(prompts), total, elapsed, ttft, tpot, {"batch": batch})


def _hf_generate(model, prompts, max_new_tokens, pad_id, processors):
    device = model.device
    input_ids = torch.tensor(prompts, device=device)
    with torch.inference_mode():
        return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                              max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=pad_id, logits_processor=processors)


def run_hf_cb(model_dir: Path, case: Case, prompts, device: str, dtype) -> Result:
    from transformers import GenerationConfig

    model = _hf_model(model_dir, device, dtype, attn="paged|sdpa")
    config = GenerationConfig(max_new_tokens=case.output_len, do_sample=False)
    # (Not under inference_mode: its generation thread updates tensors made outside it.)
    model.generate_batch(inputs=prompts[:4], generation_config=config)   # warm-up
    t0 = time.perf_counter()
    outputs = model.generate_batch(inputs=prompts, generation_config=config)
    _sync(device)
    elapsed = time.perf_counter() - t0
    total = sum(len(o.generated_tokens) for o in outputs.values())
    del model
    _free(device)
    return Result("hf_cb", case.name, len(prompts), total, elapsed, notes={"attn": "paged|sdpa"})


# -- our engine in-process -----------------------------------------------------------------------
def engine_config(model_dir: Path, case: Case, device: str, dtype: str, max_num_seqs: int,
                  max_num_batched_tokens: int, kv_fraction: float | None):
    from trident.engine.config import EngineConfig

    values = dict(model=str(model_dir), device=device, dtype=dtype, max_num_seqs=max_num_seqs,
                  max_num_batched_tokens=max_num_batched_tokens, max_queue_size=0,
                  max_model_len=case.input_len + case.output_len + 16, enable_prefix_caching=False)
    if device == "cpu":
        values["kv_cache_memory_bytes"] = 1 << 28
    elif kv_fraction is not None:
        values["kv_cache_free_gpu_mem_fraction"] = kv_fraction
    return EngineConfig(**values)


class _Timer:
    """Wall time spent inside one method of an object (the bench's host/device split)."""

    def __init__(self, owner, name: str):
        self.total = 0.0
        self.calls = 0
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - t
                self.calls += 1
        setattr(owner, name, timed)


# What the engine_sampled systems ask for: the sampler on the device after each forward.
SAMPLED = {"temperature": 0.8, "top_p": 0.95}


def run_engine(config, case: Case, prompts, profile_dir: Path | None = None, system: str = "engine",
               streaming: bool = False, profile_steps: tuple[int, int] = (40, 60),
               sampling: dict | None = None) -> Result:
    """What an offline user runs (vLLM's ``LLM``): FINAL_ONLY requests, one output each, all at once.
    ``streaming``: what the Triton model asks of the engine for a stream instead (DELTA outputs, one
    per request per step, token ids only: the text is decoded by the stub). ``sampling``: sampling
    parameters instead of greedy (``SAMPLED``)."""
    from trident.engine.engine import LLMEngine
    from trident.engine.model_runner import PendingTokens
    from trident.engine.sampling_params import RequestOutputKind, SamplingParams

    engine = LLMEngine(config)
    params = SamplingParams(**(sampling or {"temperature": 0.0}), max_tokens=case.output_len, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA if streaming else RequestOutputKind.FINAL_ONLY,
                            detokenize=not streaming)
    for i, prompt in enumerate(prompts[:8]):     # warm-up: prefill + a few decode buckets
        engine.add_request(f"warm-{i}", prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    # Host/device split: launch = staging + graph launch (+ queuing the sampler); wait = blocked on
    # the GPU's tokens.
    launch_greedy, launch_sampled = _Timer(engine.runner, "launch_greedy"), _Timer(engine.runner, "launch_sampled")
    schedule = _Timer(engine.scheduler, "schedule")
    unpatched_result = PendingTokens.result
    wait = _Timer(PendingTokens, "result")
    replays_before = engine.runner.graphs.num_replays if engine.runner.graphs else 0
    in_situ = _DecodeTimer(engine.runner.graphs) if engine.runner.graphs is not None else None
    t0 = time.monotonic()
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params, arrival_time=t0)
    finals, steps = [], 0
    counts: dict[str, int] = {}   # output tokens per request (a DELTA output holds only its new ones)
    profiler = None
    try:
        while engine.has_unfinished():
            if profile_dir is not None and steps == profile_steps[0]:
                profiler = _start_profiler()
            for out in engine.step():
                counts[out.request_id] = counts.get(out.request_id, 0) + out.num_output_tokens
                if out.finished:
                    finals.append(out)
            steps += 1
            if profiler is not None and steps == profile_steps[1]:
                _stop_profiler(profiler, profile_dir, profile_steps)
                profiler = None
    finally:
        PendingTokens.result = unpatched_result
        if in_situ is not None:
            in_situ.remove()
    elapsed = time.monotonic() - t0
    ttft = [o.timings.time_to_first_token for o in finals]
    tpot = [(o.timings.finished - o.timings.first_token) / max(counts[o.request_id] - 1, 1) for o in finals]
    total = sum(counts[o.request_id] for o in finals)
    launch_total = launch_greedy.total + launch_sampled.total
    notes = {"steps": steps, "output_kind": "delta" if streaming else "final_only", "launch_s": round(launch_total, 3),
             "wait_s": round(wait.total, 3), "schedule_s": round(schedule.total, 3),
             "other_host_s": round(elapsed - launch_total - wait.total - schedule.total, 3),
             "max_num_seqs": config.max_num_seqs, "max_num_batched_tokens": config.max_num_batched_tokens,
             "kv_cache": engine.capacity.describe(),
             "graph_replays": (engine.runner.graphs.num_replays - replays_before) if engine.runner.graphs else 0,
             "async_scheduling": config.async_scheduling, "launched_ahead": engine.num_launched_ahead}
    if engine.runner.graphs is not None:
        notes["graph_decode_step_ms"] = round(_time_graph(engine.runner.graphs, config.max_num_seqs) * 1e3, 3)
        notes.update(in_situ.summary())
        print(f"[{system}] in-situ decode: GPU {notes['in_situ_decode_gpu_ms_mean']} ms/step "
              f"(full batch {notes['in_situ_decode_gpu_ms_full_batch']}), host in DecodeGraphs.run "
              f"{notes['in_situ_decode_host_ms_mean']} ms (staging {notes['in_situ_decode_stage_ms_mean']}); "
              f"largest graph on leftover inputs {notes['graph_decode_step_ms']} ms", flush=True)
    del engine
    _free(config.device)
    return Result(system, case.name, len(prompts), total, elapsed, ttft, tpot, notes)


class _DecodeTimer:
    """The decode replays of the run as they happened: GPU time between CUDA events around each
    ``DecodeGraphs.run`` (upload, gather, replay), and host time inside it and inside its staging.
    Whether a step is bound by the GPU or by the host reads off these against the TPOT:
    ``_time_graph`` replays the largest graph on whatever inputs were left (mostly padding rows with
    no context, so no attention), which understates the GPU time of a real step."""

    def __init__(self, graphs):
        self.graphs, self.events, self.rows = graphs, [], []
        self.host, self.stage = _Timer(graphs, "run"), _Timer(graphs.buffers, "stage")
        inner = graphs.run   # the timed one

        def run(seqs, inputs_from=None):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = inner(seqs, inputs_from)
            end.record()
            self.events.append((start, end))
            self.rows.append(len(seqs))
            return out
        graphs.run = run

    def remove(self) -> None:
        """Back to the class's methods."""
        del self.graphs.run, self.graphs.buffers.stage

    def summary(self) -> dict:
        torch.cuda.synchronize()
        gpu = [start.elapsed_time(end) for start, end in self.events]   # ms
        n = max(len(gpu), 1)
        big = [ms for ms, rows in zip(gpu, self.rows) if rows >= max(self.rows, default=0) * 0.9]
        return {"in_situ_decode_steps": len(gpu), "in_situ_decode_gpu_ms_mean": round(sum(gpu) / n, 3),
                "in_situ_decode_gpu_ms_full_batch": round(statistics.median(big), 3) if big else None,
                "in_situ_decode_host_ms_mean": round(self.host.total * 1e3 / n, 3),
                "in_situ_decode_stage_ms_mean": round(self.stage.total * 1e3 / n, 3)}


def _time_graph(graphs, batch: int, iters: int = 50) -> float:
    """GPU time of one replay of the largest decode graph (inputs left as they are)."""
    bucket = graphs.bucket_for(batch)
    g = graphs._graphs[bucket]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    start.record()
    for _ in range(iters):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def _start_profiler():
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = profile(activities=activities)
    profiler.__enter__()
    return profiler


def _stop_profiler(profiler, out_dir: Path, steps: tuple[int, int]) -> None:
    profiler.__exit__(None, None, None)
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = profiler.key_averages().table(sort_by=key, row_limit=25)
    host = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "engine_profile.txt").write_text(f"# engine steps {steps[0]} to {steps[1]}, by device time\n{table}\n"
                                                f"# by host (self CPU) time\n{host}\n")
    print(table)


# -- our engine through Triton -------------------------------------------------------------------
def gpt_repository(model_dir: Path, engine_values: dict, work: Path, instances: int | None = None) -> Path:
    """A temporary model repository with the `gpt` model over ``model_dir`` and these engine
    settings; ``instances``: its instance count (the shipped config's otherwise)."""
    repo = work / "model_repository"
    gpt = repo / "gpt"
    (gpt / "1").mkdir(parents=True)
    config = (REPO_ROOT / "model_repository/gpt/config.pbtxt").read_text()
    if instances is not None:
        config, found = re.subn(r"instance_group \[.*?\]", f"instance_group [ {{ count: {instances}, kind: KIND_CPU }} ]",
                                config, flags=re.S)
        assert found == 1, "the gpt config has no instance_group to edit"
    (gpt / "config.pbtxt").write_text(config)
    shutil.copy(REPO_ROOT / "model_repository/gpt/1/model.py", gpt / "1/model.py")
    (gpt / "1/engine.json").write_text(json.dumps({**engine_values, "model": str(model_dir)}, indent=1))
    return repo


def _client_worker(url: str, texts: list[str], max_tokens: int, stream: bool, go, queue,
                   extra_site: str, output_names: tuple[str, ...] | None) -> None:
    """One client process: every request of its share on one gRPC stream, sent when ``go`` is set
    (after every client has reported ready: a fixed start time let slow starters send seconds late,
    and that stagger, not the server, was most of the measured time)."""
    import threading

    # spawn gives the child the parent's sys.path; tritonclient lives in the Triton interpreter's site dir
    sys.path.append(extra_site)

    import numpy as np
    import tritonclient.grpc as grpcclient

    records: dict[str, dict] = {}
    done = threading.Event()
    remaining = [len(texts)]

    def on_response(result, error):
        now = time.perf_counter()
        if error is not None:
            queue.put({"error": str(error)})
            remaining[0] -= 1
        else:
            response = result.get_response()
            rec = records[response.id]
            n = result.as_numpy("num_output_tokens")   # None on the empty final response
            tokens = int(n.reshape(-1)[0]) if n is not None else 0
            if tokens > rec["tokens"]:
                rec.setdefault("first", now)
                rec["chunks"] += 1
                rec["tokens"] = tokens
            if response.parameters["triton_final_response"].bool_param:
                rec["end"] = now
                remaining[0] -= 1
        if remaining[0] == 0:
            done.set()

    def tensor(name, datatype, array):
        t = grpcclient.InferInput(name, list(array.shape), datatype)
        t.set_data_from_numpy(array)
        return t

    outputs = [grpcclient.InferRequestedOutput(name) for name in output_names] if output_names else None
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=on_response)
    requests = []
    for i, text in enumerate(texts):
        requests.append([tensor("text_input", "BYTES", np.array([text.encode()], dtype=np.object_)),
                         tensor("max_tokens", "INT32", np.array([max_tokens], dtype=np.int32)),
                         tensor("ignore_eos", "BOOL", np.array([True])),
                         tensor("temperature", "FP32", np.array([0.0], dtype=np.float32)),
                         tensor("stream", "BOOL", np.array([stream])),
                         tensor("exclude_input_in_output", "BOOL", np.array([True]))])
    queue.put({"ready": True})
    go.wait()
    for i, inputs in enumerate(requests):
        rid = f"{os.getpid()}-{i}"
        records[rid] = {"sent": time.perf_counter(), "chunks": 0, "tokens": 0}
        client.async_stream_infer("gpt", inputs, request_id=rid, outputs=outputs, enable_empty_final_response=True)
    done.wait(timeout=900)
    client.stop_stream()
    client.close()
    queue.put({"records": list(records.values())})


# What a client of the bench reads: the text, and the token count for the figures. Each output a
# client asks for costs the server a tensor per response (on the H200 a streamed response took
# 0.8 ms of sender time with these two against 1.0-1.1 ms with all six, docs/benchmarks.md), so
# the others are left unasked, as a chat client would; `triton_stream_all` asks for every output
# (a client that names none).
BENCH_OUTPUTS = ("text_output", "num_output_tokens")


def run_triton(server, case: Case, texts: list[str], stream: bool, num_clients: int,
               phases_dir: Path | None = None, output_names: tuple[str, ...] | None = BENCH_OUTPUTS,
               system: str | None = None) -> Result:
    ctx = mp.get_context("spawn")
    python = triton_python()
    ctx.set_executable(python)   # the one with tritonclient
    extra_site = site_dir(python)
    queue = ctx.Queue()
    go = ctx.Event()   # set once every client is up (imports done, stream open, requests built)
    shares = [texts[i::num_clients] for i in range(num_clients)]
    procs = [ctx.Process(target=_client_worker, args=(f"127.0.0.1:{server.grpc}", share, case.output_len,
                                                      stream, go, queue, extra_site, output_names))
             for share in shares]
    for p in procs:
        p.start()
    records, errors = [], []
    num_reports = num_ready = 0
    while num_reports < len(procs):
        try:
            message = queue.get(timeout=5)
        except Exception:   # queue.Empty: a client that died never reports
            if any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError("a client process failed (see its traceback above)")
            continue
        if "ready" in message:
            num_ready += 1
            if num_ready == len(procs):
                wall_start = time.time()
                go.set()
        elif "error" in message:
            errors.append(message["error"])
        else:
            records += message["records"]
            num_reports += 1
    wall_end = time.time()
    for p in procs:
        p.join(timeout=30)
    complete = [r for r in records if "end" in r]
    t0 = min(r["sent"] for r in records)   # perf_counter is system-wide (CLOCK_MONOTONIC) on Linux
    elapsed = max(r["end"] for r in complete) - t0
    total = sum(r.get("tokens", 0) for r in complete)
    ttft = [r["first"] - r["sent"] for r in complete if "first" in r] if stream else []
    tpot = [(r["end"] - r["first"]) / max(r["tokens"] - 1, 1) for r in complete if "first" in r] if stream else []
    e2e = sorted(r["end"] - r["sent"] for r in complete)
    notes = {"clients": num_clients, "errors": len(errors) + len(records) - len(complete),
             "first_error": errors[0] if errors else None,
             "e2e_p50_ms": _ms(_pct(e2e, 50)),
             "send_spread_ms": _ms(max(r["sent"] for r in records) - t0),
             "mean_responses_per_request": round(statistics.mean(r["chunks"] for r in complete), 2)}
    if phases_dir is not None:
        time.sleep(1.5)   # the model flushes its phase log every second
        notes["stub_phases"] = stub_phases(phases_dir, wall_start, wall_end)
    return Result(system or ("triton_stream" if stream else "triton"), case.name, len(texts), total, elapsed, ttft,
                  tpot, notes)


def stub_phases(directory: Path, start: float, end: float) -> dict:
    """What the gpt model's threads did between ``start`` and ``end`` (wall clock), from the phase
    logs it writes under TRIDENT_GPT_PHASES: per log, the records, their counts and phase seconds
    summed (execute: one record per request; admit: per batch tokenized; router: per batch of
    engine steps; senders: per batch of responses, all shards; engine: per loop of the engine
    process)."""
    summary: dict = {}
    for log in ("execute", "admit", "router", "senders", "engine"):
        rows = [r for rows in read_records(directory, f"gpt-{log}", (start, end)).values() for r in rows]
        summary[log] = {"records": len(rows)}
        if rows:
            summary[log]["span_s"] = round(max(r["start"] for r in rows) - min(r["start"] for r in rows), 3)
            for key in rows[0]:
                if key != "start":
                    summary[log][key] = round(sum(r[key] for r in rows), 3)
    return summary


# -- driver --------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import transformers
        import triton

        info["transformers"] = transformers.__version__
        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def run_case(case: Case, args, work: Path, tokenizers: Path | None) -> list[Result]:
    dtype = getattr(torch, args.dtype)
    tokenizer_dir = tokenizers / TOKENIZER_FOR[case.shape] if tokenizers else None
    if tokenizer_dir is not None and not tokenizer_dir.is_dir():
        tokenizer_dir = None
    model_dir = make_model_dir(case.shape, work / case.shape.replace("/", "_"), tokenizer_dir, dtype)
    config = json.loads((model_dir / "config.json").read_text())
    prompts = random_prompts(case, config["vocab_size"])
    roofline = decode_roofline(model_dir, case, args.max_num_seqs, dtype)
    print(f"\n== {case.name} ({args.device}, {args.dtype}); decode roofline at batch {roofline['batch']}: "
          f"{roofline['step_ms']:.3f} ms/step = {roofline['roofline_tok_s']:,.0f} tok/s", flush=True)
    results = []

    systems = args.case_systems[case]

    def attempt(system: str, fn, label: str | None = None):
        """Run one system (``label`` names its result: a variant of ``system``)."""
        if system not in systems:
            return None
        label = label or system
        try:
            result = fn()
        except Exception as e:  # a peer that fails must not lose the others' numbers
            logging.exception("%s failed on %s", label, case.name)
            result = Result(label, case.name, len(prompts), 0, 0.0, notes={"error": f"{type(e).__name__}: {e}"})
        result.system = label
        result.notes["roofline_fraction"] = round(result.output_tok_s / roofline["roofline_tok_s"], 4)
        results.append(result)
        _print(result)
        return result

    econfig = engine_config(model_dir, case, args.device, args.dtype, args.max_num_seqs,
                            args.max_num_batched_tokens, args.kv_fraction)
    # --profile-dir profiles the first of the engine systems that runs, in the first case.
    profiles = [Path(args.profile_dir)] if args.profile_dir and case == args.cases[0] else []

    def engine(config, system: str, **options) -> Result:
        return run_engine(config, case, prompts, profiles.pop() if profiles else None, system,
                          profile_steps=tuple(args.profile_steps), **options)

    attempt("engine", lambda: engine(econfig, "engine"))
    # The engine as a Triton stream drives it: an output per request per step.
    attempt("engine_stream", lambda: engine(econfig, "engine_stream", streaming=True))
    # The same engine with every step waiting for the previous one's tokens (no async scheduling).
    sync = dataclasses.replace(econfig, async_scheduling=False)
    attempt("engine_sync", lambda: engine(sync, "engine_sync"))
    # Temperature sampling: the sampler's kernels queued after each forward, launched ahead or not.
    attempt("engine_sampled", lambda: engine(econfig, "engine_sampled", sampling=SAMPLED))
    attempt("engine_sampled_sync", lambda: engine(sync, "engine_sampled_sync", sampling=SAMPLED))
    # INT8 weights quantized at load (W8A16, per-channel; build.gpt_int8 is where the perplexity gate
    # lives). W8A8 needs SmoothQuant-calibrated weights from that build, which random weights lack.
    w8a16 = dataclasses.replace(econfig, quantization="int8_weight_only")
    attempt("engine_w8a16", lambda: engine(w8a16, "engine_w8a16"))
    # The same weights with an int8 KV cache (half the bytes the decode attention reads).
    attempt("engine_w8a16_kv8", lambda: engine(
        dataclasses.replace(w8a16, model=str(make_kv8_dir(model_dir, model_dir.with_name(model_dir.name + "-kv8"))),
                            kv_cache_dtype="int8"), "engine_w8a16_kv8"))
    attempt("hf_static", lambda: run_hf_static(model_dir, case, prompts, args.device, dtype, args.hf_batch))
    if {"triton", "triton_stream", "triton_stream_all"} & set(systems) and case.shape in args.triton_shapes:
        values = {k: v for k, v in asdict(econfig).items() if v is not None and k not in ("model", "tokenizer")}
        # Random ids decoded to text re-tokenize to a few more tokens (134 on average for 128):
        # room for them, so that no request is refused for its length.
        values["max_model_len"] = 2 * case.input_len + case.output_len
        tokenizer = _load_tokenizer(model_dir)
        texts = [tokenizer.decode(p) for p in prompts]
        # The served model's stream_interval unless one is given: the bench measures what ships.
        shipped = json.loads((REPO_ROOT / "model_repository/gpt/1/engine.json").read_text())
        for threads, instances, interval, cpus in itertools.product(args.response_threads, args.instances,
                                                                    args.stream_interval, args.engine_cpus):
            suffix = ("" if len(args.response_threads) == 1 else f"_rt{threads}") + \
                     ("" if len(args.instances) == 1 else f"_i{instances}") + \
                     ("" if len(args.stream_interval) == 1 else f"_si{interval}") + \
                     ("" if len(args.engine_cpus) == 1 else f"_ec{cpus}")
            server_values = {**values, "stream_interval": interval or shipped.get("stream_interval", 1)}
            run_triton_systems(case, systems, texts, model_dir, server_values,
                               work / f"triton-{case.shape}-{case.input_len}{suffix}",
                               threads, instances, suffix, args, attempt, results, cpus)
    # Last: the slowest peer, and the one most likely to stall
    attempt("hf_cb", lambda: run_hf_cb(model_dir, case, prompts, args.device, dtype))
    for r in results:
        r.notes.setdefault("roofline", roofline)
    return results


def run_triton_systems(case: Case, systems: list[str], texts: list[str], model_dir: Path, values: dict, server_work: Path,
                       response_threads: int | None, instances: int | None, suffix: str, args, attempt,
                       results: list, engine_cpus: int = 0) -> None:
    """One Triton server for this case (engine settings ``values``; the gpt model's
    ``response_threads`` and instance count where given), then its non-streaming and streaming
    runs, named ``triton{suffix}`` / ``triton_stream{suffix}`` / ``triton_stream_all{suffix}``."""
    server = None
    try:
        server_work.mkdir()
        repository = gpt_repository(model_dir, values, server_work, instances)
        if response_threads is not None:
            with open(repository / "gpt" / "config.pbtxt", "a") as f:
                f.write(f'parameters {{ key: "response_threads" value: {{ string_value: "{response_threads}" }} }}\n')
        phases = server_work / "phases"
        os.environ[GPT_PHASES_ENV] = str(phases)   # the server's stub inherits it
        try:
            server = TritonServer(repository, server_work, engine_cpus=engine_cpus)
        finally:
            os.environ.pop(GPT_PHASES_ENV, None)
        for system, stream, names in (("triton", False, BENCH_OUTPUTS), ("triton_stream", True, BENCH_OUTPUTS),
                                      ("triton_stream_all", True, None)):
            if system in systems:
                result = attempt(system, lambda: run_triton(server, case, texts, stream, args.clients, phases, names,
                                                            system), system + suffix)
                if result is not None:
                    result.notes.update({k: v for k, v in (("response_threads", response_threads),
                                                           ("instances", instances),
                                                           ("stream_interval", values.get("stream_interval")),
                                                           ("engine_cpus", server.engine_cpus or None))
                                         if v is not None})
    except Exception as e:
        logging.exception("Triton run failed")
        results.append(Result("triton" + suffix, case.name, len(texts), 0, 0.0, notes={"error": str(e)}))
    finally:
        if server is not None:
            server.stop()
            if args.out:
                shutil.copy(server.log_path, Path(args.out).with_name(f"tritonserver-{case.shape}-{case.input_len}{suffix}.log"))


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _print(r: Result) -> None:
    s = r.summary()
    error = f"  ERROR {s['error']}" if "error" in s else ""
    print(f"{r.system:>14}: {s['output_tok_s']:>10,.0f} out tok/s  {r.elapsed_s:7.2f} s  "
          f"TTFT p50/p99 {s['ttft_p50_ms']}/{s['ttft_p99_ms']} ms  TPOT p50/p99 {s['tpot_p50_ms']}/{s['tpot_p99_ms']} ms"
          f"  roofline {s.get('roofline_fraction', 0):.1%}{error}", flush=True)
    if "stub_phases" in r.notes:   # a Triton run: where the gpt model's threads spent their time
        print(f"{'':>16}stub: {json.dumps(r.notes['stub_phases'])}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["smollm2-135m:128:128", "gpt2-124m:128:128",
                                                  "smollm2-135m:1024:128"],
                   help="shape:input_len:output_len[:system,system...] (default systems: --systems)")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--systems", nargs="+",
                   default=["engine", "engine_w8a16", "hf_static", "hf_cb", "triton", "triton_stream"])
    p.add_argument("--triton-shapes", nargs="+", default=["smollm2-135m"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--kv-fraction", type=float, default=0.3,
                   help="kv_cache_free_gpu_mem_fraction (the HF peers need room afterwards)")
    p.add_argument("--hf-batch", type=int, default=256)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--instances", type=int, nargs="+", default=[None],
                   help="the gpt model's instance count (stub processes sharing one engine); several values: "
                        "one server each (triton_iN)")
    p.add_argument("--response-threads", type=int, nargs="+", default=[None],
                   help="the gpt model's response_threads; several values: one server each (triton_rtN)")
    p.add_argument("--stream-interval", type=int, nargs="+", default=[None],
                   help="the served engine's stream_interval (tokens per streamed response; default: the shipped "
                        "model_repository/gpt/1/engine.json's); several values: one server each (triton_stream_siN)")
    p.add_argument("--engine-cpus", type=int, nargs="+", default=[0],
                   help="CPUs the launcher keeps for the engine process alone (its --engine-cpus); several "
                        "values: one server each (triton_ecN)")
    p.add_argument("--tokenizers", default=str(REPO_ROOT / ".bench/tokenizers"),
                   help="folder with smollm2/ and gpt2/ tokenizer files (else a byte-level one)")
    p.add_argument("--profile-dir", help="write a torch.profiler summary of engine steps (--profile-steps) here: "
                                        "the first engine system that runs, in the first case")
    p.add_argument("--profile-steps", type=int, nargs=2, default=[40, 60], metavar=("FIRST", "END"),
                   help="the engine steps to profile (default 40 60: decodes; 0 12: the prefills)")
    p.add_argument("--out", help="results JSON")
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU, 24 requests, every system")
    p.add_argument("--plot", help="only draw the plots of this results JSON")
    p.add_argument("--img-dir", default=str(REPO_ROOT / "docs/img"))
    p.add_argument("--plot-name", default="bench_gpt", help="file name prefix of the plots")
    args = p.parse_args(argv)
    if args.smoke:
        args.cases = ["tiny-llama:32:16"]
        args.num_requests = min(args.num_requests, 24)
        args.triton_shapes = ["tiny-llama"]
        args.device, args.dtype = "cpu", "float32"
        args.max_num_seqs, args.hf_batch, args.clients = 8, 8, 2
    cases, args.case_systems = [], {}
    for spec in args.cases:
        shape, i, o, *systems = spec.split(":")
        case = Case(shape, int(i), int(o), args.num_requests)
        cases.append(case)
        args.case_systems[case] = systems[0].split(",") if systems else args.systems
    args.cases = cases
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("trident").setLevel(logging.INFO)
    args = parse_args(argv)
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.img_dir), args.plot_name)
        return 0
    tokenizers = Path(args.tokenizers) if Path(args.tokenizers).is_dir() else None
    machine = _machine()
    print(json.dumps(machine))
    all_results = []
    with tempfile.TemporaryDirectory(prefix="bench_gpt_") as tmp:
        for case in args.cases:
            all_results += run_case(case, args, Path(tmp), tokenizers)
            if args.out:
                _write(args, machine, all_results)
    _print_ratios([r.summary() for r in all_results])
    return 0


def _write(args, machine: dict, results: list[Result]) -> None:
    payload = {"machine": machine, "command": " ".join(sys.argv), "device": args.device, "dtype": args.dtype,
               "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
               "results": [r.summary() for r in results]}
    Path(args.out).write_text(json.dumps(payload, indent=1, default=str))


def _print_ratios(rows: list[dict]) -> None:
    by = {(r["case"], r["system"]): r["output_tok_s"] for r in rows}
    for case in dict.fromkeys(r["case"] for r in rows):
        ours = by.get((case, "engine"))
        if not ours:
            continue
        parts = [f"{s} {ours / by[(case, s)]:.1f}x" for s in ("hf_static", "hf_cb") if by.get((case, s))]
        # every other system of ours, variants (triton_stream_si2, triton_rt4_i2, ...) included
        parts += [f"{s} {value / ours:.0%} of in-process" for (c, s), value in by.items()
                  if c == case and value and s != "engine" and not s.startswith("hf_")]
        print(f"{case}: engine vs " + ", ".join(parts))


# -- plots ---------------------------------------------------------------------------------------
COLORS = {"engine": "#1f77b4", "engine_sync": "#6baed6", "engine_sampled": "#3182bd", "engine_sampled_sync": "#c6dbef",
          "engine_stream": "#9ecae1", "engine_w8a16": "#aec7e8", "engine_w8a16_kv8": "#17becf", "triton": "#2ca02c", "triton_stream": "#98df8a",
          "triton_stream_all": "#c7e9c0", "hf_static": "#ff7f0e", "hf_cb": "#d62728"}


def _color(system: str) -> str:
    """A variant (``triton_rt4``, ``triton_stream_i2``, ``triton_stream_si4``) takes its system's colour."""
    return COLORS.get(re.sub(r"(_rt\d+|_i\d+|_si\d+)+$", "", system), "#7f7f7f")


def plot(payload: dict, img_dir: Path, name: str = "bench_gpt") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in payload["results"] if r["output_tok_s"]]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    gpu = payload["machine"].get("gpu", "CPU")

    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / len(systems)
    for j, system in enumerate(systems):
        values = [next((r["output_tok_s"] for r in rows if r["case"] == c and r["system"] == system), 0)
                  for c in cases]
        bars = ax.bar([i + j * width for i in range(len(cases))], values, width, label=system, color=_color(system))
        ax.bar_label(bars, labels=[f"{v / 1e3:.0f}k" if v else "" for v in values], fontsize=7)
    ax.set_xticks([i + width * (len(systems) - 1) / 2 for i in range(len(cases))], cases, fontsize=8)
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"GPT throughput, 1000 requests at once, {payload['dtype']}, {gpu}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img_dir / f"{name}_throughput.png", dpi=120)
    plt.close(fig)

    timed = [r for r in rows if r.get("ttft_p50_ms") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, ("ttft", "tpot")):
        labels = [f"{r['system']}\n{r['case'].split(' x')[0]}" for r in timed]
        p50 = [r[f"{metric}_p50_ms"] or 0 for r in timed]
        p99 = [r[f"{metric}_p99_ms"] or 0 for r in timed]
        x = range(len(timed))
        ax.bar([i - 0.2 for i in x], p50, 0.4, label="p50", color=[_color(r["system"]) for r in timed])
        ax.bar([i + 0.2 for i in x], p99, 0.4, label="p99", color=[_color(r["system"]) for r in timed], alpha=0.5)
        ax.set_xticks(list(x), labels, fontsize=6, rotation=30, ha="right")
        ax.set_ylabel(f"{metric.upper()} ms")
        ax.set_yscale("log")
        ax.set_title(f"{metric.upper()} p50 (solid) / p99 (light)")
    fig.tight_layout()
    fig.savefig(img_dir / f"{name}_latency.png", dpi=120)
    plt.close(fig)
    print(f"plots in {img_dir}")


if __name__ == "__main__":
    sys.exit(main())
