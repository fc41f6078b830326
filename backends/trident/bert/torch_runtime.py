"""The torch runtime: packs token ids, runs ``PackedBert`` (fp16 / bf16 / INT8) under CUDA graphs.

A CUDA graph replays a fixed launch sequence on fixed buffers, so a batch is padded to a *bucket*:
its sequence count up to the next of 1, 2, 4, ... and its token count up to the next power of two
(then the next multiple of 1024). Padding rows sit outside every sequence (``cu_seqlens`` ends before
them) and pool into a spare row, so they cost a little compute but never change a result. Graphs are
captured lazily, one per bucket, sharing one memory pool; batches beyond ``max_graph_tokens`` run
eagerly (at that size the GPU, not the launch overhead, sets the pace).

INT8 is W8A8: per-token int8 activations (dynamic; static for the out- and down projections by
default, below), per-channel int8 weights, int32 accumulation, on the four linears of every layer
(embeddings, LayerNorms, attention and the heads stay fp16). The
GEMM is ``trident.bert.int8_linear`` (default: bias, GELU and residual in the epilogue, and the
kernels that produce a linear's input quantize its rows as they write them: the LayerNorms for QKV
and the up projection, the attention kernel for the out-projection; with ``int8_ffn="dynamic"`` the
GELU output feeding the down projection is quantized in a pass of its own: a row's scale needs the
whole row, which no output tile holds, and quantizing per 128-column group in the up projection's
epilogue instead, with the down projection rescaling each K step, took 311 us per layer against 234
on the H200), the INT8 engine's Triton kernel
(``trident.models.int8_kernels``: rescale in the epilogue, bias added after), or cuBLAS
``torch._int_mm`` with a column-major weight; bench_bert measures all three.

``int8_ffn="static"`` (the default) removes that one pass: the down projection reads its int8 rows at
one static step per layer (SmoothQuant-smoothed per channel, ``int8_ffn_smooth``), calibrated once in
``prepare`` from the fp16 model's GELU outputs on a few calibration batches (real text from
``open_torch_runtime``, random ids where no calibration is given), so the up projection's epilogue
writes them directly (``int8_linear.hand_off_int8``). H200, BERT-base 128 x 128 per layer: up 137 +
down 71 us against up 107 + quantize_rows 58 + down 71 us. ``int8_attn="static"`` (the default) does
the same for the out-projection: the attention kernel writes its int8 rows at one calibrated step
per layer, a program per head (attention 724 -> 472 us per batch). The LayerNorms whose rows are
only a residual write (mean, rstd) per row instead, and the GEMM that adds them rebuilds them
(``int8_linear.NormedRows``). Measured in docs/benchmarks.md ("Sixth session").

``run_many(batches)`` pipelines the host and the GPU: batch i+1 is packed into one of two pinned
staging sets while the GPU runs batch i, and each batch's result comes back through an event instead
of a blocking sync before the next pack (``submit`` / ``collect``).
"""
from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from itertools import chain
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trident.bert.artifacts import MANIFEST, ArtifactsError, BertArtifacts
from trident.bert.int8_linear import (CublasInt8Linear, FusedInt8Linear, QuantizingLayerNorm, hand_off_int8,
                                      read_static_input)
