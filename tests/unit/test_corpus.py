"""trident.corpus (build/text.py re-exports it): real offline English, deterministic, with disjoint calibration and held-out sets."""
from __future__ import annotations

import pytest

from trident import corpus as text


def test_splits_are_disjoint_and_cover_the_corpus():
    split = text.text_split()
    assert not set(split.calibration) & set(split.held_out)
    assert sorted(split.calibration + split.held_out) == sorted(text.sentences())
    # Both sides are big enough for the default build (256 sentences + passages each).
    assert min(len(split.calibration), len(split.held_out)) > 400


def test_split_is_deterministic_and_prefixes_are_stable():
    first = text.text_split()
    text.text_split.cache_clear()
    assert text.text_split() == first
    assert text.calibration_texts(10) == text.calibration_texts(50)[:10]
    assert text.held_out_texts(5) == list(first.held_out[:5])


def test_sentences_are_prose():
    sentences = text.sentences()
    assert len(sentences) == len(set(sentences))
    for sentence in sentences:
        assert text.MIN_WORDS <= len(sentence.split()) <= text.MAX_WORDS
        assert "::=" not in sentence and "\n" not in sentence  # no grammar rules, no code blocks


def test_overlapping_split_is_rejected():
    with pytest.raises(AssertionError, match="overlap"):
        text.TextSplit(calibration=("a b c d", "e f g h"), held_out=("e f g h",))


def test_asking_for_more_text_than_exists_fails_clearly():
    with pytest.raises(ValueError, match="corpus has"):
        text.held_out_texts(10**6)


def test_passages_join_consecutive_sentences_up_to_the_word_count():
    sentences = text.calibration_texts(40)
    passages = text.passages(sentences, min_words=60)
    assert len(passages) >= 3 and all(len(p.split()) >= 60 for p in passages)
    assert " ".join(sentences).startswith(" ".join(passages))
