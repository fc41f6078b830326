"""Tokenization with Hugging Face ``tokenizers`` (the checkpoint's tokenizer.json), no transformers.

Texts are encoded once, truncated but unpadded, so the encoder can sort them by length before
padding each micro-batch to its own longest member. Tokenization is on the serving path (Triton
hands the model strings), and on the H200 host one 128-token text took ~0.35 ms through
``tokenizers`` — half of BERT-base's batch-1 forward — so printable-ASCII texts take shortcuts
that give the same ids:

- ``BertNormalizer`` tracks an alignment per character through cleaning, lowercasing and accent
  stripping (NFD). On printable ASCII (tab, newline and carriage return allowed) all of that is
  ``str.lower()`` (or nothing, for cased models): such texts are lowercased here and encoded by a
  copy of the tokenizer without a normalizer (~40% less time). Texts containing an added token's
  content (``[MASK]``...: matched before normalization) or anything else take the full tokenizer.
- Small batches (the batch-1 serving path) skip ``tokenizers`` altogether: ``BertPreTokenizer`` on
  ASCII is one regular expression (runs of letters and digits; every other visible character
  alone), and each word's WordPiece ids come from a cache filled by the tokenizer's own WordPiece
  model (``WordCache``): ~2x faster again. Large batches stay in ``tokenizers``, whose
  ``encode_batch_fast`` spreads them over all cores (and skips the character offsets nothing
  here reads).
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
# BertPreTokenizer on ASCII without control characters: whitespace splits, and every visible
# character that is not a letter or digit is punctuation, a token of its own.
ASCII_WORDS = re.compile(r"[A-Za-z0-9]+|\S")
# Batches up to this many texts take WordCache (one core, ~0.1 ms a text on the H200 host), larger
# ones tokenizers' encode_batch_fast (all cores; its fixed cost is paid back from a few texts on).
MAX_WORD_CACHE_TEXTS = 4
MAX_CACHED_WORDS = 1 << 17  # chunks; a few tens of MB at most, back to the vocabulary's words when full


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

    def encode(self, texts: list[str]) -> list[Encoding | Tokens]:
        """Each text's ids and token types (``.ids``, ``.type_ids``, ``len``), in order."""
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{index}] must be str, got {type(text).__name__}")
        if self._ascii is None:
            return _encode_batch(self._tokenizer, texts)
        prepared = [self._ascii.prepare(text) for text in texts]
        fast = [index for index, text in enumerate(prepared) if text is not None]
        if len(fast) == len(texts):
            return self._ascii.encode(prepared)
        encodings: list = [None] * len(texts)
        for index, encoding in zip(fast, self._ascii.encode([prepared[i] for i in fast])):
            encodings[index] = encoding
        slow = [index for index, text in enumerate(prepared) if text is None]
        for index, encoding in zip(slow, _encode_batch(self._tokenizer, [texts[i] for i in slow])):
            encodings[index] = encoding
        return encodings

    def pad(self, encodings: list[Encoding | Tokens]) -> TokenBatch:
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


class Tokens:
    """One text's ids and token types, unpadded: what ``WordCache`` builds instead of an ``Encoding``
    (the same ``ids``, ``type_ids`` and ``len``)."""

    __slots__ = ("ids", "type_ids")

    def __init__(self, ids: list[int], type_ids: list[int]) -> None:
        self.ids = ids
        self.type_ids = type_ids

    def __len__(self) -> int:
        return len(self.ids)


class AsciiPath:
    """BertNormalizer's work done by ``str.lower()`` for the texts where that is exact (module doc)."""

    def __init__(self, tokenizer: Tokenizer, lowercase: bool) -> None:
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())  # truncation and no-padding included
        self.tokenizer.normalizer = None
        self.lowercase = lowercase
        self.added = tuple(token.content for token in tokenizer.get_added_tokens_decoder().values())
        self.words = WordCache.of(self.tokenizer)

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

    def encode(self, texts: list[str]) -> list[Encoding | Tokens]:
        """``prepare``d texts: through ``WordCache`` when few, else ``tokenizers`` on all cores."""
        if self.words is not None and len(texts) <= MAX_WORD_CACHE_TEXTS:
            return [self.words.encode(text) for text in texts]
        return _encode_batch(self.tokenizer, texts)


