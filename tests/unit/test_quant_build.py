"""build/gpt_int8.py end to end: the perplexity gate, the artifacts it writes, and the engine
serving them. Tiny random models for speed; the real SmolLM2 build once, marked slow."""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

from build import gpt_int8
from build.perplexity import held_out_token_ids, perplexity
from build.text import calibration_texts, held_out_texts
from trident.engine.engine import LLM
from trident.engine.sampling_params import SamplingParams
from trident.engine.tokenizer import load_tokenizer
from trident.models.loader import load_model
from trident.models.quant import Int8Linear, QuantManifest
from trident.models.testing import save_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
REAL_MODEL = ROOT / "model_repository" / "gpt" / "1" / "artifacts" / "smollm2-135m-instruct"
TINY_ARGS = ["--num-tokens", "384", "--window", "128", "--stride", "64", "--calibration-texts", "16"]


def run_build(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = gpt_int8.main(list(argv))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def w8a8_build(tiny_dir, tmp_path_factory) -> tuple[Path, int, str]:
    out = tmp_path_factory.mktemp("built") / "w8a8"
    code, log = run_build("--model", str(tiny_dir), "--out", str(out), "--mode", "w8a8", *TINY_ARGS)
    return out, code, log


def test_gate_fails_the_build_when_the_threshold_is_unreachable(tiny_dir, tmp_path):
    out = tmp_path / "never"
    code, log = run_build("--model", str(tiny_dir), "--out", str(out), "--max-ppl-increase", "-1",
                          "--kv-cache-dtype", "auto", *TINY_ARGS)
    assert code != 0
    assert "FAILED" in log and "perplexity" in log
    fp32, int8 = (float(line.split(":")[1].split()[0]) for line in log.splitlines()
                  if line.startswith("[gpt_int8] perplexity"))
    assert math.isfinite(fp32) and math.isfinite(int8)  # both figures printed
    assert not out.exists() and not out.with_name("never.partial").exists()


def test_w8a8_build_passes_writes_artifacts_and_the_engine_serves_them(w8a8_build):
    out, code, log = w8a8_build
    assert code == 0, log
    manifest = QuantManifest.read(out)
    assert manifest.quantization == "w8a8" and manifest.has_kv_cache_scales
    assert set(manifest.perplexity) == {"fp32", "w8a8", "fp32+kv_int8", "w8a8+kv_int8"}
    limit = manifest.perplexity["fp32"] * 1.015
    assert all(v <= limit for v in manifest.perplexity.values())
    assert {"config.json", "tokenizer.json", "model.safetensors", "quantization.json"} <= {p.name for p in out.iterdir()}
    llm = LLM(str(out), device="cpu", dtype="float32", max_model_len=128, quantization="w8a8", kv_cache_dtype="int8")
    assert llm.engine.runner.kv_cache.dtype == torch.int8
    assert isinstance(llm.engine.runner.model.layers[0].mlp.down_proj, Int8Linear)
    [result] = llm.generate(["The assert statement"], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert len(result.output_token_ids) == 8


def test_manifest_figures_are_reproduced_by_the_loaded_artifacts(w8a8_build, tiny_dir):
    """What the engine loads from disk measures what the gate measured in memory."""
    out, code, _ = w8a8_build
    assert code == 0
    manifest = QuantManifest.read(out)
    ids = held_out_token_ids(load_tokenizer(tiny_dir), 384)
    model = load_model(out, torch.device("cpu"), torch.float32, max_positions=128, quantization="w8a8",
                       kv_cache_dtype="int8")
    measured = perplexity(model, ids, window=128, stride=64, kv_cache_dtype=torch.int8).perplexity
    assert measured == pytest.approx(manifest.perplexity["w8a8+kv_int8"], rel=1e-5)


def test_a_built_directory_refuses_a_different_scheme(w8a8_build):
    out, code, _ = w8a8_build
    assert code == 0
    with pytest.raises(ValueError, match="holds w8a8 weights"):
        load_model(out, torch.device("cpu"), torch.float32, quantization="int8_weight_only")


def test_calibration_and_held_out_text_are_disjoint():
    assert not set(calibration_texts(128)) & set(held_out_texts(400))


def test_perplexity_windows_score_every_token_once(tiny_dir):
    """Overlapping windows and one window over the same tokens agree when the window covers all."""
    model = load_model(tiny_dir, torch.device("cpu"), torch.float32)
    ids = held_out_token_ids(load_tokenizer(tiny_dir), 100)
    whole = perplexity(model, ids, window=128, stride=128)
    strided = perplexity(model, ids, window=64, stride=16)
    assert whole.num_scored_tokens == strided.num_scored_tokens == 99
    # Less context per token can only be scored differently, never skipped or double counted.
    assert strided.perplexity != whole.perplexity
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.inference_mode():
        loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert whole.perplexity == pytest.approx(math.exp(loss), rel=1e-4)


@pytest.mark.slow
def test_real_smollm2_w8a16_build_passes_the_gate(tmp_path):
    if not (REAL_MODEL / "model.safetensors").is_file():
        pytest.fail("the gpt model is not built: run `python -m build.gpt_convert`")
    out = tmp_path / "smollm2-int8"
    code, log = run_build("--model", str(REAL_MODEL), "--out", str(out), "--mode", "w8a16")
    print(log)
    assert code == 0, log
    figures = json.loads((out / "quantization.json").read_text())["perplexity"]
    assert 5 < figures["fp32"] < 100  # real prose under a real model, not noise
    assert all(v <= figures["fp32"] * 1.015 for v in figures.values())
    llm = LLM(str(out), device="cpu", dtype="float32", max_model_len=256, quantization="int8_weight_only",
              kv_cache_dtype="int8")
    [result] = llm.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=4))
    assert "Paris" in result.text
