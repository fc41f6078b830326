"""Incremental detokenization with vLLM's prefix/read offsets.

Decoding one token at a time loses information: byte-level BPE splits multi-byte characters
across tokens, and SentencePiece decoders drop or add a leading space depending on what comes
before. So each step decodes a short window twice — ``tokens[prefix_offset:read_offset]`` (text
already emitted) and ``tokens[prefix_offset:]`` — and emits the difference. The window starts a
few prompt tokens back, so the first output token is decoded in context (its leading space is
kept). Text ending in U+FFFD is an incomplete character: nothing is emitted until it completes.
"""
from __future__ import annotations

# Prompt tokens decoded in front of the output, so the first token is decoded in context.
CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns the output tokens of one sequence into text deltas.

    For byte-level BPE tokenizers (GPT-2, SmolLM2) the concatenation of all deltas plus ``flush()``
    equals ``tokenizer.decode(output_ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)``.
    Clean-up of tokenization spaces is off because it rewrites text across token boundaries
    (" n't" -> "n't"), which would retract text already streamed.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.text = ""

    def add_tokens(self, token_ids: list[int]) -> str:
        """Append output tokens; returns the newly completed text ("" while a character is incomplete)."""
        self.token_ids.extend(token_ids)
        return self._advance(hold_incomplete=True)

    def add_tokens_at_once(self, token_ids: list[int]) -> str:
        """Same text and offsets as ``add_tokens`` once per token, with one decode pair when the
        text ends on a complete character (the detokenization of a FINAL_ONLY request at its end)."""
        if not token_ids:
            return ""
        num_before, prefix_offset, read_offset, text = (len(self.token_ids), self.prefix_offset,
                                                        self.read_offset, self.text)
        delta = self.add_tokens(token_ids)
        if self.read_offset == len(self.token_ids):
            return delta
        # Something is held back (an incomplete character at the end): one token at a time would
        # have emitted the complete text before it, so replay that way.
        del self.token_ids[num_before:]
        self.prefix_offset, self.read_offset, self.text = prefix_offset, read_offset, text
        return "".join(self.add_tokens([token_id]) for token_id in token_ids)

    def add_tokens_at_end(self, token_ids: list[int], texts: list[str]) -> str | None:
        """``add_tokens_at_once(token_ids[:-1])`` then ``add_tokens(token_ids[-1:])``, the whole
        output of a request at its end, from ``texts``: the decodes of ``end_windows(token_ids)``
        (batched across requests by the module's ``add_tokens_at_end``). Returns the last token's delta, or None,
        with nothing changed, when the common case does not hold (fewer than two tokens, or the
        text before the last token does not end on a complete character): then decode the usual way."""
        if len(token_ids) < 2:
            return None
        prefix_text, full_text, last_prefix_text, last_full_text = texts
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            return None
        self.token_ids.extend(token_ids)
        self.text += full_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids) - 1
        if len(last_full_text) <= len(last_prefix_text) or last_full_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = last_full_text[len(last_prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += delta
        return delta

    def end_windows(self, token_ids: list[int]) -> list[list[int]]:
        """The four windows ``add_tokens_at_end(token_ids)`` decodes (as ``_advance`` would, twice)."""
        ids = self.token_ids + token_ids
        p, r, end = self.prefix_offset, self.read_offset, len(ids)
        return [ids[p:r], ids[p:end - 1], ids[r:end - 1], ids[r:end]]

    def flush(self) -> str:
        """Text still held back at the end (a character that never completed, shown as U+FFFD)."""
        return self._advance(hold_incomplete=False)

    def _advance(self, hold_incomplete: bool) -> str:
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset:])
        if len(full_text) <= len(prefix_text) or (hold_incomplete and full_text.endswith(REPLACEMENT_CHAR)):
            return ""
        delta = full_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += delta
        return delta

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)