class WordCache:
    """A normalizer-free BERT tokenizer's output for ASCII text, built from cached WordPiece ids of
    whitespace-separated chunks: ``BertPreTokenizer`` splits a chunk as ``ASCII_WORDS`` does, the
    tokenizer's own WordPiece model gives each piece's ids once, and truncation and the special
    tokens follow the tokenizer's settings (the same ids as ``tokenizer.encode``:
    tests/unit/test_bert_tokenizer_ascii.py)."""

    def __init__(self, tokenizer: Tokenizer, prefix: Tokens, suffix: Tokens, type_id: int,
                 max_input_chars_per_word: int) -> None:
        self.model = tokenizer.model
        self.max_body = tokenizer.truncation["max_length"] - len(prefix) - len(suffix)
        self.prefix, self.suffix, self.type_id = prefix, suffix, type_id
        # WordPiece takes the longest vocabulary entry that starts a word: a word that is an entry
        # is that one token. So the cache starts with every entry that is a chunk of its own, and a
        # fresh instance (or text made of common words) asks the model only for the rest.
        self.vocabulary_words = {word: [token_id] for word, token_id in tokenizer.get_vocab().items()
                                 if word.isascii() and len(word) <= max_input_chars_per_word
                                 and ASCII_WORDS.fullmatch(word)}
        self.pieces: dict[str, list[int]] = dict(self.vocabulary_words)

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> "WordCache | None":
        """None unless the tokenizer is WordPiece behind BertPreTokenizer, truncating on the right
        and wrapping one sequence in special tokens (BERT's [CLS] ... [SEP])."""
        config = json.loads(tokenizer.to_str())
        truncation = tokenizer.truncation or {}
        if (config["model"].get("type") != "WordPiece" or (config.get("pre_tokenizer") or {}).get("type")
                != "BertPreTokenizer" or truncation.get("direction", "right") != "right"
                or truncation.get("stride", 0) != 0 or not truncation.get("max_length")):
            return None
        probe = tokenizer.encode("a", add_special_tokens=True)  # [CLS] a [SEP]: where the text goes
        body = [i for i, special in enumerate(probe.special_tokens_mask) if not special]
        if len(body) != 1:
            return None
        at = body[0]
        prefix = Tokens(probe.ids[:at], probe.type_ids[:at])
        suffix = Tokens(probe.ids[at + 1:], probe.type_ids[at + 1:])
        return cls(tokenizer, prefix, suffix, probe.type_ids[at], config["model"].get("max_input_chars_per_word", 100))

    def encode(self, text: str) -> Tokens:
        pieces = self.pieces
        if len(pieces) > MAX_CACHED_WORDS:
            pieces.clear()
            pieces.update(self.vocabulary_words)
        ids = list(self.prefix.ids)
        for chunk in text.split():  # whitespace-separated chunks repeat as they are ("food.", "the")
            chunk_ids = pieces.get(chunk)
            if chunk_ids is None:
                chunk_ids = pieces[chunk] = self._wordpiece(chunk)
            ids += chunk_ids
        if len(ids) - len(self.prefix) > self.max_body:
            del ids[len(self.prefix) + self.max_body:]
        ids += self.suffix.ids
        body = len(ids) - len(self.prefix) - len(self.suffix)
        return Tokens(ids, self.prefix.type_ids + [self.type_id] * body + self.suffix.type_ids)

    def _wordpiece(self, chunk: str) -> list[int]:
        return [token.id for word in ASCII_WORDS.findall(chunk) for token in self.model.tokenize(word)]


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
