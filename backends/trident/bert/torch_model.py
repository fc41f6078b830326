"""Our BERT encoder forward in PyTorch on a packed batch: no padding token is ever computed.

The batch's tokens are concatenated into one ``[num_tokens, hidden]`` tensor; ``cu_seqlens`` marks
where each sequence starts. Linears, LayerNorm and GELU are row-wise, so they run on the packed rows
as they are; attention is the only op that mixes rows, and it runs per sequence through
FlashAttention's varlen kernel on CUDA (``cu_seqlens``, no mask, no padded ``[batch, seq, seq]``
scores). Before an INT8 out-projection (or with ``attention_kernel = "triton"``), sequences of up to
128 tokens run ``int8_kernels.attention_quantize`` instead, which also writes the projection's int8 rows. Pooling (mean, or the [CLS] row for classifiers) is a segment sum on the packed rows.

Weights load from a Hugging Face ``BertModel`` / ``BertForSequenceClassification`` safetensors file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from trident.bert.int8_linear import QuantizedRows, QuantizingLayerNorm, hidden_of, materialized, round_to_int8
from trident.models import int8_kernels

if int8_kernels.IS_AVAILABLE:
    import triton
    import triton.language as tl

MIN_TOKEN_COUNT = 1e-9  # the floors of trident.bert.pooling (sentence-transformers')
MIN_NORM = 1e-12


@dataclass(frozen=True)
class BertShape:
    """The architecture numbers of a BERT checkpoint (a view of its ``config.json``)."""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    num_labels: int = 0  # > 0: a sequence classifier (pooler + classifier head)

    @classmethod
    def from_config(cls, path: str | Path, is_classifier: bool = False) -> "BertShape":
        config = json.loads(Path(path).read_text())
        if config.get("hidden_act", "gelu") != "gelu" or config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only gelu activations and absolute positions are supported")
        num_labels = (len(config.get("id2label", {})) or config.get("num_labels", 2)) if is_classifier else 0
        return cls(config["vocab_size"], config["hidden_size"], config["num_hidden_layers"],
                   config["num_attention_heads"], config["intermediate_size"],
                   config["max_position_embeddings"], config.get("type_vocab_size", 2),
                   config.get("layer_norm_eps", 1e-12), num_labels)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class PackedBatch:
    """Device inputs of one packed batch; rows past ``cu_seqlens[-1]`` are padding of a CUDA-graph bucket.

    ``seq_index`` maps each row to its sequence (padding rows to ``num_seqs``, a row nobody reads),
    ``max_seqlen`` bounds every sequence's length (FlashAttention sizes its grid with it).
    """
    input_ids: torch.Tensor       # [num_tokens] int64
    token_type_ids: torch.Tensor  # [num_tokens] int64
    position_ids: torch.Tensor    # [num_tokens] int64
    seq_index: torch.Tensor       # [num_tokens] int64
    cu_seqlens: torch.Tensor      # [num_seqs + 1] int32
    max_seqlen: int

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.shape[0] - 1


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int) -> torch.Tensor:
    """Bidirectional attention within each packed sequence; q, k, v [num_tokens, num_heads, head_dim]."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, False, False)[0]
    return _attention_per_sequence(q, k, v, cu_seqlens)


