"""Real English text, offline: the prose of CPython's ``pydoc_data.topics``, in sentence-ish chunks.

Used for INT8 calibration (by build/ and by the GPU runtime at load) and for accuracy gates, which
must not see the same text, so every chunk is assigned to exactly one of two splits by a hash of
its content: deterministic, independent of how many chunks a caller asks for, and disjoint by
construction (checked anyway).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache

MIN_WORDS, MAX_WORDS = 4, 80
HELD_OUT_PERCENT = 50
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=["A-Z])')
_HEADING_RULE = set("*=-~^")


@dataclass(frozen=True)
class TextSplit:
    """Disjoint text sets, each in a fixed pseudo-random order (so a prefix samples every topic)."""
    calibration: tuple[str, ...]
    held_out: tuple[str, ...]

    def __post_init__(self) -> None:
        overlap = set(self.calibration) & set(self.held_out)
        if overlap:
            raise AssertionError(f"calibration and held-out text overlap: {sorted(overlap)[:3]}")


@lru_cache(maxsize=1)
def text_split() -> TextSplit:
    chunks = sorted(sentences(), key=_digest)
    return TextSplit(calibration=tuple(c for c in chunks if not _is_held_out(c)),
                     held_out=tuple(c for c in chunks if _is_held_out(c)))


def calibration_texts(num_texts: int) -> list[str]:
    return _take(text_split().calibration, num_texts, "calibration")


def held_out_texts(num_texts: int) -> list[str]:
    return _take(text_split().held_out, num_texts, "held-out")


def passages(texts: list[str], min_words: int) -> list[str]:
    """Consecutive texts joined into passages of at least ``min_words`` words (for long inputs)."""
    result, current = [], []
    for text in texts:
        current.append(text)
        if sum(len(t.split()) for t in current) >= min_words:
            result.append(" ".join(current))
            current = []
    return result


def fingerprint(texts: list[str]) -> str:
    """sha256 of a text list, recorded in manifests so a changed corpus shows up as a rebuild."""
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()


def sentences() -> list[str]:
    """Unique prose sentences of ``MIN_WORDS``..``MAX_WORDS`` words, in document order."""
    seen: dict[str, None] = {}
    for paragraph in _prose_paragraphs():
        for sentence in _SENTENCE_END.split(paragraph):
            sentence = sentence.strip()
            if MIN_WORDS <= len(sentence.split()) <= MAX_WORDS and sentence[0] in '"ABCDEFGHIJKLMNOPQRSTUVWXYZ':
                seen.setdefault(sentence)
    return list(seen)


def _prose_paragraphs():
    from pydoc_data import topics

    for key in sorted(topics.topics):
        for block in re.split(r"\n\s*\n", topics.topics[key]):
            lines = block.split("\n")
            # Indented blocks are code, grammar or list continuations; a rule line ends a heading.
            if any(line.startswith(" ") for line in lines) or set(lines[-1].strip()) <= _HEADING_RULE:
                continue
            yield " ".join(line.strip() for line in lines)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _is_held_out(text: str) -> bool:
    return int(_digest(text)[:8], 16) % 100 < HELD_OUT_PERCENT


def _take(texts: tuple[str, ...], num_texts: int, name: str) -> list[str]:
    if num_texts > len(texts):
        raise ValueError(f"asked for {num_texts} {name} texts, the corpus has {len(texts)}")
    return list(texts[:num_texts])
