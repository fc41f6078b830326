"""The torch runtime: packs token ids, runs ``PackedBert`` (fp16 / bf16 / INT8) under CUDA graphs.

A CUDA graph replays a fixed launch sequence on fixed buffers, so a batch is padded to a *bucket*:
its sequence count up to the next of 1, 2, 4, ... and its token count up to the next power of two
(then the next multiple of 1024). Padding rows sit outside every sequence (``cu_seqlens`` ends before
them) and pool into a spare row, so they cost a little compute but never change a result. Graphs are
captured lazily, one per bucket, sharing one memory pool; batches beyond ``max_graph_tokens`` run
eagerly (at that size the GPU, not the launch overhead, sets the pace).

INT8 is W8A8: dynamic per-token int8 activations, per-channel int8 weights, int32 accumulation, on
the four linears of every layer (embeddings, LayerNorms, attention and the heads stay fp16). The
GEMM is ``trident.bert.int8_linear`` (default: bias, GELU and residual in the epilogue, and the
kernels that produce a linear's input quantize its rows as they write them: the LayerNorms for QKV
and the up projection, the attention kernel for the out-projection; only the GELU output feeding
the down projection is quantized in a pass of its own: a row's scale needs the whole row, which no
output tile holds, and quantizing per 128-column group in the up projection's epilogue instead, with
the down projection rescaling each K step, took 311 us per layer against 234 on the H200), the INT8 engine's Triton kernel
(``trident.models.int8_kernels``: rescale in the epilogue, bias added after), or cuBLAS
``torch._int_mm`` with a column-major weight; bench_bert measures all three.
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
from trident.bert.int8_linear import CublasInt8Linear, FusedInt8Linear, QuantizingLayerNorm
from trident.bert.options import EncoderOptions
from trident.bert.torch_model import PackedBatch, PackedBert, load_packed_bert
from trident.models.quant import Int8Linear

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float16}
INT8_GEMMS = ("fused", "triton", "cublas")
ATTENTION_KERNELS = ("auto", "triton", "flash")
GELU_IMPLS = ("tanh", "erf")
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

    def __post_init__(self) -> None:
        if self.precision not in DTYPES:
            raise ValueError(f"precision must be one of {tuple(DTYPES)}, got {self.precision!r}")
        if self.int8_gemm not in INT8_GEMMS:
            raise ValueError(f"int8_gemm must be one of {INT8_GEMMS}, got {self.int8_gemm!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}")
        if self.int8_gelu not in GELU_IMPLS:
            raise ValueError(f"int8_gelu must be one of {GELU_IMPLS}, got {self.int8_gelu!r}")


def quantize_int8(model: PackedBert, int8_gemm: str = "fused", gelu_impl: str = "erf") -> PackedBert:
    """Swaps every layer's linears for W8A8 ones in place (no SmoothQuant: per-token activation
    scales already absorb BERT's per-token outliers; measured in tests/gpu/test_bert_cuda.py).
    ``gelu_impl`` is the fused up projection's GELU (``FusedInt8Linear.gelu_impl``)."""
    cls = {"fused": FusedInt8Linear, "triton": Int8Linear, "cublas": CublasInt8Linear}[int8_gemm]
    for layer in model.layers:
        for name in LINEARS:
            setattr(layer, name, cls.from_linear(getattr(layer, name)))
        if int8_gemm == "fused":
            layer.up.gelu_impl = gelu_impl
    if int8_gemm == "fused":
        quantize_norm_outputs(model)
    return model


def quantize_norm_outputs(model: PackedBert) -> None:
    """Every LayerNorm whose output feeds an int8 linear quantizes for it in the same kernel: the
    embeddings' norm for layer 0's QKV, each attention norm for its up projection, each FFN norm for
    the next layer's QKV (the last one feeds pooling and stays a plain LayerNorm)."""
    layers = model.layers
    model.embed_norm = QuantizingLayerNorm(model.embed_norm, layers[0].qkv.inv_smooth)
    for layer, next_layer in zip(layers, list(layers[1:]) + [None]):
        layer.attn_norm = QuantizingLayerNorm(layer.attn_norm, layer.up.inv_smooth)
        if next_layer is not None:
            layer.ffn_norm = QuantizingLayerNorm(layer.ffn_norm, next_layer.qkv.inv_smooth)