from trident.bert.options import EncoderOptions
from trident.bert.torch_model import PackedBatch, PackedBert, load_packed_bert
from trident.models.quant import INT8_MAX, Int8Linear, smoothing_factors

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float16}
INT8_GEMMS = ("fused", "triton", "cublas")
ATTENTION_KERNELS = ("auto", "triton", "flash")
GELU_IMPLS = ("tanh", "erf")
EPILOGUES = ("fp32", "f16x2")  # int8_epilogue
GEMM_KERNELS = ("triton", "gluon")  # int8_gemm_kernel
HAND_OFFS = ("dynamic", "static")  # int8_ffn, int8_attn
LINEARS = ("qkv", "attn_out", "up", "down")
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class TorchRuntimeOptions:
    precision: str = "fp16"            # fp32 | fp16 | bf16 | int8 (W8A8, fp16 elsewhere)
    device: str = "cuda"
    use_cuda_graphs: bool = True
    max_graph_tokens: int = 16384      # larger batches run eagerly
    int8_gemm: str = "fused"           # fused (bias/GELU/residual epilogue) | triton (engine's) | cublas
    attention: str = "auto"            # triton (ours, <= 128 tokens, quantizes for int8) | flash (varlen)
                                       # | auto: ours before int8 linears, flash for fp16 (torch_model.attention)
    int8_gelu: str = "tanh"            # the fused int8 up projection's GELU: tanh form | erf (see FusedInt8Linear)
    int8_epilogue: str = "f16x2"       # the fused int8 GEMMs' GELU, int8 rounding and residual: f16x2 (fp16
                                       # pairs, two values an instruction; needs int8_gelu "tanh"; int8_kernels:
                                       # "The fp16-pair epilogue") | fp32. H200, BERT-base s128: 31.96k vs
                                       # 30.31k seq/s; real MiniLM within the same cosine bars
    int8_gemm_kernel: str = "triton"   # the fused int8 GEMM: triton (int8_kernels) | gluon (int8_gluon where it
                                       # applies, >= 1024 rows on sm_90: wgmma kept in flight). H200, BERT-base
                                       # s128: 29.21k (fp32 epilogue) and 31.05k (f16x2) seq/s: slower
    int8_ffn: str = "static"           # the GELU output's int8 hand-off (int8_gemm "fused"; the others are always
                                       # dynamic): static (one calibrated step per layer, written by the up
                                       # projection's epilogue) | dynamic (per-row scale,
                                       # quantize_rows). H200, BERT-base 128 x 128: GPU 5.21 vs 5.55 ms per
                                       # batch; real MiniLM vs fp32 HF: 0.9967 / 0.9899 vs 0.9975 / 0.9945
    int8_ffn_smooth: float | None = 0.9  # static: SmoothQuant alpha of the down projection's input (None: off);
                                         # real MiniLM vs fp32 HF (CPU): None 0.986 / 0.966 mean / min cosine,
                                         # 0.5 0.917 / 0.773, 0.8 0.9959 / 0.9911, 0.9 0.9968 / 0.9899, 1.0 0.9966 / 0.9920
    int8_attn: str = "static"          # the attention output's int8 hand-off to the out-projection (int8_gemm
                                       # "fused"): static (one calibrated step per layer, written by the
                                       # attention kernel, a program per head) | dynamic (per-row scale: one
                                       # program walks a row block's heads to find its absmax)
    int8_attn_smooth: float | None = 0.5  # static: SmoothQuant alpha of the out-projection's input (None: off)

    def __post_init__(self) -> None:
        if self.precision not in DTYPES:
            raise ValueError(f"precision must be one of {tuple(DTYPES)}, got {self.precision!r}")
        if self.int8_gemm not in INT8_GEMMS:
            raise ValueError(f"int8_gemm must be one of {INT8_GEMMS}, got {self.int8_gemm!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}")
        if self.int8_gelu not in GELU_IMPLS:
            raise ValueError(f"int8_gelu must be one of {GELU_IMPLS}, got {self.int8_gelu!r}")
        if self.int8_epilogue not in EPILOGUES:
            raise ValueError(f"int8_epilogue must be one of {EPILOGUES}, got {self.int8_epilogue!r}")
        if self.int8_gemm_kernel not in GEMM_KERNELS:
            raise ValueError(f"int8_gemm_kernel must be one of {GEMM_KERNELS}, got {self.int8_gemm_kernel!r}")
        if self.int8_epilogue == "f16x2" and self.int8_gelu != "tanh":
            raise ValueError("int8_epilogue 'f16x2' computes GELU's tanh form: it needs int8_gelu 'tanh'")
        for name in ("int8_ffn", "int8_attn"):
            if getattr(self, name) not in HAND_OFFS:
                raise ValueError(f"{name} must be one of {HAND_OFFS}, got {getattr(self, name)!r}")

    @property
    def static_inputs(self) -> dict[str, float | None]:
        """The linears that read int8 rows at a static step, each with its SmoothQuant alpha: static
        hand-offs are in effect for the fused GEMM only (the other int8 GEMMs have no epilogue to
        write int8 rows from)."""
        if self.precision != "int8" or self.int8_gemm != "fused":
            return {}
        chosen = {"attn_out": (self.int8_attn, self.int8_attn_smooth), "down": (self.int8_ffn, self.int8_ffn_smooth)}
        return {name: alpha for name, (hand_off, alpha) in chosen.items() if hand_off == "static"}


