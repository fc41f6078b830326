"""Create INT8 weights for the GPT engine, gated on held-out perplexity.

    python -m build.gpt_int8 [--model DIR] [--out DIR] [--mode w8a16|w8a8] [--max-ppl-increase 0.015]
                             [--kv-cache-dtype int8|auto] [--num-tokens 3072] [--window 1024] [--stride 512]

The offline half of the two verbs (the engine's loader is the other): from the fp32 checkpoint,

1. calibrate on CPython's ``pydoc_data`` prose (``build.text`` calibration split): per-input-channel
   activation maxima of every projection (SmoothQuant, w8a8) and per-head K/V maxima (INT8 KV);
2. quantize: per-output-channel symmetric int8 weights; for w8a8 first smooth with
   ``s = max|X|^alpha / max|W|^(1-alpha)`` (alpha 0.5);
3. gate: perplexity of fp32, the INT8 weights, fp32 weights with the INT8 KV cache, and both, on
   the held-out split (disjoint from calibration). Any INT8 figure above
   ``fp32 * (1 + max_ppl_increase)`` fails the build: non-zero exit, nothing written;
4. write ``--out``: the quantized state dict as safetensors, ``quantization.json`` (the manifest
   with the figures), and the source's config and tokenizer files. Serve it with
   ``EngineConfig(model=OUT, quantization="int8_weight_only" | "w8a8", kv_cache_dtype="int8")``.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from build.perplexity import held_out_token_ids, perplexity
from build.text import calibration_texts, fingerprint, passages
from trident.engine.attention import AttentionMetadata
from trident.engine.tokenizer import load_tokenizer
from trident.models.loader import load_model
from trident.models.quant import (INT8_MAX, QuantManifest, attention_modules, quantizable_linears,
                                  quantize_linears, save_quantized, set_kv_cache_scales, smoothing_factors)
from trident.models.weights import safetensors_files

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "model_repository" / "gpt" / "1" / "artifacts" / "smollm2-135m-instruct"
MODES = {"w8a16": "int8_weight_only", "w8a8": "w8a8"}
SMOOTHQUANT_ALPHA = 0.5
CALIBRATION_BLOCK = 16


@dataclass
class Calibration:
    """Maxima seen on the calibration text."""
    act_absmax: dict[str, torch.Tensor]   # linear name -> [in_features]
    kv_absmax: torch.Tensor               # [num_layers, 2, num_kv_heads]
    num_tokens: int


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    model_dir = Path(args.model)
    out = Path(args.out) if args.out else model_dir.with_name(f"{model_dir.name}-int8-{args.mode}")
    quantization = MODES[args.mode]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, torch.device("cpu"), torch.float32, max_positions=args.window)
    calib = calibrate(model, tokenizer, args.calibration_texts, args.window)
    print(f"[gpt_int8] calibrated on {calib.num_tokens} tokens of {args.calibration_texts} texts")
    quantized = quantize(model, quantization, calib, args.alpha)
    figures = gate_figures(model, quantized, calib, tokenizer, args)
    passed = report(figures, args.max_ppl_increase)
    print(f"[gpt_int8] {time.perf_counter() - t0:.0f} s")
    if not passed:
        print(f"[gpt_int8] FAILED: INT8 perplexity above fp32 x (1 + {args.max_ppl_increase}); nothing written",
              file=sys.stderr)
        return 1
    if args.kv_cache_dtype == "int8":
        set_kv_cache_scales(quantized, kv_scales(calib))
    manifest = QuantManifest(
        quantization=quantization, has_kv_cache_scales=args.kv_cache_dtype == "int8",
        source_model=str(model_dir), source_sha256=_source_sha256(model_dir),
        smoothquant_alpha=args.alpha if quantization == "w8a8" else None,
        perplexity=figures, max_ppl_increase=args.max_ppl_increase,
        calibration={"num_texts": args.calibration_texts, "num_tokens": calib.num_tokens,
                     "fingerprint": fingerprint(calibration_texts(args.calibration_texts)),
                     "held_out_tokens": args.num_tokens, "window": args.window, "stride": args.stride})
    write(quantized, model_dir, out, manifest)
    return 0


def calibrate(model: nn.Module, tokenizer, num_texts: int, max_len: int) -> Calibration:
    """Run the fp32 model over the calibration passages, recording input maxima of every
    projection (per channel) and of the new keys/values of every attention layer (per head)."""
    act_absmax: dict[str, torch.Tensor] = {}
    attns = attention_modules(model)
    kv_absmax = torch.zeros(len(attns), 2, attns[0].num_kv_heads)

    def linear_hook(name):
        def hook(_, inputs):
            m = inputs[0].detach().abs().amax(dim=0).float()  # [in_features]
            act_absmax[name] = m if name not in act_absmax else torch.maximum(act_absmax[name], m)
        return hook

    def attn_hook(i):
        def hook(_, inputs):
            _, key, value = inputs[:3]  # [num_tokens, num_kv_heads, head_dim] each
            for j, x in enumerate((key, value)):
                kv_absmax[i, j] = torch.maximum(kv_absmax[i, j], x.detach().abs().amax(dim=(0, 2)).float())
        return hook

    handles = [m.register_forward_pre_hook(linear_hook(n)) for n, m in quantizable_linears(model).items()]
    handles += [m.register_forward_pre_hook(attn_hook(i)) for i, m in enumerate(attns)]
    num_tokens = 0
    try:
        for text in passages(calibration_texts(num_texts), min_words=100):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_len]
            _forward(model, ids)
            num_tokens += len(ids)
    finally:
        for h in handles:
            h.remove()
    return Calibration(act_absmax=act_absmax, kv_absmax=kv_absmax, num_tokens=num_tokens)


def quantize(model: nn.Module, quantization: str, calib: Calibration, alpha: float) -> nn.Module:
    """A quantized copy of the fp32 model (w8a8: smoothed with the calibrated maxima first)."""
    quantized = copy.deepcopy(model)
    smooth = None
    if quantization == "w8a8":
        smooth = {name: smoothing_factors(calib.act_absmax[name], linear.weight.data, alpha)
                  for name, linear in quantizable_linears(quantized).items()}
    return quantize_linears(quantized, quantization, smooth)


def kv_scales(calib: Calibration) -> torch.Tensor:
    return calib.kv_absmax.clamp(min=1e-6) / INT8_MAX  # [num_layers, 2, num_kv_heads]


def gate_figures(model: nn.Module, quantized: nn.Module, calib: Calibration, tokenizer, args) -> dict[str, float]:
    """Held-out perplexity of fp32, INT8 weights, the INT8 KV cache alone and both together."""
    ids = held_out_token_ids(tokenizer, args.num_tokens)
    kv_dtype = torch.int8 if args.kv_cache_dtype == "int8" else None
    runs = [("fp32", model, None), (args.mode, quantized, None)]
    if kv_dtype is not None:
        runs += [("fp32+kv_int8", model, kv_dtype), (f"{args.mode}+kv_int8", quantized, kv_dtype)]
    figures = {}
    for name, m, dtype in runs:
        set_kv_cache_scales(m, kv_scales(calib) if dtype is not None else None)
        t0 = time.perf_counter()
        result = perplexity(m, ids, args.window, args.stride, dtype)
        figures[name] = result.perplexity
        print(f"[gpt_int8] perplexity {name:>16}: {result.perplexity:.4f} "
              f"({result.num_scored_tokens} held-out tokens, {time.perf_counter() - t0:.0f} s)", flush=True)
    set_kv_cache_scales(model, None)
    set_kv_cache_scales(quantized, None)
    return figures


def report(figures: dict[str, float], max_increase: float) -> bool:
    """Print every INT8 figure against the limit; True when all pass."""
    reference = figures["fp32"]
    limit = reference * (1 + max_increase)
    passed = True
    for name, value in figures.items():
        if name == "fp32":
            continue
        ok = value <= limit
        passed &= ok
        print(f"[gpt_int8] gate {name:>16}: {value:.4f} vs fp32 {reference:.4f} "
              f"({(value / reference - 1) * 100:+.2f}%, limit {limit:.4f}) {'PASS' if ok else 'FAIL'}")
    return passed


def write(model: nn.Module, model_dir: Path, out: Path, manifest: QuantManifest) -> None:
    """Swap in a complete directory (staging + rename): an interrupted run leaves no half model."""
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    skip = {p.name for p in safetensors_files(model_dir)} | {"model.safetensors.index.json", "manifest.json"}
    for path in model_dir.iterdir():
        if path.is_file() and path.name not in skip:
            shutil.copy2(path, staging / path.name)
    save_quantized(model, staging, manifest)
    for path in staging.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; the Triton server may run as another user
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"[gpt_int8] wrote {out} ({size:.1f} MiB, {manifest.quantization})")


def _forward(model: nn.Module, ids: list[int]) -> None:
    n = len(ids)
    shape = model.shape
    num_blocks = -(-n // CALIBRATION_BLOCK)
    kv_cache = torch.zeros(2, shape.num_layers, num_blocks, CALIBRATION_BLOCK, shape.num_kv_heads, shape.head_dim)
    metadata = AttentionMetadata.build(torch.arange(n), torch.arange(num_blocks)[None], [n], [n], CALIBRATION_BLOCK,
                                       use_kernels=False)
    with torch.inference_mode():
        model(torch.tensor(ids), torch.arange(n), kv_cache, metadata)


def _source_sha256(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in safetensors_files(model_dir):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="fp32 Hugging Face directory (safetensors)")
    p.add_argument("--out", default=None, help="output directory (default: <model>-int8-<mode> beside it)")
    p.add_argument("--mode", choices=sorted(MODES), default="w8a16")
    p.add_argument("--max-ppl-increase", type=float, default=0.015, help="relative perplexity increase allowed")
    p.add_argument("--kv-cache-dtype", choices=("int8", "auto"), default="int8",
                   help="int8: calibrate, gate and ship per-head KV cache scales")
    p.add_argument("--alpha", type=float, default=SMOOTHQUANT_ALPHA, help="SmoothQuant migration strength")
    p.add_argument("--calibration-texts", type=int, default=128, help="calibration sentences (build.text)")
    p.add_argument("--num-tokens", type=int, default=3072, help="held-out tokens scored")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
