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
               max_positions: int | None = None, hf_config=None) -> nn.Module:
    """Build the model for ``model_dir`` and load its weights. ``max_positions`` bounds the RoPE table."""
    hf_config = hf_config if hf_config is not None else load_hf_config(model_dir)
    cls = model_class(hf_config)
    with torch.device("meta"), _default_dtype(dtype):
        model = cls.from_hf_config(hf_config, max_positions)
    model = model.to_empty(device=device)
    model.load_weights(iter_safetensors(model_dir))
    return model.eval().requires_grad_(False)


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
