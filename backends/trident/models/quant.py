"""INT8 quantization of the decoder models: the runtime half of gpt-fast's two verbs.

``build/gpt_int8.py`` *creates* quantized weights offline (calibration, SmoothQuant, a perplexity
gate) and saves them with :func:`save_quantized`; the loader *loads* them here, into modules that
:func:`quantize_linears` swaps in for ``nn.Linear``. Schemes (vLLM's names):

* ``int8_weight_only`` (W8A16): symmetric per-output-channel int8 weights, dequantized inside the
  matmul: on CUDA a Triton kernel (``int8_kernels``), elsewhere dequantize-then-matmul (correct,
  not fast: CPU speed is not the goal). Activations stay in the model dtype.
* ``w8a8``: SmoothQuant-smoothed weights in int8 per output channel, activations quantized per
  token at run time, int8 x int8 -> int32 GEMM: on CUDA Triton kernels (a fused smooth + quantize,
  then a GEMM with both rescales in its epilogue), elsewhere ``torch._int_mm``.
* INT8 KV cache: static per-(layer, KV head) scales calibrated on real text; keys/values are
  stored in an int8 cache and dequantized where attention reads them.

Embeddings, norms and the LM head stay in the model dtype: the head is one matmul per sampled row
and the tied embedding is shared with it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trident.engine.config import QUANTIZATIONS
from trident.models import int8_kernels

MANIFEST = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
INT8_MAX = 127
# torch._int_mm on CUDA needs more than 16 rows (and K, N multiples of 8); smaller batches are padded.
INT_MM_MIN_ROWS = 17


@dataclass(frozen=True)
class QuantManifest:
    """What a quantized model directory holds, written next to its weights by the build step."""
    quantization: str                      # "int8_weight_only" | "w8a8"
    has_kv_cache_scales: bool
    source_model: str = ""
    source_sha256: str = ""
    smoothquant_alpha: float | None = None
    perplexity: dict = field(default_factory=dict)   # config name -> held-out perplexity
    max_ppl_increase: float | None = None
    calibration: dict = field(default_factory=dict)  # texts, tokens, fingerprint

    def save(self, model_dir: str | Path) -> None:
        (Path(model_dir) / MANIFEST).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, model_dir: str | Path) -> "QuantManifest | None":
        path = Path(model_dir) / MANIFEST
        return cls(**json.loads(path.read_text())) if path.is_file() else None


# ---- the arithmetic ---------------------------------------------------------------------------

def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: ``weight ≈ qweight * scale[:, None]``.

    weight [out, in] -> (qweight int8 [out, in], scale fp32 [out]). Rounding error is at most
    ``scale / 2`` per element, i.e. ``absmax(row) / 254``.
    """
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / INT8_MAX  # [out]
    qweight = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)  # [out, in]
    return qweight, scale


def dequantize_per_channel(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (qweight.to(torch.float32) * scale[:, None].float()).to(dtype)  # [out, in]


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row: x [tokens, in] -> (int8 [tokens, in], fp32 scale [tokens, 1])."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / INT8_MAX  # [tokens, 1]
    return torch.round(x / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``.

    ``x @ W.T == (x / s) @ (W * s).T`` exactly before rounding, and moves the outlier channels'
    range from the activations (quantized per token, where outliers hurt) into the weights.
    act_absmax [in]; weight [out, in] -> s [in].
    """
    w_absmax = weight.float().abs().amax(dim=0).clamp(min=1e-5)  # [in]
    s = act_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.pow(1 - alpha)
    return s.clamp(min=1e-5)


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [tokens, kv_heads, head_dim] with a static per-head scale [kv_heads] -> int8."""
    return torch.round(x.float() / scale[:, None].float()).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [..., kv_heads, head_dim] int8 -> dtype, per-head ``scale`` [kv_heads]."""
    return (q.to(dtype) * scale[:, None].to(dtype))


# ---- the modules ------------------------------------------------------------------------------

def _shaped_like(cls, linear: nn.Linear):
    """A new quantized `cls` with `linear`'s sizes and dtype, its bias copied; the weight is the caller's."""
    module = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype)
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return module


class Int8WeightOnlyLinear(nn.Module):
    """W8A16: ``y = x @ (qweight * scale).T + bias`` with the weight kept in int8."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))  # [out, in]
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype))  # [out]
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8WeightOnlyLinear":
        module = _shaped_like(cls, linear)
        qweight, scale = quantize_per_channel(linear.weight.data)
        module.weight = qweight
        module.weight_scale = scale.to(linear.weight.dtype)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # [tokens, in]
        if int8_kernels.supports(rows):
            out = int8_kernels.w8a16_matmul(rows, self.weight, self.weight_scale)  # [tokens, out]
        else:
            # torch._weight_int8pack_mm measured 25x slower than this on CPU (torch 2.13, M=512) and
            # 10-100x slower than bf16 on the H100 (torch 2.11): dequantize, then one GEMM.
            out = F.linear(rows, self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None])
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8 weights"


