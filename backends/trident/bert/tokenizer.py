"""Tokenization with Hugging Face ``tokenizers`` (the checkpoint's tokenizer.json), no transformers.

Texts are encoded once, truncated but unpadded, so the encoder can sort them by length before
padding each micro-batch to its own longest member. Tokenization is on the serving path (Triton
hands the model strings): it costs about as much as BERT-base's fp16 forward on the GPU
(loadtest/bench_bert.py), so it uses ``encode_batch_fast``, which skips the character offsets
nothing here reads (~20% faster; same ids and type ids).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

PAD_TOKENS = ("[PAD]", "<pad>")


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
        # tokenizers < 0.20.2 has no encode_batch_fast
        self._encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)

    @classmethod
    def from_file(cls, path: str | Path, max_length: int) -> "TextTokenizer":
        return cls(Tokenizer.from_file(str(path)), max_length)

    def encode(self, texts: list[str]) -> list[Encoding]:
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{index}] must be str, got {type(text).__name__}")
        return self._encode_batch(texts, add_special_tokens=True)

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


def _pad_id(tokenizer: Tokenizer) -> int:
    if tokenizer.padding is not None:
        return int(tokenizer.padding["pad_id"])
    for token in PAD_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return 0  # masked out by attention_mask; any valid id will do
