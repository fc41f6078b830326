"""Next-token selection for a batch of sequences, each with its own sampling parameters.

Order of operations (Hugging Face's, which vLLM follows for the same knobs):

1. ``min_tokens``: EOS (unless ``ignore_eos``) and ``stop_token_ids`` are masked out until the
   sequence has ``min_tokens`` outputs, as HF's ``MinNewTokensLengthLogitsProcessor`` does;
2. penalties on the raw logits — repetition (HF: over prompt + output, ``x / p`` if ``x > 0``
   else ``x * p``), then frequency and presence (vLLM/OpenAI: over output tokens,
   ``x -= frequency * count + presence * (count > 0)``);
3. greedy rows (``temperature == 0``) take the argmax here;
4. temperature, then top-k, top-p, min-p (HF's warper order and semantics; ties at the top-k
   threshold are kept, top-p keeps the smallest set whose mass exceeds ``p``, and at least one
   token always survives);
5. one draw per row (``draw``), without sorting the vocabulary: a Gumbel-max race over the row,
   then, while the candidate is outside the top-p / min-p set, a race over the tokens above it
   (rejection sampling: every token at or below a rejected candidate is outside too). Exact: the
   draw follows the filtered distribution. The noise is a hash of (seed, stream, position, round,
   token), so it needs no generator state: a request with a ``seed`` draws the same tokens whatever
   else is in the batch, and every row's draw at a position is the same in a synchronous run, a
   step launched ahead, or a recompute after preemption (unseeded rows hash the engine seed and
   their sequence id). On CUDA a Triton kernel (``kernels/sampling.py``) does it in two or three
   passes over the logits; ``draw`` is its PyTorch twin, with the same hash.

Log-probs, when asked for, are those of the distribution the token was drawn from (vLLM's
``processed_logprobs``): ``log_softmax`` after penalties, temperature and filters — for greedy
rows after penalties only.
"""
from __future__ import annotations

import array
from dataclasses import dataclass

import torch

from trident.engine import kernels
from trident.engine.sequence import Sequence

if kernels.IS_AVAILABLE:
    from trident.engine.kernels.sampling import sample_rows


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None   # log-probability of the chosen token, when the request asked for it


