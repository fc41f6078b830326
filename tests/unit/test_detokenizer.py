"""Incremental detokenization round-trips with the real GPT-2 and SmolLM2 tokenizers."""
from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from trident.engine.detokenizer import IncrementalDetokenizer, add_tokens_at_end, fast_decoder
from trident.engine.tokenizer import gpt2_tokenizer

TEXTS = [
    "Hello world! This is a test of the streaming text.",
    "  two leading spaces,\ttabs,\nnew lines\n\nand trailing space ",
    "naïve café, déjà vu — “curly quotes” … ½ °C",
    "日本語のテキストと中文字符，还有한국어 문장.",
    "Emoji: 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 sparkles ✨🦀",
    "Code: `def f(x): return x ** 2`  # ∑∫√ ≠ ≤ €100",
]


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def smollm2():
    """The converted model's tokenizer when build/gpt_convert.py has run, else read from the GGUF."""
    from build.gpt_convert import DEFAULT_OUT, smollm2_gguf_path

    if (DEFAULT_OUT / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(DEFAULT_OUT)
    gguf = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(params=["gpt2", "smollm2"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def stream(tokenizer, prompt_ids: list[int], output_ids: list[int], skip_special_tokens: bool = True):
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    deltas = [detokenizer.add_tokens([t]) for t in output_ids]
    return detokenizer, deltas


def full_decode(tokenizer, ids: list[int], skip_special_tokens: bool = True) -> str:
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_deltas_concatenate_to_the_full_decode(tokenizer, text):
    prompt_ids = tokenizer.encode("User said:")
    output_ids = tokenizer.encode(text)
    detokenizer, deltas = stream(tokenizer, prompt_ids, output_ids)
    assert "".join(deltas) == detokenizer.text == full_decode(tokenizer, output_ids) == text
    assert not any("\ufffd" in d for d in deltas), "an incomplete character was streamed"
    assert detokenizer.flush() == ""


def test_multibyte_characters_split_across_tokens_are_held_back(gpt2):
    output_ids = gpt2.encode(" 😀")
    assert len(output_ids) > 1  # byte-level BPE spreads the emoji's four bytes over tokens
    _, deltas = stream(gpt2, gpt2.encode("Smile:"), output_ids)
    assert deltas[:-1] == [""] * (len(output_ids) - 1) and deltas[-1] == " 😀"


def test_first_token_keeps_its_leading_space(tokenizer):
    prompt_ids = tokenizer.encode("The capital of France is")
    output_ids = tokenizer.encode(" Paris. It is")
    _, deltas = stream(tokenizer, prompt_ids, output_ids)
    assert deltas[0] == " Paris" and "".join(deltas) == " Paris. It is"


def test_special_tokens_are_skipped_or_kept_on_request(smollm2):
    output_ids = smollm2.encode("Hi there") + [smollm2.convert_tokens_to_ids("<|im_end|>")]
    for skip in (True, False):
        detokenizer, deltas = stream(smollm2, smollm2.encode("<|im_start|>assistant\n"), output_ids, skip)
        assert "".join(deltas) == full_decode(smollm2, output_ids, skip)
    assert detokenizer.text == "Hi there<|im_end|>"


def test_several_tokens_at_once(tokenizer):
    output_ids = tokenizer.encode(TEXTS[4])
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    parts = [detokenizer.add_tokens(output_ids[i:i + 3]) for i in range(0, len(output_ids), 3)]
    assert "".join(parts) == TEXTS[4]


@pytest.mark.parametrize("seed", range(4))
def test_random_token_streams_round_trip_with_flush(tokenizer, seed):
    """Arbitrary tokens (invalid UTF-8 included): deltas plus the final flush equal the full decode."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    output_ids = [t for t in (rng.randrange(len(tokenizer)) for _ in range(200)) if t not in special]
    detokenizer, deltas = stream(tokenizer, [rng.randrange(len(tokenizer)) for _ in range(7)], output_ids)
    tail = detokenizer.flush()
    assert "".join(deltas) + tail == detokenizer.text == full_decode(tokenizer, output_ids)


def test_all_tokens_at_once_equal_token_by_token(tokenizer):
    """A FINAL_ONLY request is detokenized once at the end: same text as the streamed path."""
    prompt_ids = tokenizer.encode("User said:")
    for text in TEXTS:
        output_ids = tokenizer.encode(text)
        streamed, deltas = stream(tokenizer, prompt_ids, output_ids)
        at_once = IncrementalDetokenizer(tokenizer, prompt_ids)
        assert at_once.add_tokens_at_once(output_ids) == streamed.text == text
        # The engine adds the last token alone (a stop token's text is cut): same delta as streamed.
        body_then_last = IncrementalDetokenizer(tokenizer, prompt_ids)
        body_then_last.add_tokens_at_once(output_ids[:-1])
        assert body_then_last.add_tokens(output_ids[-1:]) == deltas[-1]


@pytest.mark.parametrize("seed", range(3))
def test_all_tokens_at_once_hold_back_what_streaming_holds_back(tokenizer, seed):
    """Random tokens end mid-character now and then: the text held back (and flushed) matches."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    prompt_ids = [rng.randrange(len(tokenizer)) for _ in range(7)]
    output_ids = [t for t in (rng.randrange(len(tokenizer)) for _ in range(300)) if t not in special]
    emoji = tokenizer.encode(" 😀")
    for cut in [len(output_ids), *range(1, len(emoji))]:   # whole stream, and ending inside an emoji
        ids = output_ids + emoji[:cut] if cut < len(emoji) else output_ids
        streamed, _ = stream(tokenizer, prompt_ids, ids)
        at_once = IncrementalDetokenizer(tokenizer, prompt_ids)
        at_once.add_tokens_at_once(ids)
        assert at_once.text == streamed.text
        assert at_once.flush() == streamed.flush() and at_once.text == full_decode(tokenizer, ids)


@pytest.mark.parametrize("seed", range(2))
def test_requests_ending_together_are_detokenized_as_one_at_a_time(tokenizer, seed):
    """The engine decodes the requests that end in one step as one batch (``add_tokens_at_end``):
    every text, last-token delta and offset equals ``add_tokens_at_once(body)`` then
    ``add_tokens(last)`` per request, through the Rust decoder and the tokenizer alike, for clean
    texts, random tokens, outputs ending inside an emoji (held back), one-token outputs (the
    one-at-a-time fallback) and both ``skip_special_tokens`` values in one batch."""
    rng = random.Random(seed)
    special = sorted(set(tokenizer.all_special_ids))
    emoji = tokenizer.encode(" 😀")
    outputs = [tokenizer.encode(text) for text in TEXTS]
    outputs += [[rng.randrange(len(tokenizer)) for _ in range(rng.randrange(2, 60))] for _ in range(8)]
    outputs += [tokenizer.encode("Hi") + emoji[:cut] for cut in range(1, len(emoji))]
    outputs += [[tokenizer.encode(" ok")[0]], tokenizer.encode("a b") + special[:1]]
    prompts = [[rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 9))] for _ in outputs]
    skips = [i % 3 != 0 for i in range(len(outputs))]
    for decoder in (tokenizer, fast_decoder(tokenizer)):
        batched = [IncrementalDetokenizer(decoder, p, skip) for p, skip in zip(prompts, skips)]
        deltas = add_tokens_at_end(batched, outputs, decoder)
        for d, prompt, out, skip, delta in zip(batched, prompts, outputs, skips, deltas):
            one = IncrementalDetokenizer(tokenizer, prompt, skip)
            one.add_tokens_at_once(out[:-1])
            assert delta == one.add_tokens(out[-1:])
            assert (d.text, d.token_ids, d.prefix_offset, d.read_offset) == \
                (one.text, one.token_ids, one.prefix_offset, one.read_offset)
            assert d.flush() == one.flush()
