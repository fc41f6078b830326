"""check_stop: stop order, stop strings across token boundaries, and the hold-back rule."""
from __future__ import annotations

import random

import pytest

from trident.engine.detokenizer import IncrementalDetokenizer
from trident.engine.sampling_params import SamplingParams
from trident.engine.sequence import Sequence
from trident.engine.stop_checker import StopDecision, check_stop, check_token_stop, held_back
from trident.engine.tokenizer import gpt2_tokenizer

EOS = 0
MAX_MODEL_LEN = 100


def make_seq(num_prompt: int = 3, **params) -> Sequence:
    return Sequence(0, list(range(10, 10 + num_prompt)), SamplingParams(**params))


def feed(seq: Sequence, chunks: list[str], token: int = 5) -> list[StopDecision]:
    """Append one token per text chunk and check after each, as the engine does."""
    text, decisions = "", []
    for chunk in chunks:
        seq.append_token(token)
        text += chunk
        decisions.append(check_stop(seq, text, len(chunk), [EOS], MAX_MODEL_LEN))
        if decisions[-1].finish_reason:
            break
    return decisions


def test_stop_string_split_across_tokens_is_found_and_cut():
    decisions = feed(make_seq(stop=["END"]), ["The e", "nd is ", "E", "N", "D and more"])
    assert [d.finish_reason for d in decisions] == [None, None, None, None, "stop"]
    assert decisions[-1] == StopDecision("stop", "END", len("The end is "))


def test_include_stop_str_in_output_keeps_it_and_drops_what_follows():
    decisions = feed(make_seq(stop=["END"], include_stop_str_in_output=True), ["xx E", "ND yy"])
    assert decisions[-1] == StopDecision("stop", "END", len("xx END"))


def test_possible_stop_prefixes_are_held_back_then_released():
    decisions = feed(make_seq(stop=["<|user|>", "\n\n"]), ["Hello", " <|", "us", "eless", "\n", "ok"])
    emitted = [d.text_len for d in decisions]
    assert emitted == [5, 6, 6, 15, 15, 18]  # "Hello ", then "<|us" held until "eless" rules it out


def test_earliest_of_several_stop_strings_wins():
    decision = feed(make_seq(stop=["cd", "abc", "b"]), ["xabcd"])[0]
    assert decision == StopDecision("stop", "abc", 1)


def test_eos_stops_and_its_text_is_not_emitted_unless_asked():
    seq = make_seq()
    seq.append_token(5)
    seq.append_token(EOS)
    assert check_stop(seq, "hi</s>", 4, [EOS], MAX_MODEL_LEN) == StopDecision("stop", None, 2)
    seq.sampling_params.include_stop_str_in_output = True
    assert check_stop(seq, "hi</s>", 4, [EOS], MAX_MODEL_LEN) == StopDecision("stop", None, 6)
    seq.sampling_params.ignore_eos = True
    assert check_stop(seq, "hi</s>", 4, [EOS], MAX_MODEL_LEN).finish_reason is None


def test_stop_token_ids_report_the_token():
    seq = make_seq(stop_token_ids=[42])
    seq.append_token(42)
    assert check_stop(seq, "x", 1, [EOS], MAX_MODEL_LEN) == StopDecision("stop", 42, 0)


def test_nothing_but_the_context_limit_stops_before_min_tokens():
    seq = make_seq(min_tokens=3, max_tokens=5, stop=["x"], stop_token_ids=[7])
    seq.append_token(EOS)
    assert check_stop(seq, "x", 1, [EOS], MAX_MODEL_LEN).finish_reason is None
    seq.append_token(7)
    assert check_stop(seq, "xx", 1, [EOS], MAX_MODEL_LEN).finish_reason is None
    seq.append_token(EOS)
    assert check_stop(seq, "xxx", 1, [EOS], MAX_MODEL_LEN).finish_reason == "stop"
    long = make_seq(num_prompt=8, min_tokens=3, max_tokens=5)
    long.append_token(EOS)
    assert check_stop(long, "", 0, [EOS], max_model_len=9) == StopDecision("length", None, 0)