class Sampler:
    """Samples one token per row of ``logits``; stateless between steps (the noise is a hash)."""

    def __init__(self, seed: int = 0, eos_token_ids: list[int] | tuple[int, ...] = ()):
        self.seed = seed
        self.eos_token_ids = list(eos_token_ids)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
        """logits: fp32 [num_seqs, vocab], row i for seqs[i]."""
        tokens, logprobs = self.sample(logits, seqs)
        params = [seq.sampling_params for seq in seqs]
        logprob_list = logprobs.tolist() if logprobs is not None else [None] * len(seqs)
        return [SampleResult(t, lp if p.logprobs else None) for t, lp, p in zip(tokens.tolist(), logprob_list, params)]

    def sample(self, logits: torch.Tensor, seqs: list[Sequence],
               in_flight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tokens [num_seqs] int64 and, when some row asked for them, the log-probs [num_seqs] fp32
        of the distributions they were drawn from, left on ``logits``' device. Nothing here waits
        for the device (the per-row choices are read from the parameters on the host), so a step's
        sampling queues behind its forward and the host goes on (async scheduling).

        ``in_flight`` [num_seqs]: a step launched ahead of the previous one's tokens; a row whose last
        token is still a placeholder on the host has its value here, on the device (penalties count
        it from here); a row without one (admitted into that step) has -1."""
        if logits.shape[0] != len(seqs):
            raise ValueError(f"{logits.shape[0]} logits rows for {len(seqs)} sequences")
        params = [seq.sampling_params for seq in seqs]
        want_logprobs = any(p.logprobs for p in params)
        needs_processing = any(_needs_logits_processing(s) for s in seqs)
        if all(p.is_greedy for p in params) and not needs_processing:
            tokens = logits.argmax(dim=-1)  # [num_seqs]
            return tokens, _chosen_logprobs(logits, tokens) if want_logprobs else None
        if needs_processing:   # written in place: not the caller's tensor
            logits = self._process(logits.clone(), seqs, in_flight)
        tokens, distribution = self._sample(logits, seqs, want_logprobs)
        return tokens, _chosen_logprobs(distribution, tokens) if want_logprobs else None

    @staticmethod
    def is_plain_greedy(seqs: list[Sequence]) -> bool:
        """Whether the argmax of the raw logits is the whole answer for every row: greedy, no
        penalties or min_tokens masking, no log-probs. Then the runner's on-device argmax serves
        (``ModelRunner.launch_greedy``) and no logits cross to the host."""
        for seq in seqs:   # every step, every row: plain attribute reads, no property calls
            p = seq.sampling_params
            if (p.temperature != 0 or p.logprobs or p.repetition_penalty != 1.0 or p.frequency_penalty
                    or p.presence_penalty or (p.min_tokens and seq.num_output_tokens < p.min_tokens)):
                return False
        return True

    # -- logits processing -------------------------------------------------------------------------
    def _process(self, logits: torch.Tensor, seqs: list[Sequence],
                 in_flight: torch.Tensor | None = None) -> torch.Tensor:
        self._mask_min_tokens(logits, seqs)
        # Launched ahead (``in_flight``): a row whose last host token is a placeholder (negative)
        # counts it from the device instead; rows without one have -1 there.
        rows = [i for i, s in enumerate(seqs) if s.sampling_params.repetition_penalty != 1.0]
        if rows:
            penalties = [seqs[i].sampling_params.repetition_penalty for i in rows]
            logits[rows] = apply_repetition_penalty(logits[rows], [_known(seqs[i].token_ids) for i in rows],
                                                    penalties, _rows_of(in_flight, rows))
        rows = [i for i, s in enumerate(seqs) if s.sampling_params.frequency_penalty or s.sampling_params.presence_penalty]
        if rows:
            logits[rows] = apply_frequency_presence_penalties(
                logits[rows], [_known(seqs[i].output_token_ids) for i in rows],
                [seqs[i].sampling_params.frequency_penalty for i in rows],
                [seqs[i].sampling_params.presence_penalty for i in rows], _rows_of(in_flight, rows))
        return logits

    def _mask_min_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        rows, columns = [], []   # every (row, banned token) pair of the batch: one masked write
        for i, seq in enumerate(seqs):
            params = seq.sampling_params
            if seq.num_output_tokens < params.min_tokens:
                banned = list(params.stop_token_ids) + ([] if params.ignore_eos else self.eos_token_ids)
                rows += [i] * len(banned)
                columns += banned
        if rows:
            logits[_to(torch.tensor(rows), logits.device), _to(torch.tensor(columns), logits.device)] = float("-inf")

    # -- sampling ----------------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, seqs: list[Sequence],
                want_distribution: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens [num_seqs] and, if wanted, the distribution each row drew from [num_seqs, vocab]
        (at a thousand rows of a 50k vocabulary every full pass is ~200 MB: none is spent on what
        the batch does not need)."""
        params = [seq.sampling_params for seq in seqs]
        if all(p.is_greedy for p in params):
            return logits.argmax(dim=-1), logits
        device, vocab = logits.device, logits.shape[1]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        masked = logits
        if any(k < vocab for k in top_k):   # a top-k is scale-free: mask before the temperature
            masked = _top_k(logits, _to(torch.tensor(top_k), device), max(top_k))
        row_params, keys = self._row_inputs(seqs)
        row_params, keys = _to(row_params, device), _to(keys, device)
        if kernels.supports(masked):
            tokens = sample_rows(masked, row_params, keys, MAX_ROUNDS)  # [num_seqs]
        else:
            tokens = draw(masked, row_params, keys, MAX_ROUNDS)  # [num_seqs]
        if not want_distribution:
            return tokens, None
        greedy = row_params[:, 0] == 0  # [num_seqs]
        temperature = row_params[:, 0].masked_fill(greedy, 1.0)[:, None]  # [num_seqs, 1]
        warped = apply_top_k_top_p_min_p(logits / temperature, params)  # [num_seqs, vocab]
        return tokens, torch.where(greedy[:, None], logits, warped)

    def _row_inputs(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 [rows, 3] (temperature, 0 for greedy; top_p; min_p) and int64 [rows, 4] (the seed's
        low and high 32 bits; stream: 0 for a seeded request, else 1 + the sequence id; position: the
        output index being drawn, a placeholder counted as the token it stands for). One flat list
        through ``array`` (every value is exact in a double): a third of ``torch.tensor``'s time on
        a thousand rows of tuples."""
        flat: list[float] = []
        engine_lo, engine_hi = self.seed & _M32, (self.seed & _M64) >> 32
        for seq in seqs:
            p = seq.sampling_params
            position = len(seq.token_ids) - seq.num_prompt_tokens   # seq.num_output_tokens, inlined
            if p.seed is None:
                flat += (p.temperature, p.top_p, p.min_p, engine_lo, engine_hi, (seq.seq_id + 1) & _M32, position)
            else:
                flat += (p.temperature, p.top_p, p.min_p, p.seed & _M32, (p.seed & _M64) >> 32, 0, position)
        rows = torch.frombuffer(array.array("d", flat), dtype=torch.float64).view(len(seqs), 7)
        return rows[:, :3].float(), rows[:, 3:].long()


# -- the draw: rejection sampling over counter-hashed Gumbel noise -------------------------------------
MAX_ROUNDS = 64   # races after the first; each halves the candidates on average even when top_p is tiny
_M32, _M64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF


def draw(logits: torch.Tensor, params: torch.Tensor, keys: torch.Tensor, max_rounds: int = MAX_ROUNDS) -> torch.Tensor:
    """One token per row [rows] int64 from logits [rows, vocab] (top-k already masked to -inf), params
    fp32 [rows, 3] (temperature, 0 for greedy; top_p; min_p), keys int64 [rows, 4] (``_row_inputs``).

    The filtered set of a row is the tokens whose logit is at least some threshold: top-p keeps a
    token when the mass of the tokens strictly above it is below ``top_p`` (HF's and vLLM's set,
    ties at the edge kept), min-p when its probability is at least ``min_p`` times the largest. So
    a candidate drawn from the row and rejected rules out every token at or below it, and the next
    candidate is drawn from the tokens above it: accepted candidates follow the filtered
    distribution exactly. ``kernels.sampling.sample_rows`` is this function on CUDA."""
    temperature, top_p, min_p = params.unbind(1)  # [rows] each
    greedy = temperature == 0
    x = logits.float() / temperature.masked_fill(greedy, 1.0)[:, None]  # [rows, vocab]
    top = x.argmax(dim=-1)  # [rows]
    m = x.max(dim=-1, keepdim=True).values  # [rows, 1]
    z = (x - m).exp().sum(dim=-1)  # [rows]
    key1 = _hash32(keys[:, 0] ^ _hash32(keys[:, 1] ^ _hash32(keys[:, 2])))  # [rows]
    key2 = _hash32(key1 ^ _hash32(keys[:, 3]))
    token = torch.arange(x.shape[1], device=x.device)  # [vocab]
    best = _race(x, token, key1, key2, 0).argmax(dim=-1)  # [rows]
    accepted = greedy | ~((top_p < 1.0) | (min_p > 0.0))
    for round_ in range(1, max_rounds + 1):
        pending = (~accepted).nonzero()[:, 0]
        if pending.numel() == 0:
            break
        xp = x[pending]  # [pending, vocab]
        pivot = xp.gather(1, best[pending, None])  # [pending, 1]
        mass = torch.where(xp > pivot, (xp - m[pending]).exp(), 0.0).sum(dim=-1)
        ok = (mass < top_p[pending] * z[pending]) & ((pivot[:, 0] - m[pending, 0]).exp() >= min_p[pending])
        accepted[pending[ok]] = True
        again, xa = pending[~ok], xp[~ok]  # [again], [again, vocab]
        score = _race(xa, token, key1[again], key2[again], round_)
        best[again] = torch.where(xa > pivot[~ok], score, float("-inf")).argmax(dim=-1)
    # Greedy rows, and a row still undecided after max_rounds (its last candidate unchecked, as in the
    # kernel; never seen in practice): the argmax, which every filter keeps.
    return torch.where(greedy | ~accepted, top, best)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons) on uint32 values held in int64 (``kernels.sampling._hash32``); in place
    after the first op, which copies (half the time on the CPU, where this runs over [rows, vocab])."""
    x = x ^ (x >> 16)
    x.mul_(0x7FEB352D).bitwise_and_(_M32)
    x ^= x >> 15
    x.mul_(0x846CA68B).bitwise_and_(_M32)
    x ^= x >> 16
    return x


def _race(x: torch.Tensor, token: torch.Tensor, key1: torch.Tensor, key2: torch.Tensor, round_: int) -> torch.Tensor:
    """x - log(-log(u)) [rows, vocab], u uniform in (0, 1) hashed from (row keys, round, token)."""
    counter = (token + round_ * x.shape[1]) & _M32  # [vocab]
    h = _hash32((_hash32(counter[None, :] ^ key2[:, None]) + key1[:, None]) & _M32)  # [rows, vocab]
    u = ((h >> 8).float() + 0.5) * (1.0 / 16777216.0)
    return x - (-u.log()).log()


def apply_repetition_penalty(logits: torch.Tensor, token_ids: list[list[int]], penalties: list[float],
                             extra: torch.Tensor | None = None) -> torch.Tensor:
    """HF semantics: every token seen in prompt or output gets ``x / p`` if ``x > 0`` else ``x * p``.
    ``extra`` [rows]: one more token per row, on the device (the in-flight one)."""
    seen = _token_counts(token_ids, logits.shape[1], logits.device, extra) > 0  # [rows, vocab]
    p = torch.tensor(penalties, dtype=logits.dtype, device=logits.device)[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence_penalties(logits: torch.Tensor, output_ids: list[list[int]],
                                       frequency: list[float], presence: list[float],
                                       extra: torch.Tensor | None = None) -> torch.Tensor:
    """vLLM/OpenAI semantics over output tokens: ``x - frequency * count - presence * (count > 0)``.
    ``extra`` [rows]: one more output token per row, on the device (the in-flight one)."""
    counts = _token_counts(output_ids, logits.shape[1], logits.device, extra)  # [rows, vocab]
    f = torch.tensor(frequency, dtype=logits.dtype, device=logits.device)[:, None]
    p = torch.tensor(presence, dtype=logits.dtype, device=logits.device)[:, None]
    return logits - f * counts - p * (counts > 0).to(logits.dtype)


def apply_top_k_top_p_min_p(logits: torch.Tensor, params: list) -> torch.Tensor:
    """Mask (to -inf) the tokens outside each row's top-k, then top-p, then min-p set."""
    vocab, device = logits.shape[1], logits.device
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if any(k < vocab for k in top_k):
        logits = _top_k(logits, _to(torch.tensor(top_k), device), max(top_k))
    if any(p.top_p < 1.0 for p in params):
        logits = _top_p(logits, _to(torch.tensor([p.top_p for p in params], dtype=logits.dtype), device))
    if any(p.min_p > 0.0 for p in params):
        logits = _min_p(logits, _to(torch.tensor([p.min_p for p in params], dtype=logits.dtype), device))
    return logits


def _top_k(logits: torch.Tensor, k: torch.Tensor, max_k: int) -> torch.Tensor:
    values = logits.topk(max_k, dim=-1).values  # [rows, max_k]
    threshold = values.gather(1, (k - 1)[:, None])  # [rows, 1]
    return logits.masked_fill(logits < threshold, float("-inf"))


def _top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, sorted_index = logits.sort(dim=-1, descending=False)  # [rows, vocab]
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)[:, None]
    remove[:, -1] = False  # the most likely token always stays
    remove &= (top_p < 1.0)[:, None]
    return logits.masked_fill(remove.scatter(1, sorted_index, remove), float("-inf"))


def _min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)  # [rows, vocab]
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def _token_counts(token_ids: list[list[int]], vocab: int, device: torch.device,
                  extra: torch.Tensor | None = None) -> torch.Tensor:
    """[rows, vocab] occurrence counts of ``token_ids`` (and of ``extra`` [rows], one more token per
    row already on the device, or -1 for none); rows are padded with an extra column that is dropped."""
    width = max((len(ids) for ids in token_ids), default=0)
    padded = _to(torch.tensor([ids + [vocab] * (width - len(ids)) for ids in token_ids],
                              dtype=torch.long).view(len(token_ids), width), device)  # [rows, width]
    if extra is not None:   # -1 (no token) goes to the dropped column too
        extra = torch.where(extra < 0, vocab, extra.to(torch.long))
        padded = torch.cat([padded, extra.view(-1, 1)], dim=1)  # [rows, width + 1]
    counts = torch.zeros(len(token_ids), vocab + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    return counts[:, :vocab]


def _known(token_ids: list[int]) -> list[int]:
    """The tokens whose values the host has: all but a trailing placeholder (a negative id)."""
    return token_ids[:-1] if token_ids and token_ids[-1] < 0 else token_ids


def _rows_of(tokens: torch.Tensor | None, rows: list[int]) -> torch.Tensor | None:
    """tokens[rows] on the device, or None."""
    return None if tokens is None else tokens.index_select(0, _to(torch.tensor(rows), tokens.device))


def has_penalties(seq: Sequence) -> bool:
    """Whether sampling its next token reads its previous tokens' values (repetition, frequency,
    presence penalties)."""
    p = seq.sampling_params
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _needs_logits_processing(seq: Sequence) -> bool:
    return has_penalties(seq) or seq.num_output_tokens < seq.sampling_params.min_tokens


def _chosen_logprobs(distribution: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax(distribution)[row, token] [num_seqs] fp32."""
    return distribution.log_softmax(dim=-1).gather(1, tokens[:, None])[:, 0].float()


def _to(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small per-step tensor built on the host, copied without waiting for the device's queue
    (from pageable memory the copy takes the source before it returns)."""
    return host.to(device, non_blocking=True)
