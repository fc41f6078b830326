"""When a sequence stops, and how much of its text may be shown so far.

Stop strings are matched on decoded text, not on tokens, so a stop string split across tokens (or
tokenised differently in context) is still found. Text that could be the start of a stop string
is held back until it is known not to be one, so streamed text is never retracted.
"""
from __future__ import annotations

from dataclasses import dataclass

from trident.engine.sampling_params import SamplingParams
from trident.engine.sequence import Sequence


@dataclass
class StopDecision:
    finish_reason: str | None         # "stop" | "length" | None (keep going)
    stop_reason: str | int | None     # the stop string or stop token id that matched (None for EOS)
    text_len: int                     # how much of output_text may be emitted now


def check_stop(seq: Sequence, output_text: str, num_new_chars: int, eos_token_ids: list[int],
               max_model_len: int) -> StopDecision:
    """Decide after each appended token (vLLM's order and semantics).

    Nothing but the context limit stops a sequence before ``min_tokens``; then EOS (unless
    ``ignore_eos``), ``stop_token_ids``, stop strings in the tail of ``output_text``,
    ``max_tokens`` and finally ``max_model_len``. The text of a stopping EOS / stop token is not
    emitted (unless ``include_stop_str_in_output``); on a stop string the text is cut before it
    (after it with ``include_stop_str_in_output``).
    """
    params = seq.sampling_params
    if seq.num_output_tokens >= params.min_tokens:
        decision = _token_stop(seq, output_text, num_new_chars, eos_token_ids) or _string_stop(
            output_text, num_new_chars, params.stop, params.include_stop_str_in_output)
        if decision is not None:
            return decision
    if ends_by_length(params, seq.num_output_tokens, seq.num_tokens, max_model_len):
        return StopDecision("length", None, len(output_text))
    return StopDecision(None, None, len(output_text) - held_back(output_text, params.stop))


def ends_by_length(params: SamplingParams, num_output_tokens: int, num_tokens: int, max_model_len: int) -> bool:
    """Whether a sequence of this many tokens is done by its length alone: ``max_tokens`` once
    ``min_tokens`` are out, or the context limit, which is hard (the model has no positions beyond
    it, min_tokens or not). Async scheduling asks it ahead of a token the host has not seen yet."""
    return (num_output_tokens >= params.min_tokens and num_output_tokens >= params.max_tokens) \
        or num_tokens >= max_model_len


def check_token_stop(seq: Sequence, eos_token_ids: list[int], max_model_len: int) -> tuple[str, int | None] | None:
    """The stop rules that need no text, in ``check_stop``'s order: EOS, ``stop_token_ids``,
    ``max_tokens``, ``max_model_len``. Returns ``(finish_reason, stop_reason)`` or None.

    This is what scheduling must know as soon as a token is appended; a stop string can still end
    the sequence at the same token once its text is decoded (``check_stop``, which also turns a
    "length" here into "stop" when a stop string ends at the last token).
    """
    params = seq.sampling_params
    token_ids = seq.token_ids
    num_output_tokens = len(token_ids) - seq.num_prompt_tokens
    if num_output_tokens >= params.min_tokens:
        token = token_ids[-1]
        if not params.ignore_eos and token in eos_token_ids:
            return "stop", None
        if token in params.stop_token_ids:
            return "stop", token
    if ends_by_length(params, num_output_tokens, len(token_ids), max_model_len):
        return "length", None
    return None


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def _token_stop(seq: Sequence, output_text: str, num_new_chars: int,
                eos_token_ids: list[int]) -> StopDecision | None:
    params = seq.sampling_params
    token = seq.last_token_id
    is_eos = not params.ignore_eos and token in eos_token_ids
    if not is_eos and token not in params.stop_token_ids:
        return None
    text_len = len(output_text) if params.include_stop_str_in_output else len(output_text) - num_new_chars
    return StopDecision("stop", None if is_eos else token, text_len)


def _string_stop(output_text: str, num_new_chars: int, stops: list[str],
                 include_stop: bool) -> StopDecision | None:
    """The earliest stop string that ends within the new characters."""
    if not num_new_chars or not stops:
        return None
    best: tuple[int, str] | None = None
    for stop in stops:
        # A match must overlap the new characters, or it would have been found a token earlier.
        start = max(len(output_text) - num_new_chars - len(stop) + 1, 0)
        index = output_text.find(stop, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    if best is None:
        return None
    index, stop = best
    return StopDecision("stop", stop, index + len(stop) if include_stop else index)
