"""build/gpt_convert.py: hash pinning, idempotency, and the real SmolLM2 conversion (slow)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from build import gpt_convert
from build.gpt_convert import GGUF_NAME, GGUF_SHA256, convert, is_up_to_date, smollm2_gguf_path
from build.weights import WeightsError, sha256_file


def fake_output(out: Path, source_sha: str) -> Path:
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"weights")
    gpt_convert._write_manifest(out, Path(GGUF_NAME), source_sha)
    return out


def test_packaged_gguf_is_found_and_matches_the_pinned_hash():
    gguf = smollm2_gguf_path()
    assert gguf.name == GGUF_NAME and gguf.is_file()
    assert sha256_file(gguf) == GGUF_SHA256


def test_a_tampered_gguf_is_refused(tmp_path):
    gguf = tmp_path / GGUF_NAME
    gguf.write_bytes(b"not the model")
    with pytest.raises(WeightsError, match="does not match the pinned"):
        convert(gguf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_manifest_decides_whether_the_output_is_up_to_date(tmp_path):
    out = fake_output(tmp_path / "out", "abc")
    assert is_up_to_date(out, "abc")
    assert not is_up_to_date(out, "other source")
    (out / "model.safetensors").write_bytes(b"edited")
    assert not is_up_to_date(out, "abc")
    assert not is_up_to_date(tmp_path / "missing", "abc")


def test_an_up_to_date_output_is_left_alone(tmp_path, capsys):
    out = fake_output(tmp_path / "out", GGUF_SHA256)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert convert(smollm2_gguf_path(), out) is False
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert "up to date" in capsys.readouterr().out


@pytest.fixture(scope="session")
def converted() -> Path:
    return gpt_convert.main(["--no-check"])


@pytest.mark.slow
def test_conversion_writes_a_plain_safetensors_llama(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    assert json.loads((converted / "generation_config.json").read_text())["eos_token_id"] == 2
    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["source_sha256"] == GGUF_SHA256 and "model.safetensors" in manifest["files"]
    with safe_open(str(converted / "model.safetensors"), framework="pt") as f:
        assert "model.layers.29.mlp.down_proj.weight" in f.keys()
    assert not list(converted.glob("*.bin")) and not list(converted.glob("*.gguf"))
    assert gpt_convert.main(["--no-check"]) == converted  # second run: manifest hashes match, no work


@pytest.mark.slow
def test_converted_model_says_paris_with_hugging_face(converted):
    assert gpt_convert.sanity_check(converted).startswith(" Paris.")