class _RustDecoder:
    """``tokenizer.decode`` straight through the Rust ``tokenizers`` object.

    The detokenizer decodes two short windows per output token; through the transformers wrapper
    each call pays ~10 us of argument conversion, several times the decode itself, and at hundreds
    of sequences per step that is milliseconds. Same text as the wrapper with
    ``clean_up_tokenization_spaces=False`` (which is all the detokenizer asks for).
    """

    def __init__(self, backend):
        self._decode = backend.decode
        self._decode_batch = backend.decode_batch

    def batch_decode(self, sequences: list[list[int]], skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool = False) -> list[str]:
        """``tokenizer.batch_decode``, decoded in parallel on Rust threads with the GIL released."""
        if clean_up_tokenization_spaces:
            raise ValueError("the fast decoder does not clean up tokenization spaces")
        return self._decode_batch(sequences, skip_special_tokens=skip_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool = False) -> str:
        if clean_up_tokenization_spaces:
            raise ValueError("the fast decoder does not clean up tokenization spaces")
        return self._decode(token_ids, skip_special_tokens=skip_special_tokens)


def add_tokens_at_end(detokenizers: list[IncrementalDetokenizer], outputs: list[list[int]], decoder) -> list[str]:
    """The whole outputs of requests that end together (FINAL_ONLY: their text is decoded once, at
    the end), with their windows decoded in one batch: the Rust tokenizer decodes a batch on all
    cores and outside the GIL, and when a thousand requests end in one step that is most of the
    step. Same texts and offsets as ``add_tokens_at_once(output[:-1])`` then ``add_tokens(output[-1:])``
    for each; returns each one's last-token delta."""
    windows = [d.end_windows(out) if len(out) >= 2 else [] for d, out in zip(detokenizers, outputs)]
    texts = iter(_decode_batch(decoder, windows, [d.skip_special_tokens for d in detokenizers]))
    deltas = []
    for d, out, w in zip(detokenizers, outputs, windows):
        delta = d.add_tokens_at_end(out, [next(texts) for _ in w]) if w else None
        if delta is None:   # the uncommon case: one token at a time where it matters
            d.add_tokens_at_once(out[:-1])
            delta = d.add_tokens(out[-1:])
        deltas.append(delta)
    return deltas


def _decode_batch(decoder, windows: list[list[list[int]]], skip_special: list[bool]) -> list[str]:
    """Every window's text, in order; one batched decode per ``skip_special_tokens`` value."""
    groups: dict[bool, list[int]] = {}   # skip_special_tokens -> indices into the flat windows
    flat = []
    for ws, skip in zip(windows, skip_special):
        for w in ws:
            groups.setdefault(bool(skip), []).append(len(flat))
            flat.append(w)
    texts: list[str | None] = [None] * len(flat)
    for skip, index in groups.items():
        decoded = decoder.batch_decode([flat[i] for i in index], skip_special_tokens=skip,
                                       clean_up_tokenization_spaces=False)
        for i, text in zip(index, decoded):
            texts[i] = text
    return texts


def fast_decoder(tokenizer):
    """The Rust decoder of a fast tokenizer, else the tokenizer itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return tokenizer if backend is None else _RustDecoder(backend)


class StreamDetokenizer:
    """The text of a request the engine ran with ``detokenize=False``, built outside the engine
    from its DELTA token ids, in chunks of any size.

    The same text as the engine's own (``check_stop``'s rules without stop strings, which such a
    request cannot have): a stop token's text (EOS or ``stop_token_ids``) is not shown unless
    ``include_stop_str_in_output``; text held back for an incomplete character is released when
    the request ends on ``max_tokens`` / the context limit.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], params):
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
        self._show_stop_token = params.include_stop_str_in_output

    def add(self, token_ids: list[int], finish_reason: str | None) -> str:
        """Text for ``token_ids`` (the new tokens); ``finish_reason`` when they end the request."""
        add = self._detokenizer.add_tokens
        if finish_reason == "stop" and token_ids and not self._show_stop_token:
            text = add(token_ids[:-1])
            add(token_ids[-1:])   # decoded for its context only, as the engine does
            return text
        text = add(token_ids)
        if finish_reason == "length":
            text += self._detokenizer.flush()
        return text
