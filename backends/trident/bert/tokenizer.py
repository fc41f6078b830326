"""Tokenization with Hugging Face ``tokenizers`` (the checkpoint's tokenizer.json), no transformers.

Texts are encoded once, truncated but unpadded, so the encoder can sort them by length before
padding each micro-batch to its own longest member. Tokenization is on the serving path (Triton
hands the model strings): it costs about as much as BERT-base's fp16 forward on the GPU
(loadtest/bench_bert.py), so it uses ``encode_batch_fast``, which skips the character offsets
nothing here reads (~20% faster; same ids and type ids).

Most of what is left is the ``BertNormalizer``: it tracks an alignment per character through
cleaning, lowercasing and accent stripping (NFD). On printable ASCII (tab, newline and carriage
return allowed) all of that reduces to ``str.lower()`` (or nothing, for cased models), so such
texts are lowercased here and encoded by a copy of the tokenizer without a normalizer: the same
ids, ~40% less time per text. Texts that contain an added token's content (``[MASK]``...: those
are matched before normalization) or anything else take the full tokenizer.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

PAD_TOKENS = ("[PAD]", "<pad>")
# ASCII control characters BertNormalizer deletes (tab, newline and carriage return count as whitespace).
ASCII_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class TokenBatch:
    """Padded model inputs of one micro-batch, all int64 ``[batch, seq]`` (ONNX BERT input types)."""
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray

    def feeds(self, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """The model's inputs by name (a model without token types simply does not ask for them)."""
        return {name: getattr(self, name) for name in names}


class TextTokenizer:
    """Truncates to ``max_length`` tokens, special tokens included (texts longer are cut at the end)."""

    def __init__(self, tokenizer: Tokenizer, max_length: int) -> None:
        self.pad_id = _pad_id(tokenizer)
        self.max_length = max_length
        tokenizer.no_padding()  # checkpoints often ship fixed-length padding in tokenizer.json
        tokenizer.enable_truncation(max_length=max_length)
        self._tokenizer = tokenizer
        self._ascii = AsciiPath.of(tokenizer)


    @classmethod
    def from_file(cls, path: str | Path, max_length: int) -> "TextTokenizer":
        return cls(Tokenizer.from_file(str(path)), max_length)

    def encode(self, texts: list[str]) -> list[Encoding]:
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{index}] must be str, got {type(text).__name__}")
        if self._ascii is None:
            return _encode_batch(self._tokenizer, texts)
        return self._ascii.encode(texts, self._tokenizer)

    def pad(self, encodings: list[Encoding]) -> TokenBatch:
        """Right-pads to the longest encoding (at least one position, so an empty batch row is valid)."""
        seq_len = max([1] + [len(e.ids) for e in encodings])
        input_ids = np.full((len(encodings), seq_len), self.pad_id, dtype=np.int64)  # [batch, seq]
        attention_mask = np.zeros((len(encodings), seq_len), dtype=np.int64)         # [batch, seq]
        token_type_ids = np.zeros((len(encodings), seq_len), dtype=np.int64)         # [batch, seq]
        for row, encoding in enumerate(encodings):
            length = len(encoding.ids)
            input_ids[row, :length] = encoding.ids
            attention_mask[row, :length] = 1
            token_type_ids[row, :length] = encoding.type_ids
        return TokenBatch(input_ids, attention_mask, token_type_ids)


class AsciiPath:
    """BertNormalizer's work done by ``str.lower()`` for the texts where that is exact (module doc)."""

    def __init__(self, tokenizer: Tokenizer, lowercase: bool) -> None:
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())  # truncation and no-padding included
        self.tokenizer.normalizer = None
        self.lowercase = lowercase
        self.added = tuple(token.content for token in tokenizer.get_added_tokens_decoder().values())

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> "AsciiPath | None":
        normalizer = json.loads(tokenizer.to_str()).get("normalizer") or {}
        if normalizer.get("type") != "BertNormalizer":
            return None
        return cls(tokenizer, lowercase=bool(normalizer.get("lowercase", True)))

    def prepare(self, text: str) -> str | None:
        """``text`` as the normalizer would leave it, or None where the full tokenizer must run."""
        if not text.isascii() or ASCII_CONTROL.search(text):
            return None
        normalized = text.lower() if self.lowercase else text
        if any(token in text or token in normalized for token in self.added):
            return None
        return normalized

    def encode(self, texts: list[str], full: Tokenizer) -> list[Encoding]:
        prepared = [self.prepare(text) for text in texts]
        fast = [index for index, text in enumerate(prepared) if text is not None]
        if len(fast) == len(texts):
            return _encode_batch(self.tokenizer, prepared)
        encodings = [None] * len(texts)
        for index, encoding in zip(fast, _encode_batch(self.tokenizer, [prepared[i] for i in fast])):
            encodings[index] = encoding
        slow = [index for index, text in enumerate(prepared) if text is None]
        for index, encoding in zip(slow, _encode_batch(full, [texts[i] for i in slow])):
            encodings[index] = encoding
        return encodings


def _encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list[Encoding]:
    if not texts:
        return []
    # tokenizers < 0.20.2 has no encode_batch_fast
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return encode_batch(texts, add_special_tokens=True)


def _pad_id(tokenizer: Tokenizer) -> int:
    if tokenizer.padding is not None:
        return int(tokenizer.padding["pad_id"])
    for token in PAD_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return 0  # masked out by attention_mask; any valid id will do