def quantize_int8(model: PackedBert, int8_gemm: str = "fused", gelu_impl: str = "erf",
                  static_inputs: dict[str, tuple[list[torch.Tensor], float | None]] | None = None,
                  half_epilogue: bool = False, gemm_kernel: str = "triton") -> PackedBert:
    """Swaps every layer's linears for W8A8 ones in place (no SmoothQuant on the dynamic per-token
    inputs: per-token scales already absorb BERT's per-token outliers; measured in
    tests/gpu/test_bert_cuda.py). ``gelu_impl`` is the fused up projection's GELU
    (``FusedInt8Linear.gelu_impl``), ``half_epilogue`` its epilogues' arithmetic
    (``FusedInt8Linear.half_epilogue``), ``gemm_kernel`` its GEMM (``FusedInt8Linear.gemm_kernel``).
    ``static_inputs``: linear name ("attn_out", "down") -> (per layer its input's max |x| per channel, from
    ``input_absmax``; SmoothQuant alpha or None): that linear reads int8 rows at one static step per layer,
    smoothed first, written by its producer (the attention kernel; the up projection's epilogue)."""
    cls = {"fused": FusedInt8Linear, "triton": Int8Linear, "cublas": CublasInt8Linear}[int8_gemm]
    static_inputs = static_inputs or {}
    for index, layer in enumerate(model.layers):
        for name in LINEARS:
            linear = getattr(layer, name)
            smooth = None
            if name in static_inputs and static_inputs[name][1] is not None:
                absmax = static_inputs[name][0][index].float().to(linear.weight.device)  # [in]
                smooth = smoothing_factors(absmax, linear.weight, static_inputs[name][1])  # [in]
            setattr(layer, name, cls.from_linear(linear, smooth))
        if int8_gemm == "fused":
            layer.up.gelu_impl = gelu_impl
            for name in LINEARS:
                getattr(layer, name).half_epilogue = half_epilogue
                getattr(layer, name).gemm_kernel = gemm_kernel
        for name, (absmax, _) in static_inputs.items():
            linear = getattr(layer, name)
            smoothed = absmax[index].float().to(linear.inv_smooth.device) * linear.inv_smooth.float()  # [in]
            step = (smoothed.max() / INT8_MAX).clamp(min=1e-8)
            if name == "down":
                hand_off_int8(layer.up, layer.down, step)
            else:
                read_static_input(linear, step)
    if int8_gemm == "fused":
        quantize_norm_outputs(model)
    return model


def quantize_norm_outputs(model: PackedBert) -> None:
    """Every LayerNorm whose output feeds an int8 linear quantizes for it in the same kernel: the
    embeddings' norm for layer 0's QKV, each attention norm for its up projection, each FFN norm for
    the next layer's QKV (the last one feeds pooling and stays a plain LayerNorm). The attention and
    FFN norms' normalized rows are otherwise only the down and next out-projections' residuals: those
    GEMMs rebuild them from row statistics (``defers_output``); the embeddings' norm, whose input
    is never written, writes them."""
    layers = model.layers
    model.embed_norm = QuantizingLayerNorm(model.embed_norm, layers[0].qkv.inv_smooth)
    for layer, next_layer in zip(layers, list(layers[1:]) + [None]):
        layer.attn_norm = QuantizingLayerNorm(layer.attn_norm, layer.up.inv_smooth, defers_output=True)
        if next_layer is not None:
            layer.ffn_norm = QuantizingLayerNorm(layer.ffn_norm, next_layer.qkv.inv_smooth, defers_output=True)


def prepare(model: PackedBert, options: TorchRuntimeOptions,
            calibration: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None) -> PackedBert:
    """The fp32 model cast to the options' dtype and device, quantized for int8.

    ``calibration``: (input_ids, token_type_ids) per text, for the static int8 hand-offs (the fp16
    model runs them to calibrate the out- and down projections' input steps); None: ``random_calibration``, random
    ids (what the random-weight benchmarks run; real models should pass real text, as
    ``open_torch_runtime`` does)."""
    model = model.to(device=options.device, dtype=DTYPES[options.precision]).eval()
    for layer in model.layers:
        layer.attention_kernel = options.attention
    if options.precision == "int8":
        static = options.static_inputs
        absmax = {}
        if static:
            absmax = input_absmax(model, calibration or random_calibration(model.shape.vocab_size), tuple(static))
        quantize_int8(model, options.int8_gemm, options.int8_gelu,
                      {name: (absmax[name], alpha) for name, alpha in static.items()},
                      half_epilogue=options.int8_epilogue == "f16x2", gemm_kernel=options.int8_gemm_kernel)
    return model


CALIBRATION_BATCH = 64  # sequences per calibration forward