def test_max_tokens_and_max_model_len_finish_with_length():
    decisions = feed(make_seq(max_tokens=3, stop=["zz"]), ["a", "b", "z"])
    assert decisions[-1] == StopDecision("length", None, 3)  # a held-back "z" is released at the end
    seq = make_seq(num_prompt=MAX_MODEL_LEN - 1, max_tokens=50)
    assert feed(seq, ["a"])[-1] == StopDecision("length", None, 1)


@pytest.mark.parametrize("seed", range(20))
def test_streamed_text_is_never_retracted_and_matches_a_plain_search(seed):
    rng = random.Random(seed)
    text = "".join(rng.choice("ab c\n") for _ in range(60))
    stops = ["".join(rng.choice("ab c\n") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    cuts = sorted(rng.sample(range(1, len(text)), 15)) + [len(text)]
    chunks = [text[a:b] for a, b in zip([0] + cuts, cuts)]
    decisions = feed(make_seq(stop=stops, max_tokens=100), chunks)
    lens = [d.text_len for d in decisions]
    assert lens == sorted(lens)
    seen = "".join(chunks[:len(decisions)])
    first = min((i for i in (seen.find(s) for s in stops) if i != -1), default=None)
    if decisions[-1].finish_reason == "stop":
        assert lens[-1] == first and seen.find(decisions[-1].stop_reason) == first
    else:
        assert first is None and lens[-1] == len(seen) - held_back(seen, stops)


def test_stop_string_across_real_gpt2_tokens():
    """The stop string "New York" arrives as tokens " New" + " York"; the detokenizer feeds the checker."""
    tokenizer = gpt2_tokenizer()
    output_ids = tokenizer.encode(" I love New York City")
    seq = make_seq(stop=["New York"])
    detokenizer = IncrementalDetokenizer(tokenizer, seq.prompt_token_ids)
    for token in output_ids:
        seq.append_token(token)
        delta = detokenizer.add_tokens([token])
        decision = check_stop(seq, detokenizer.text, len(delta), [50256], MAX_MODEL_LEN)
        if decision.finish_reason:
            break
    assert decision == StopDecision("stop", "New York", len(" I love "))
    assert seq.num_output_tokens == 4  # found as soon as " York" arrived, before " City"


@pytest.mark.parametrize("seed", range(5))
def test_sequence_stop_limits_agree_with_check_token_stop(seed):
    """The engine's per-row loops test a sequence's precomputed limits (max_num_tokens,
    stop_tokens_from, stop_token_set) instead of calling check_token_stop: both must stop exactly
    the same tokens, across min_tokens, ignore_eos, stop_token_ids and a context limit."""
    rng = random.Random(seed)
    eos = [2, 7]
    for _ in range(200):
        max_tokens = rng.randint(1, 12)
        params = SamplingParams(max_tokens=max_tokens, min_tokens=rng.randint(0, max_tokens),
                                ignore_eos=rng.random() < 0.3,
                                stop_token_ids=rng.sample(range(10), rng.randint(0, 2)))
        prompt = [rng.randrange(10) for _ in range(rng.randint(1, 6))]
        max_model_len = rng.randint(len(prompt) + 1, len(prompt) + max_tokens + 3)
        seq = Sequence(0, prompt, params, max_model_len=max_model_len, eos_token_ids=eos)
        while True:
            token = rng.randrange(10)
            seq.append_token(token)
            n = seq.num_tokens
            fast = n >= seq.max_num_tokens or (token in seq.stop_token_set and n >= seq.stop_tokens_from)
            exact = check_token_stop(seq, eos, max_model_len)
            assert fast == (exact is not None), (params, prompt, max_model_len, seq.token_ids, exact)
            if exact is not None:
                break