def attention(qkv: torch.Tensor, batch: PackedBatch, kernel: str, out_linear: nn.Module) -> torch.Tensor | QuantizedRows:
    """Attention of a layer: qkv [num_tokens, 3, num_heads, head_dim] -> [num_tokens, hidden].

    ``kernel`` "triton" (or "auto" before a fused int8 ``out_linear``) on CUDA for sequences of at
    most 128 tokens: our kernel, which also quantizes the rows for a fused int8 ``out_linear`` (then
    returns ``QuantizedRows``: per-row scales, or at the linear's static step when it reads one); else
    FlashAttention varlen (or the CPU reference). "auto" keeps FlashAttention for fp16: on the H200
    (BERT-base, batches of 128) ours was 2% faster at 128 tokens each but 5% slower on lengths
    16..128, while before an int8 projection it was faster on both (41 + quantize fused = 61 us vs
    51 + 18 us for FlashAttention + quantize_rows at 128 x 128)."""
    num_tokens = qkv.shape[0]
    quantizes = getattr(out_linear, "fuses_epilogue", False)
    inv_step = getattr(out_linear, "input_inv_step", None)  # [hidden]: the linear reads int8 at a static step
    if ((kernel == "triton" or (kernel == "auto" and quantizes)) and int8_kernels.supports(qkv)
            and qkv.dtype in (torch.float16, torch.bfloat16) and batch.max_seqlen <= int8_kernels.MAX_ATTENTION_SEQLEN):
        if inv_step is not None:
            return QuantizedRows(None, int8_kernels.attention_quantize(qkv, batch.cu_seqlens, batch.max_seqlen,
                                                                       out_inv_step=inv_step)[1], None)
        inv_smooth = out_linear.inv_smooth if quantizes else None
        out, q, scale = int8_kernels.attention_quantize(qkv, batch.cu_seqlens, batch.max_seqlen, inv_smooth)
        return out if q is None else QuantizedRows(out, q, scale)
    out = varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], batch.cu_seqlens, batch.max_seqlen)  # [num_tokens, num_heads, head_dim]
    out = out.reshape(num_tokens, -1)
    if inv_step is not None:  # as the kernel rounds: from the rows in the model dtype
        return QuantizedRows(None, round_to_int8(out.float() * inv_step), None)
    return out


def _attention_per_sequence(q, k, v, cu_seqlens) -> torch.Tensor:
    # The reference path (CPU, fp32): one SDPA per sequence, still never computing a padded row.
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            rows = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # [num_heads, seq, head_dim]
            out[start:end] = F.scaled_dot_product_attention(*rows).transpose(0, 1)
    return out


class EncoderLayer(nn.Module):
    def __init__(self, shape: BertShape) -> None:
        super().__init__()
        h, i = shape.hidden_size, shape.intermediate_size
        self.shape = shape
        self.qkv = nn.Linear(h, 3 * h)  # Q, K and V fused: one GEMM instead of three
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=shape.layer_norm_eps)
        self.up = nn.Linear(h, i)
        self.down = nn.Linear(i, h)
        self.ffn_norm = nn.LayerNorm(h, eps=shape.layer_norm_eps)
        self.attention_kernel = "auto"  # "auto" | "triton" | "flash" (see attention); torch_runtime.prepare sets it

    def forward(self, x: torch.Tensor | QuantizedRows, batch: PackedBatch,
                is_normed: bool = True) -> torch.Tensor | QuantizedRows:
        # INT8: the norms may hand over QuantizedRows (hidden + the next linear's int8 rows).
        # is_normed False: the output before ffn_norm (the pooling kernel applies it as it reads the rows).
        num_tokens = hidden_of(x).shape[0]
        qkv = project(self.qkv, x).view(num_tokens, 3, self.shape.num_heads, self.shape.head_dim)  # [num_tokens, 3, num_heads, head_dim]
        attn = attention(qkv, batch, self.attention_kernel, self.attn_out)  # [num_tokens, hidden]
        x = self.attn_norm(project(self.attn_out, attn, residual=hidden_of(x)))  # [num_tokens, hidden]
        out = project(self.down, project(self.up, x, gelu=True), residual=hidden_of(x))  # [num_tokens, hidden]
        return self.ffn_norm(out) if is_normed else out


def project(linear: nn.Module, x: torch.Tensor | QuantizedRows, residual: torch.Tensor | None = None,
            gelu: bool = False) -> torch.Tensor:
    """``gelu?(linear(x)) + residual``; a linear with ``fuses_epilogue`` does it in its GEMM's epilogue
    (and is the only kind that takes pre-quantized rows)."""
    if getattr(linear, "fuses_epilogue", False):
        return linear(x, residual=residual, gelu=gelu)
    out = linear(x)
    out = F.gelu(out) if gelu else out
    return out if residual is None else out + materialized(residual)


