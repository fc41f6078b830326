"""From a Hugging Face model directory to one of our models, on a device, in a dtype.

The architecture is picked from ``config.json``'s ``model_type``; the module is built on the meta
device (no throw-away random init), materialised on the target device and filled from the
safetensors files by name. Pickled checkpoints are never read.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from trident.models.gpt2 import GPT2LMHeadModel
from trident.models.llama import LlamaForCausalLM
from trident.models.quant import QuantManifest, load_quantized_state, quantize_linears
from trident.models.weights import iter_safetensors

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "gpt2": GPT2LMHeadModel,
}


def load_hf_config(model_dir: str | Path):
    """The model's ``config.json`` through transformers, which normalises legacy RoPE fields."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir))


def model_class(hf_config) -> type[nn.Module]:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


def load_model(model_dir: str | Path, device: torch.device, dtype: torch.dtype,
               max_positions: int | None = None, hf_config=None, quantization: str | None = None,
               kv_cache_dtype: str = "auto") -> nn.Module:
    """Build the model for ``model_dir`` and load its weights. ``max_positions`` bounds the RoPE table.

    ``quantization`` (vLLM's names): a directory written by ``build/gpt_int8.py`` (it has a
    ``quantization.json``) is loaded as the int8 modules it holds, and must name the same scheme;
    ``int8_weight_only`` on a plain checkpoint quantizes it while loading (no calibration needed).
    ``kv_cache_dtype="int8"`` needs the calibrated KV scales that only a built directory has.
    """
    hf_config = hf_config if hf_config is not None else load_hf_config(model_dir)
    manifest = QuantManifest.read(model_dir)
    _check_quantization(model_dir, manifest, quantization, kv_cache_dtype)
    cls = model_class(hf_config)
    with torch.device("meta"), _default_dtype(dtype):
        model = cls.from_hf_config(hf_config, max_positions)
        if manifest is not None:
            quantize_linears(model, manifest.quantization)
    model = model.to_empty(device=device)
    if manifest is not None:
        load_quantized_state(model, model_dir, kv_cache_dtype)
    else:
        model.load_weights(iter_safetensors(model_dir))
        if quantization is not None:
            quantize_linears(model, quantization)
    return model.eval().requires_grad_(False)


def _check_quantization(model_dir, manifest: QuantManifest | None, quantization: str | None,
                        kv_cache_dtype: str) -> None:
    if manifest is not None and manifest.quantization != quantization:
        raise ValueError(f"{model_dir} holds {manifest.quantization} weights; set quantization="
                         f"{manifest.quantization!r} (got {quantization!r})")
    if manifest is None and quantization == "w8a8":
        raise ValueError(f"quantization='w8a8' needs SmoothQuant-calibrated weights: run "
                         f"`python -m build.gpt_int8 --mode w8a8 --model {model_dir}` and serve its output")
    if manifest is None and kv_cache_dtype == "int8":
        raise ValueError(f"kv_cache_dtype='int8' needs calibrated KV scales: serve the output of "
                         f"`python -m build.gpt_int8 --model {model_dir}`")


def read_eos_token_ids(model_dir: str | Path, hf_config=None) -> list[int]:
    """End-of-sequence ids: generation_config.json first (chat models list several), else config.json."""
    eos = None
    generation_config = Path(model_dir) / "generation_config.json"
    if generation_config.is_file():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
    if eos is None:
        hf_config = hf_config if hf_config is not None else load_hf_config(model_dir)
        eos = getattr(hf_config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