def prepare(model: PackedBert, options: TorchRuntimeOptions) -> PackedBert:
    """The fp32 model cast to the options' dtype and device, quantized for int8."""
    model = model.to(device=options.device, dtype=DTYPES[options.precision]).eval()
    for layer in model.layers:
        layer.attention_kernel = options.attention
    if options.precision == "int8":
        quantize_int8(model, options.int8_gemm, options.int8_gelu)
    return model


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


class TorchRuntime:
    """Runs batches of token ids through a prepared ``PackedBert``; thread-unsafe (one caller at a time).

    ``run(sequences)`` takes (input_ids, token_type_ids) per text, each at most ``max_seqlen`` long,
    and returns fp32 [len(sequences), width] on the host (embeddings or logits).
    """

    def __init__(self, model: PackedBert, options: TorchRuntimeOptions, max_seqlen: int) -> None:
        self.model = model
        self.options = options
        self.max_seqlen = max_seqlen
        self.device = torch.device(options.device)
        self._graphs: dict[tuple[int, int], _BucketGraph] = {}
        self._pool = None
        self._is_graphed = options.use_cuda_graphs and self.device.type == "cuda"
        self._lock = threading.Lock()  # graphs own static buffers: one batch at a time

    def run(self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> np.ndarray:
        with self._lock:
            return self._run(sequences)

    @torch.inference_mode()
    def _run(self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> np.ndarray:
        num_tokens = sum(len(ids) for ids, _ in sequences)
        if self._is_graphed and num_tokens <= self.options.max_graph_tokens:
            out = self._replay(sequences, num_tokens)
        else:
            rows, cu_seqlens = pack(sequences, num_tokens, len(sequences))
            max_seqlen = max([1] + [len(ids) for ids, _ in sequences])
            out = self.model(self._to_device(rows, cu_seqlens, max_seqlen))
        return out[:len(sequences)].cpu().numpy()

    def _to_device(self, rows: np.ndarray, cu_seqlens: np.ndarray, max_seqlen: int) -> PackedBatch:
        rows_d = torch.from_numpy(rows).to(self.device, non_blocking=True)             # [4, num_tokens]
        cu_d = torch.from_numpy(cu_seqlens).to(self.device, non_blocking=True)         # [num_seqs + 1]
        return PackedBatch(rows_d[0], rows_d[1], rows_d[2], rows_d[3], cu_d, max_seqlen)

    def _replay(self, sequences, num_tokens: int) -> torch.Tensor:
        key = (seq_bucket(len(sequences)), _bucket(token_buckets(self.options.max_graph_tokens), num_tokens))
        graph = self._graphs.get(key) or self._capture(*key)
        # Packed straight into pinned buffers: the copies are DMA, not a staged pageable copy each.
        pack(sequences, key[1], key[0], out=(graph.host_rows.numpy(), graph.host_cu_seqlens.numpy()))
        graph.rows.copy_(graph.host_rows, non_blocking=True)
        graph.cu_seqlens.copy_(graph.host_cu_seqlens, non_blocking=True)
        graph.graph.replay()
        return graph.out

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
        self._graphs[(num_seqs, num_tokens)] = _BucketGraph(
            graph, rows, cu_seqlens, out, torch.empty_like(rows, device="cpu").pin_memory(),
            torch.empty_like(cu_seqlens, device="cpu").pin_memory())
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
    return TorchRuntime(prepare(model, runtime_options), runtime_options, max_seqlen)


@dataclass
class _BucketGraph:
    graph: torch.cuda.CUDAGraph
    rows: torch.Tensor        # [4, num_tokens] int64, the static inputs
    cu_seqlens: torch.Tensor  # [num_seqs + 1] int32
    out: torch.Tensor         # [num_seqs, width] fp32, the static output
    host_rows: torch.Tensor   # pinned staging of rows: the run after this one waits for the copy (it syncs on out)
    host_cu_seqlens: torch.Tensor


def _bucket(buckets: list[int], n: int) -> int:
    return next(b for b in buckets if b >= n)