def random_calibration(vocab_size: int, num_seqs: int = 128, seqlen: int = 128,
                       seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Random token ids: calibration for random-weight models, whose inputs are random ids too."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, vocab_size, seqlen).tolist(), [0] * seqlen) for _ in range(num_seqs)]


@torch.no_grad()  # not inference_mode: the maxima feed the quantized weights, built outside it
def input_absmax(model: PackedBert, sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
                 names: Sequence[str] = ("down",)) -> dict[str, list[torch.Tensor]]:
    """Per linear name, per layer, max |x| per channel of that linear's input (the GELU output for
    "down", the attention output for "attn_out") over every token of ``sequences``, run eagerly through
    ``model`` before it is quantized: fp32 [in_features]."""
    device = next(model.parameters()).device
    absmax = {name: [torch.zeros(getattr(layer, name).in_features, device=device) for layer in model.layers]
              for name in names}

    def observe(seen: torch.Tensor):
        def hook(_module, inputs):
            rows = inputs[0].reshape(-1, inputs[0].shape[-1])  # [num_tokens, in]
            torch.maximum(seen, rows.abs().amax(0).float(), out=seen)
        return hook

    handles = [getattr(layer, name).register_forward_pre_hook(observe(absmax[name][i]))
               for name in names for i, layer in enumerate(model.layers)]
    try:
        for first in range(0, len(sequences), CALIBRATION_BATCH):
            chunk = sequences[first:first + CALIBRATION_BATCH]
            num_tokens = sum(len(ids) for ids, _ in chunk)
            rows, cu_seqlens = pack(chunk, num_tokens, len(chunk))  # exact sizes: no padding row is observed
            model(to_device(rows, cu_seqlens, max(len(ids) for ids, _ in chunk), device))
    finally:
        for handle in handles:
            handle.remove()
    return absmax


def token_buckets(max_tokens: int) -> list[int]:
    """Padded token counts: powers of two from 16 to 1024, then multiples of 1024 (at most 1/8 waste there)."""
    buckets = [16]
    while buckets[-1] < min(max_tokens, 1024):
        buckets.append(buckets[-1] * 2)
    while buckets[-1] < max_tokens:
        buckets.append(buckets[-1] + 1024)
    return buckets


def seq_bucket(num_seqs: int) -> int:
    return 1 << max(0, (num_seqs - 1).bit_length())


def pack(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], num_tokens: int, num_seqs: int,
         out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Host arrays of a packed batch, padded to a (num_tokens, num_seqs) bucket.

    ``sequences`` are (input_ids, token_type_ids). Returns rows int64 [4, num_tokens] (input ids,
    token types, positions, sequence index) and cu_seqlens int32 [num_seqs + 1], written into ``out``
    (arrays of those shapes and dtypes: a graph's pinned staging buffers) when given.
    """
    rows, cu_seqlens = out or (np.empty((4, num_tokens), np.int64), np.empty(num_seqs + 1, np.int32))
    lengths = np.fromiter((len(ids) for ids, _ in sequences), dtype=np.int64, count=len(sequences))
    cu_seqlens[0] = 0
    np.cumsum(lengths, out=cu_seqlens[1:len(sequences) + 1])
    total = int(cu_seqlens[len(sequences)])
    cu_seqlens[len(sequences) + 1:] = total  # padding sequences are empty
    rows.fill(0)
    if total:
        # The host's share of a batch of 128 x 128 (1.1 ms of 7.8 on the H200 machine): fromiter over the
        # flat ids builds one array instead of one per sequence, and all-zero token types (single texts)
        # are not copied at all.
        rows[0, :total] = np.fromiter(chain.from_iterable(ids for ids, _ in sequences), np.int64, total)
        if any(map(any, (types for _, types in sequences))):
            rows[1, :total] = np.fromiter(chain.from_iterable(types for _, types in sequences), np.int64, total)
        starts = np.repeat(cu_seqlens[:len(sequences)], lengths)
        rows[2, :total] = np.arange(total) - starts
        rows[3, :total] = np.repeat(np.arange(len(sequences)), lengths)
    rows[3, total:] = num_seqs  # the spare pooling row
    return rows, cu_seqlens


def to_device(rows: np.ndarray, cu_seqlens: np.ndarray, max_seqlen: int, device: torch.device) -> PackedBatch:
    """``pack``'s host arrays as the model's device inputs."""
    rows_d = torch.from_numpy(rows).to(device, non_blocking=True)             # [4, num_tokens]
    cu_d = torch.from_numpy(cu_seqlens).to(device, non_blocking=True)         # [num_seqs + 1]
    return PackedBatch(rows_d[0], rows_d[1], rows_d[2], rows_d[3], cu_d, max_seqlen)


@dataclass
class Ticket:
    """A submitted batch: its result once ``event`` has passed (``host_out`` rows ``:num_seqs``), or
    ``result`` already on the host (batches that ran eagerly)."""
    num_seqs: int
    event: torch.cuda.Event | None = None
    host_out: torch.Tensor | None = None  # pinned [bucket seqs, width] fp32, one staging set's
    result: np.ndarray | None = None


class TorchRuntime:
    """Runs batches of token ids through a prepared ``PackedBert``; thread-unsafe (one caller at a time).

    ``run(sequences)`` takes (input_ids, token_type_ids) per text, each at most ``max_seqlen`` long,
    and returns fp32 [len(sequences), width] on the host (embeddings or logits). ``run_many(batches)``
    returns the same per batch, packing each next batch on the host while the GPU runs the current one.
    """

    NUM_STAGING = 2  # host staging sets per graph: one being packed while the other's batch runs

    def __init__(self, model: PackedBert, options: TorchRuntimeOptions, max_seqlen: int) -> None:
        self.model = model
        self.options = options
        self.max_seqlen = max_seqlen
        self.device = torch.device(options.device)
        self._graphs: dict[tuple[int, int], _BucketGraph] = {}
        self._pool = None
        self._num_submitted = 0
        self._is_graphed = options.use_cuda_graphs and self.device.type == "cuda"
        self._lock = threading.Lock()  # graphs own static buffers: one caller at a time

    def run(self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> np.ndarray:
        with self._lock:
            return self._collect(self._submit(sequences))

    def run_many(self, batches: Sequence[Sequence[tuple[Sequence[int], Sequence[int]]]]) -> list[np.ndarray]:
        """``[run(b) for b in batches]``, pipelined: batch i+1 is packed and queued before batch i's
        result is waited for, so the host's share overlaps the GPU's (CUDA graphs only)."""
        with self._lock:
            results, pending = [], None
            for sequences in batches:
                ticket = self._submit(sequences)
                if pending is not None:
                    results.append(self._collect(pending))
                pending = ticket
            if pending is not None:
                results.append(self._collect(pending))
            return results

    @torch.inference_mode()
    def _submit(self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Ticket:
        num_tokens = sum(len(ids) for ids, _ in sequences)
        if self._is_graphed and num_tokens <= self.options.max_graph_tokens:
            return self._replay(sequences, num_tokens)
        rows, cu_seqlens = pack(sequences, num_tokens, len(sequences))
        max_seqlen = max([1] + [len(ids) for ids, _ in sequences])
        out = self.model(to_device(rows, cu_seqlens, max_seqlen, self.device))
        return Ticket(len(sequences), result=out[:len(sequences)].cpu().numpy())

    @staticmethod
    def _collect(ticket: Ticket) -> np.ndarray:
        if ticket.result is not None:
            return ticket.result
        ticket.event.synchronize()
        return ticket.host_out[:ticket.num_seqs].numpy().copy()  # the staging set is reused two batches on

    def _replay(self, sequences, num_tokens: int) -> Ticket:
        key = (seq_bucket(len(sequences)), _bucket(token_buckets(self.options.max_graph_tokens), num_tokens))
        graph = self._graphs.get(key) or self._capture(*key)
        staging = graph.staging[self._num_submitted % self.NUM_STAGING]
        self._num_submitted += 1
        staging.done.synchronize()  # the batch that last used this set has been copied in and out
        # Packed straight into pinned buffers: the copies are DMA, not a staged pageable copy each.
        pack(sequences, key[1], key[0], out=(staging.rows.numpy(), staging.cu_seqlens.numpy()))
        # One stream orders it all: this batch's inputs land after the previous replay read its own,
        # and its output leaves before the next replay (of any graph in the shared pool) writes.
        graph.rows.copy_(staging.rows, non_blocking=True)
        graph.cu_seqlens.copy_(staging.cu_seqlens, non_blocking=True)
        graph.graph.replay()
        staging.out.copy_(graph.out, non_blocking=True)
        staging.done.record()
        return Ticket(len(sequences), staging.done, staging.out)

    def _capture(self, num_seqs: int, num_tokens: int) -> "_BucketGraph":
        rows = torch.zeros(4, num_tokens, dtype=torch.int64, device=self.device)           # [4, num_tokens]
        rows[3] = num_seqs
        cu_seqlens = torch.zeros(num_seqs + 1, dtype=torch.int32, device=self.device)       # [num_seqs + 1]
        batch = PackedBatch(rows[0], rows[1], rows[2], rows[3], cu_seqlens, self.max_seqlen)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture: Triton JIT, cuBLAS handles
            self.model(batch)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.model(batch)  # [num_seqs, width]
        self._pool = graph.pool()
        staging = [_Staging.like(rows, cu_seqlens, out) for _ in range(self.NUM_STAGING)]
        self._graphs[(num_seqs, num_tokens)] = _BucketGraph(graph, rows, cu_seqlens, out, staging)
        return self._graphs[(num_seqs, num_tokens)]

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)


def checkpoint_dir(artifacts: BertArtifacts) -> Path:
    """Where the safetensors are: copied into the artifacts, else the source the build recorded."""
    if (artifacts.directory / WEIGHTS).is_file():
        return artifacts.directory
    source = Path(json.loads((artifacts.directory / MANIFEST).read_text())["source"]["path"])
    if not (source / WEIGHTS).is_file():
        raise ArtifactsError(f"runtime 'torch' needs {WEIGHTS}: neither {artifacts.directory} nor the "
                             f"build's source {source} has it")
    return source


def open_torch_runtime(artifacts: BertArtifacts, options: EncoderOptions, max_seqlen: int) -> TorchRuntime:
    """The runtime for the encoder: HF weights from the checkpoint, config.json from the artifacts."""
    if not torch.cuda.is_available():
        raise RuntimeError("runtime 'torch' needs CUDA, and torch.cuda.is_available() is False")
    model = load_packed_bert(checkpoint_dir(artifacts), is_classifier=artifacts.task == "classification")
    runtime_options = TorchRuntimeOptions(precision=options.precision, device=options.device)
    calibration = text_calibration(artifacts, max_seqlen) if runtime_options.static_inputs else None
    return TorchRuntime(prepare(model, runtime_options, calibration), runtime_options, max_seqlen)


NUM_CALIBRATION_TEXTS = 128  # sentences, plus passages of at least CALIBRATION_PASSAGE_WORDS words
CALIBRATION_PASSAGE_WORDS = 200


def text_calibration(artifacts: BertArtifacts, max_seqlen: int) -> list[tuple[list[int], list[int]]]:
    """Real English calibration text for ``prepare``, tokenized with the model's tokenizer: the
    calibration half of ``trident.corpus``'s split (disjoint from the held-out text the accuracy
    tests and the build's gate use), sentences and long passages."""
    from trident import corpus
    from trident.bert.tokenizer import TextTokenizer

    split = corpus.text_split().calibration
    texts = list(split[:NUM_CALIBRATION_TEXTS])
    texts += corpus.passages(list(split[NUM_CALIBRATION_TEXTS:]), CALIBRATION_PASSAGE_WORDS)[:NUM_CALIBRATION_TEXTS // 8]
    encodings = TextTokenizer.from_file(artifacts.tokenizer_path, max_seqlen).encode(texts)
    return [(e.ids, e.type_ids) for e in encodings]


@dataclass
class _Staging:
    """Pinned host copies of one graph's inputs and output, and the event after the batch that used them."""
    rows: torch.Tensor        # [4, num_tokens] int64
    cu_seqlens: torch.Tensor  # [num_seqs + 1] int32
    out: torch.Tensor         # [num_seqs, width] fp32
    done: torch.cuda.Event

    @classmethod
    def like(cls, rows: torch.Tensor, cu_seqlens: torch.Tensor, out: torch.Tensor) -> "_Staging":
        done = torch.cuda.Event()
        done.record()  # a fresh set is free
        return cls(*(torch.empty_like(t, device="cpu").pin_memory() for t in (rows, cu_seqlens, out)), done)


@dataclass
class _BucketGraph:
    graph: torch.cuda.CUDAGraph
    rows: torch.Tensor        # [4, num_tokens] int64, the static inputs
    cu_seqlens: torch.Tensor  # [num_seqs + 1] int32
    out: torch.Tensor         # [num_seqs, width] fp32, the static output
    staging: list[_Staging]   # NUM_STAGING sets, used in turn


def _bucket(buckets: list[int], n: int) -> int:
    return next(b for b in buckets if b >= n)

