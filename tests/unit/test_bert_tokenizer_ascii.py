"""TextTokenizer's ASCII shortcuts (str.lower() for BertNormalizer, the word cache for small batches)
against the shipped tokenizer file."""
from __future__ import annotations

import json
import random

import pytest
from pydoc_data.topics import topics
from tokenizers import Encoding, Tokenizer, normalizers

from build.weights import minilm_dir
from trident.bert.tokenizer import MAX_WORD_CACHE_TEXTS, AsciiPath, TextTokenizer, Tokens

SPECIAL = ["hello [MASK] world", "Hello [mask] x", "[CLS][SEP]", "a [UNK] b", "[pad]"]
WHITESPACE_AND_CONTROL = ["tab\there\nnew\rline", "vertical\x0btab", "form\x0cfeed", "del\x7fete", "nul\x00l",
                          "bell\x07", "   ", ""]
NON_ASCII = ["Café naïve résumé", "Ein Mann isst Brot. 東京は日本の首都です。 🚀", "ﬁne ligature", "\ufffd"]
MIXED_CASE = ["UPPER lower MiXeD", "McDonald's DNA-based iPhone", "A" * 300, "don't stop-believing!!! (ok?)"]


def prose(max_chars: int = 600) -> list[str]:
    """CPython's own English documentation in chunks: punctuation, code, numbers, long words."""
    texts = []
    for text in list(topics.values())[:40]:
        texts += [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    return texts


def shipped(path, max_length: int, edit=None) -> Tokenizer:
    """The tokenizer file as it ships (optionally with its JSON edited), unpadded, truncated like ours."""
    config = json.loads(path.read_text())
    if edit:
        edit(config)
    tokenizer = Tokenizer.from_str(json.dumps(config))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def vocabulary_texts(path, count: int = 40) -> list[str]:
    """Random ASCII vocabulary entries ("##" pieces, "[unused7]", digits, punctuation) joined by spaces."""
    vocabulary = sorted(w for w in Tokenizer.from_file(str(path)).get_vocab() if w.isascii())
    rng = random.Random(0)
    return [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 150))) for _ in range(count)]


@pytest.fixture(scope="module")
def minilm_tokenizer_path():
    return minilm_dir(verify=False) / "tokenizer.json"


def assert_same_encodings(ours: TextTokenizer, reference: Tokenizer, texts: list[str]) -> None:
    mine, theirs = ours.encode(texts), reference.encode_batch(texts)
    for text, a, b in zip(texts, mine, theirs, strict=True):
        assert (a.ids, a.type_ids) == (b.ids, b.type_ids), repr(text[:80])


def test_ascii_texts_take_the_fast_path_and_others_do_not(minilm_tokenizer_path):
    path = AsciiPath.of(Tokenizer.from_file(str(minilm_tokenizer_path)))
    assert path is not None and path.lowercase
    ascii_prose = [text for text in prose() if text.isascii()][:50]
    assert len(ascii_prose) == 50
    for text in ascii_prose + MIXED_CASE + ["tab\there\nnew\rline", "", "   "]:
        assert path.prepare(text) == text.lower()
    # an added token's own spelling is matched before normalization; lowercase look-alikes are words
    assert path.prepare("Hello [mask] x") == "hello [mask] x"
    for text in ["hello [MASK] world", "[CLS][SEP]", "a [UNK] b"] + NON_ASCII + ["vertical\x0btab", "form\x0cfeed", "del\x7fete", "nul\x00l", "bell\x07"]:
        assert path.prepare(text) is None, repr(text)


@pytest.mark.parametrize("max_length", [16, 128])
def test_ids_equal_the_shipped_tokenizer(minilm_tokenizer_path, max_length):
    texts = prose() + vocabulary_texts(minilm_tokenizer_path) + SPECIAL + WHITESPACE_AND_CONTROL + NON_ASCII + MIXED_CASE
    ours = TextTokenizer.from_file(minilm_tokenizer_path, max_length)
    assert_same_encodings(ours, shipped(minilm_tokenizer_path, max_length), texts)
    # small batches take the word cache (twice: cold, then warm), mixed ones keep their order
    reference = shipped(minilm_tokenizer_path, max_length)
    for _ in range(2):
        for start in range(0, len(texts), MAX_WORD_CACHE_TEXTS):
            assert_same_encodings(ours, reference, texts[start:start + MAX_WORD_CACHE_TEXTS])
    assert_same_encodings(ours, reference, NON_ASCII + MIXED_CASE[::-1] + SPECIAL)
    assert_same_encodings(ours, reference, [NON_ASCII[0], MIXED_CASE[0]])


def test_small_batches_skip_tokenizers_and_large_ones_use_it(minilm_tokenizer_path):
    ours = TextTokenizer.from_file(minilm_tokenizer_path, 128)
    assert {type(e) for e in ours.encode(MIXED_CASE[:MAX_WORD_CACHE_TEXTS])} == {Tokens}
    assert {type(e) for e in ours.encode(MIXED_CASE * 2)} == {Encoding}
    assert [type(e) for e in ours.encode([MIXED_CASE[0], NON_ASCII[0]])] == [Tokens, Encoding]


def test_cased_vocabulary_keeps_case(minilm_tokenizer_path, tmp_path):
    def cased(config):
        config["normalizer"]["lowercase"] = False
        config["normalizer"]["strip_accents"] = True

    file = tmp_path / "tokenizer.json"
    file.write_text(shipped(minilm_tokenizer_path, 128, cased).to_str())
    ours = TextTokenizer.from_file(file, 128)
    assert AsciiPath.of(Tokenizer.from_file(str(file))).prepare("Hello World") == "Hello World"
    reference = shipped(minilm_tokenizer_path, 128, cased)
    assert_same_encodings(ours, reference, MIXED_CASE + prose()[:30] + NON_ASCII + SPECIAL)
    assert ours.encode(["Hello"])[0].ids != TextTokenizer.from_file(minilm_tokenizer_path, 128).encode(["Hello"])[0].ids


def test_other_normalizers_get_no_ascii_path(minilm_tokenizer_path):
    tokenizer = Tokenizer.from_file(str(minilm_tokenizer_path))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    assert AsciiPath.of(tokenizer) is None
    tokenizer.normalizer = None
    assert AsciiPath.of(tokenizer) is None