class Int8Linear(nn.Module):
    """W8A8 (SmoothQuant): per-token int8 activations x per-channel int8 weights, int32 accumulate.

    ``weight`` is stored [out, in] row-major so that ``weight.t()`` — the second operand of
    ``torch._int_mm`` — is column-major, the layout the fast H100 int8 GEMM wants.
    ``inv_smooth`` [in] divides the activations by the SmoothQuant factors (folded into the weight).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))  # [out, in]
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32))  # [out]
        self.register_buffer("inv_smooth", torch.empty(in_features, dtype=dtype))  # [in]
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, smooth: torch.Tensor | None = None) -> "Int8Linear":
        module = _shaped_like(cls, linear)
        device = linear.weight.device
        smooth = torch.ones(linear.in_features, device=device) if smooth is None else smooth.float().to(device)
        qweight, scale = quantize_per_channel(linear.weight.data.float() * smooth[None, :])
        module.weight, module.weight_scale = qweight, scale
        module.inv_smooth = (1.0 / smooth).to(linear.weight.dtype)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # [tokens, in]
        if int8_kernels.supports(rows):
            # Two launches: fused smooth + quantize, then the int8 GEMM with the rescale in its epilogue.
            qx, x_scale = int8_kernels.quantize_rows(rows, self.inv_smooth)  # [tokens, in] int8, [tokens, 1]
            out = int8_kernels.w8a8_matmul(qx, x_scale, self.weight, self.weight_scale, x.dtype)
        else:
            qx, x_scale = quantize_per_token(rows * self.inv_smooth)  # [tokens, in] int8, [tokens, 1]
            acc = int8_matmul(qx, self.weight)  # [tokens, out] int32
            out = (acc.float() * x_scale * self.weight_scale).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, w8a8"


def int8_matmul(qx: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """qx [M, K] int8 @ qweight [N, K] int8 .T -> [M, N] int32, padding M where ``_int_mm`` needs it."""
    num_rows = qx.shape[0]
    if qx.is_cuda and num_rows < INT_MM_MIN_ROWS:
        qx = F.pad(qx, (0, 0, 0, INT_MM_MIN_ROWS - num_rows))  # [17, K]
    return torch._int_mm(qx, qweight.t())[:num_rows]  # [M, N]


# ---- whole models -----------------------------------------------------------------------------

def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder layers' projections (qualified name -> module); the LM head is left alone."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not name.endswith("lm_head")}


def quantize_linears(model: nn.Module, quantization: str, smooth: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Swap every quantizable ``nn.Linear`` of ``model`` for its int8 module, in place.

    Works on the meta device too (then the int8 buffers are placeholders to be loaded).
    ``smooth``: SmoothQuant factors per linear name (w8a8 only; missing names get none).
    """
    if quantization not in QUANTIZATIONS[1:]:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS[1:]}, got {quantization!r}")
    for name, linear in quantizable_linears(model).items():
        if linear.weight.is_meta:
            cls = Int8WeightOnlyLinear if quantization == "int8_weight_only" else Int8Linear
            new = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype)
        elif quantization == "int8_weight_only":
            new = Int8WeightOnlyLinear.from_linear(linear)
        else:
            new = Int8Linear.from_linear(linear, (smooth or {}).get(name))
        _set_submodule(model, name, new)
    return model


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's ``PagedAttention`` modules, in layer order."""
    from trident.models.layers import PagedAttention

    return [m for m in model.modules() if isinstance(m, PagedAttention)]


def set_kv_cache_scales(model: nn.Module, scales: torch.Tensor | None) -> None:
    """scales [num_layers, 2, num_kv_heads] (keys, values), or None for a cache in the model dtype."""
    for i, attn in enumerate(attention_modules(model)):
        attn.set_kv_scales(None if scales is None else scales[i])


def kv_cache_scales(model: nn.Module) -> torch.Tensor | None:
    modules = attention_modules(model)
    if any(m.kv_scales is None for m in modules):
        return None
    return torch.stack([m.kv_scales for m in modules])  # [num_layers, 2, num_kv_heads]


def save_quantized(model: nn.Module, out_dir: str | Path, manifest: QuantManifest) -> None:
    """Write the quantized state dict (our module names) and the manifest into ``out_dir``."""
    from safetensors.torch import save_file

    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    scales = kv_cache_scales(model)
    if scales is not None:
        state["kv_cache_scales"] = scales.float().contiguous()
    save_file(state, str(Path(out_dir) / WEIGHTS_FILE), metadata={"format": "pt", "quantization": manifest.quantization})
    manifest.save(out_dir)


def load_quantized_state(model: nn.Module, model_dir: str | Path, kv_cache_dtype: str) -> None:
    """Fill a model already swapped by :func:`quantize_linears` from ``model_dir``, strictly."""
    from safetensors.torch import load_file

    state = load_file(str(Path(model_dir) / WEIGHTS_FILE), device="cpu")
    scales = state.pop("kv_cache_scales", None)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    if missing or unknown:
        raise ValueError(f"quantized checkpoint {model_dir} does not match the model: "
                         f"missing {missing[:5]}, unknown {unknown[:5]}")
    for name, target in expected.items():
        source = state[name]
        if tuple(source.shape) != tuple(target.shape):
            raise ValueError(f"shape mismatch for {name}: model {tuple(target.shape)}, checkpoint {tuple(source.shape)}")
        # int8 weights stay int8; float tensors take the model's (or buffer's) dtype.
        target.copy_(source.to(target.dtype))
    if kv_cache_dtype == "int8":
        if scales is None:
            raise ValueError(f"kv_cache_dtype='int8' needs calibrated KV scales; {model_dir} has none "
                             "(rebuild with `python -m build.gpt_int8`)")
        set_kv_cache_scales(model, scales.to(next(model.parameters()).device))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type for the config's ``kv_cache_dtype``."""
    return torch.int8 if kv_cache_dtype == "int8" else model_dtype