class PackedBert(nn.Module):
    """BERT encoder on packed tokens; ``forward`` returns what the encoder serves, in fp32:
    L2-normalised mean-pooled embeddings [num_seqs, hidden], or classifier logits [num_seqs, num_labels]."""

    def __init__(self, shape: BertShape) -> None:
        super().__init__()
        h = shape.hidden_size
        self.shape = shape
        self.word_embeddings = nn.Embedding(shape.vocab_size, h)
        self.position_embeddings = nn.Embedding(shape.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(shape.type_vocab_size, h)
        self.embed_norm = nn.LayerNorm(h, eps=shape.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(shape) for _ in range(shape.num_layers))
        if shape.num_labels:
            self.pooler = nn.Linear(h, h)
            self.classifier = nn.Linear(h, shape.num_labels)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        if isinstance(self.embed_norm, QuantizingLayerNorm):  # INT8: one kernel from the ids to the int8 rows
            x = self.embed_norm.embeddings(
                (batch.input_ids, batch.position_ids, batch.token_type_ids),
                (self.word_embeddings.weight, self.position_embeddings.weight, self.token_type_embeddings.weight))
        else:
            x = self.embed_norm(self.word_embeddings(batch.input_ids) + self.position_embeddings(batch.position_ids)
                                + self.token_type_embeddings(batch.token_type_ids))  # [num_tokens, hidden]
        *layers, last = self.layers
        for layer in layers:
            x = layer(x, batch)
        if self.shape.num_labels:
            return self._classify(last(x, batch), batch)
        # The last LayerNorm's rows feed only the pooling, which applies it as it sums them.
        return mean_pool_packed(last(x, batch, is_normed=False), batch, last.ffn_norm)

    def _classify(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        # A bucket's padding sequences start at cu_seqlens[-1], which may be one past the last row.
        first = batch.cu_seqlens[:-1].long().clamp(max=x.shape[0] - 1)  # [num_seqs]
        pooled = torch.tanh(self.pooler(x[first]))                        # [num_seqs, hidden]
        return self.classifier(pooled).float()                            # [num_seqs, num_labels]


def mean_pool_packed(x: torch.Tensor, batch: PackedBatch, norm: nn.LayerNorm | None = None) -> torch.Tensor:
    """Mean over each sequence's rows (``norm``: of ``norm(rows)``) then L2 normalisation;
    x [num_tokens, hidden] -> fp32 [num_seqs, hidden].

    On CUDA one Triton program per sequence normalises and sums its rows, then the mean (the fp32
    copy of x and the atomics of ``index_add_`` took 0.13 ms of a BERT-base batch of 128 x 128 on the
    H200, and a separate LayerNorm pass 36 us more). Elsewhere ``index_add_`` rather than a pooling
    matmul: padding rows may hold NaN (the attention kernels leave rows outside every sequence
    unwritten) and 0 * NaN would leak into the sums; they land in a spare row.
    """
    if int8_kernels.supports(x):
        return _mean_pool_triton(x, batch.cu_seqlens, norm)
    x = x if norm is None else norm(x)
    sums = x.new_zeros(batch.num_seqs + 1, x.shape[1], dtype=torch.float32)  # [num_seqs + 1, hidden]
    sums.index_add_(0, batch.seq_index, x.float())
    counts = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).float().clamp(min=MIN_TOKEN_COUNT)  # [num_seqs]
    return F.normalize(sums[:-1] / counts[:, None], dim=-1, eps=MIN_NORM)   # [num_seqs, hidden]


def _mean_pool_triton(x: torch.Tensor, cu_seqlens: torch.Tensor, norm: nn.LayerNorm | None = None) -> torch.Tensor:
    num_seqs, hidden = cu_seqlens.shape[0] - 1, x.shape[1]
    out = torch.empty(num_seqs, hidden, dtype=torch.float32, device=x.device)  # [num_seqs, hidden]
    _mean_pool_kernel[(num_seqs,)](x, cu_seqlens, out, x if norm is None else norm.weight,
                                   x if norm is None else norm.bias, 0.0 if norm is None else norm.eps, hidden,
                                   MIN_TOKEN_COUNT, MIN_NORM, NORM=norm is not None, BLOCK_ROWS=16,
                                   BLOCK_H=triton.next_power_of_2(hidden), num_warps=8)  # H200: 19 us (8 x 4: 30)
    return out


if int8_kernels.IS_AVAILABLE:
    @triton.jit
    def _mean_pool_kernel(x_ptr, cu_ptr, out_ptr, g_ptr, b_ptr, eps, H, min_count, min_norm, NORM: tl.constexpr,
                          BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
        start = tl.load(cu_ptr + tl.program_id(0))
        end = tl.load(cu_ptr + tl.program_id(0) + 1)
        cols = tl.arange(0, BLOCK_H)
        if NORM:
            g = tl.load(g_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
        sums = tl.zeros((BLOCK_ROWS, BLOCK_H), dtype=tl.float32)
        for first in range(start, end, BLOCK_ROWS):
            rows = first + tl.arange(0, BLOCK_ROWS)
            inside = (rows[:, None] < end) & (cols[None, :] < H)
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * H + cols[None, :], mask=inside, other=0.0)
            if NORM:  # LayerNorm per row, rounded to x's dtype as a separate LayerNorm would store it
                y, _, _ = int8_kernels.layer_norm_rows(x.to(tl.float32), inside, g, b, H, eps)
                x = tl.where(inside, y.to(x.dtype), 0.0)
            sums += x.to(tl.float32)
        mean = tl.sum(sums, axis=0) / tl.maximum((end - start).to(tl.float32), min_count)  # [BLOCK_H]
        norm = tl.sqrt(tl.sum(mean * mean, axis=0))
        tl.store(out_ptr + tl.program_id(0) * H + cols, mean / tl.maximum(norm, min_norm), mask=cols < H)

# ---- Hugging Face weights -----------------------------------------------------------------------

def hf_state_dict(tensors: dict[str, torch.Tensor], shape: BertShape) -> dict[str, torch.Tensor]:
    """Our parameter names from a ``BertModel`` / ``BertForSequenceClassification`` state dict."""
    prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""
    t = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}
    state = {
        "word_embeddings.weight": t["embeddings.word_embeddings.weight"],
        "position_embeddings.weight": t["embeddings.position_embeddings.weight"],
        "token_type_embeddings.weight": t["embeddings.token_type_embeddings.weight"],
        "embed_norm.weight": t["embeddings.LayerNorm.weight"],
        "embed_norm.bias": t["embeddings.LayerNorm.bias"],
    }
    for i in range(shape.num_layers):
        src, dst = f"encoder.layer.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            state[dst + f"qkv.{kind}"] = torch.cat([t[src + f"attention.self.{n}.{kind}"]
                                                    for n in ("query", "key", "value")])
            state[dst + f"attn_out.{kind}"] = t[src + f"attention.output.dense.{kind}"]
            state[dst + f"attn_norm.{kind}"] = t[src + f"attention.output.LayerNorm.{kind}"]
            state[dst + f"up.{kind}"] = t[src + f"intermediate.dense.{kind}"]
            state[dst + f"down.{kind}"] = t[src + f"output.dense.{kind}"]
            state[dst + f"ffn_norm.{kind}"] = t[src + f"output.LayerNorm.{kind}"]
    if shape.num_labels:
        for kind in ("weight", "bias"):
            state[f"pooler.{kind}"] = t[f"pooler.dense.{kind}"]
            state[f"classifier.{kind}"] = tensors[f"classifier.{kind}"]
    return state


def load_packed_bert(checkpoint: str | Path, is_classifier: bool = False) -> PackedBert:
    """fp32 ``PackedBert`` on the CPU from a checkpoint directory (config.json + model.safetensors)."""
    checkpoint = Path(checkpoint)
    shape = BertShape.from_config(checkpoint / "config.json", is_classifier)
    model = PackedBert(shape)
    model.load_state_dict(hf_state_dict(load_file(checkpoint / "model.safetensors"), shape))
    return model.eval()
