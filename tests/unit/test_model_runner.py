"""ModelRunner: packed batches over the paged KV cache, against Hugging Face as the reference.

Tiny random Llama (GQA) and GPT-2 checkpoints are saved as Hugging Face directories; sequences are
built by hand and given shuffled, non-contiguous block tables, the way the scheduler would.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from trident.engine.config import EngineConfig
from trident.engine.model_runner import ModelRunner
from trident.engine.sampling_params import SamplingParams
from trident.engine.sequence import Sequence
from trident.models.testing import save_tiny_gpt2, save_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BLOCK_SIZE = 4
NUM_BLOCKS = 160
VOCAB = 50257
ATOL = 1e-4


@dataclass
class Tiny:
    path: Path
    hf: torch.nn.Module
    runner: ModelRunner



@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tmp_path_factory) -> Tiny:
    save = save_tiny_llama if request.param == "llama" else save_tiny_gpt2
    path = save(tmp_path_factory.mktemp(request.param))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    runner = ModelRunner(EngineConfig(model=str(path), block_size=BLOCK_SIZE,
                                      max_tokens_in_paged_kv_cache=NUM_BLOCKS * BLOCK_SIZE))
    return Tiny(path, hf, runner)


def make_seqs(lengths: list[int], seed: int) -> list[Sequence]:
    g = torch.Generator().manual_seed(seed)
    return [Sequence(i, torch.randint(0, VOCAB, (n,), generator=g).tolist(), SamplingParams())
            for i, n in enumerate(lengths)]


def assign_blocks(seqs: list[Sequence], rng: random.Random, room: int = 8) -> None:
    """Shuffled, non-contiguous blocks covering each sequence plus `room` future tokens."""
    free = list(range(NUM_BLOCKS))
    rng.shuffle(free)
    for seq in seqs:
        seq.block_table = [free.pop() for _ in range(-(-(seq.num_tokens + room) // BLOCK_SIZE))]


def step(runner: ModelRunner, seqs: list[Sequence], num_new_tokens: list[int]) -> torch.Tensor:
    logits = runner.execute(seqs, num_new_tokens)
    for seq, n in zip(seqs, num_new_tokens):
        seq.num_computed_tokens += n
    return logits


@torch.inference_mode()
def hf_next_logits(hf: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([token_ids])).logits[0, -1]


def assert_matches_hf(hf, seqs: list[Sequence], logits: torch.Tensor) -> None:
    assert logits.shape == (len(seqs), VOCAB) and logits.dtype == torch.float32
    for seq, row in zip(seqs, logits):
        torch.testing.assert_close(row, hf_next_logits(hf, seq.token_ids), atol=ATOL, rtol=0)


def test_packed_prefill_then_decode_steps_match_hf(tiny):
    seqs = make_seqs([7, 1, 13, 4, 22, 9], seed=1)
    assign_blocks(seqs, random.Random(1))
    logits = step(tiny.runner, seqs, [s.num_tokens for s in seqs])
    assert_matches_hf(tiny.hf, seqs, logits)
    for _ in range(3):  # greedy decode steps, all sequences together
        for seq, token in zip(seqs, logits.argmax(-1).tolist()):
            seq.append_token(token)
        logits = step(tiny.runner, seqs, [1] * len(seqs))
        assert_matches_hf(tiny.hf, seqs, logits)


def test_chunked_prefill_mixed_with_decodes_matches_hf(tiny):
    seqs = make_seqs([30, 5, 11], seed=2)
    long, *others = seqs
    assign_blocks(seqs, random.Random(2))
    # Step 1: the long prompt's first 9 tokens (not sampled) with the others' whole prompts.
    logits = step(tiny.runner, seqs, [9, 5, 11])
    assert logits.shape[0] == 2
    assert_matches_hf(tiny.hf, others, logits)
    for seq, token in zip(others, logits.argmax(-1).tolist()):
        seq.append_token(token)
    # Step 2: a middle chunk over 9 cached tokens, beside two decodes; step 3: the rest.
    assert_matches_hf(tiny.hf, others, step(tiny.runner, [others[0], long, others[1]], [1, 12, 1]))
    logits = step(tiny.runner, [long], [long.num_tokens - long.num_computed_tokens])
    assert_matches_hf(tiny.hf, [long], logits)


def test_context_written_by_another_sequence_is_attended(tiny):
    """A prefix-cache hit: the second sequence starts with 8 computed tokens held in the first's blocks."""
    first, second = make_seqs([12, 12], seed=3)
    second.token_ids[:8] = first.token_ids[:8]
    assign_blocks([first, second], random.Random(3))
    step(tiny.runner, [first], [12])
    second.block_table[:2] = first.block_table[:2]
    second.num_computed_tokens = 8
    assert_matches_hf(tiny.hf, [second], step(tiny.runner, [second], [4]))


def test_every_row_of_a_packed_batch_matches_hf(tiny):
    """All hidden rows (not only the sampled ones) through the LM head, for prefill and chunk rows."""
    seqs = make_seqs([6, 10, 3], seed=4)
    assign_blocks(seqs, random.Random(4))
    step(tiny.runner, [seqs[1]], [4])
    num_new = [6, 6, 3]
    batch = tiny.runner.prepare(seqs, num_new)
    with torch.inference_mode():
        hidden = tiny.runner.model(batch.input_ids, batch.positions, tiny.runner.kv_cache, batch.metadata)
        logits = tiny.runner.model.compute_logits(hidden)
        reference = torch.cat([tiny.hf(torch.tensor([s.token_ids])).logits[0, s.num_computed_tokens:]
                               for s in seqs])
    torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)
    assert batch.sample_rows.tolist() == [5, 11, 14]


def test_kv_goes_to_the_slots_the_block_table_names(tiny):
    seq = make_seqs([6], seed=5)[0]
    seq.block_table = [17, 3]
    runner = tiny.runner
    runner.kv_cache.zero_()
    step(runner, [seq], [6])
    written = runner.kv_cache.abs().sum(dim=(0, 1, 4, 5))  # [num_blocks, block_size]
    assert written.nonzero().tolist() == [[3, 0], [3, 1], [17, 0], [17, 1], [17, 2], [17, 3]]


def test_rejects_steps_the_block_table_does_not_cover(tiny):
    seq = make_seqs([9], seed=6)[0]
    seq.block_table = [1, 2]
    with pytest.raises(ValueError, match="block table covers 8 positions, step needs 9"):
        tiny.runner.execute([seq], [9])
    with pytest.raises(ValueError, match="cannot compute 10 new tokens"):
        tiny.runner.execute([seq], [10])


def test_capacity_follows_the_sizing_knobs(tiny):
    runner = tiny.runner
    assert runner.device.type == "cpu" and runner.dtype == torch.float32  # "auto" on a CPU-only host
    assert runner.capacity.num_blocks == NUM_BLOCKS
    assert runner.kv_cache.shape == (2, 2, NUM_BLOCKS, BLOCK_SIZE, runner.model.shape.num_kv_heads,
                                     runner.model.shape.head_dim)
    shape = runner.model.shape
    assert runner.capacity.bytes_per_token == 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * 4
    assert runner.max_model_len == 256 and runner.vocab_size == VOCAB and runner.eos_token_ids == [50256]

    by_bytes = ModelRunner(EngineConfig(model=str(tiny.path), block_size=8, kv_cache_memory_bytes=100_000))
    assert by_bytes.capacity.num_blocks == 100_000 // (8 * by_bytes.capacity.bytes_per_token)
    default = ModelRunner(EngineConfig(model=str(tiny.path), max_num_seqs=3, max_model_len=100))
    # CPU default: every sequence at full length (3 x ceil(100 / 16) blocks), as it is under 1 GiB.
    assert default.capacity.num_blocks == 3 * 7 and default.max_model_len == 100
    assert "max concurrency at max_model_len=100" in default.capacity.describe()


def test_max_model_len_cannot_exceed_the_model(tiny):
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings=256"):
        ModelRunner(EngineConfig(model=str(tiny.path), max_model_len=257))


def test_eos_ids_come_from_generation_config_lists(tmp_path):
    path = save_tiny_gpt2(tmp_path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [50256, 13]}))
    runner = ModelRunner(EngineConfig(model=str(path), max_model_len=32))
    assert runner.eos_token_ids == [50256, 13]


def test_bfloat16_weights_and_cache_stay_close_to_the_fp32_reference(tiny):
    """The dtype CUDA defaults to, exercised on the CPU: same plumbing, looser numbers."""
    runner = ModelRunner(EngineConfig(model=str(tiny.path), dtype="bfloat16", block_size=BLOCK_SIZE,
                                      max_tokens_in_paged_kv_cache=NUM_BLOCKS * BLOCK_SIZE))
    assert runner.kv_cache.dtype == torch.bfloat16 and runner.model.compute_logits(
        torch.zeros(1, tiny.hf.config.hidden_size, dtype=torch.bfloat16)).dtype == torch.bfloat16
    seqs = make_seqs([20, 11, 5], seed=7)
    assign_blocks(seqs, random.Random(7))
    logits = step(runner, seqs, [s.num_tokens for s in seqs])
    reference = torch.stack([hf_next_logits(tiny.hf, s.token_ids) for s in seqs])
    assert logits.dtype == torch.float32
    assert (logits - reference).abs().max() < 0.15 * reference.std()
    assert logits.argmax(-1).tolist() == reference.argmax(-1).tolist()


def test_decode_staging_rewrites_only_changed_rows_yet_every_row_is_right():
    """The persistent host rows of the decode graphs (CPU mirrors here): a batch whose members grow,
    leave, arrive and get new block tables (as after preemption) always stages exactly their tables,
    slots, positions and last tokens."""
    from trident.engine.cuda_graph import PAD_SLOT, DecodeBuffers

    rng = random.Random(0)
    buffers = DecodeBuffers(max_num_seqs=16, max_blocks_per_seq=32, device=torch.device("cpu"))
    free = list(range(1, 500))
    rng.shuffle(free)

    def new_seq(seq_id):
        seq = Sequence(seq_id, [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 20))], SamplingParams())
        seq.block_table = [free.pop() for _ in range(-(-seq.num_tokens // BLOCK_SIZE))]
        seq.num_computed_tokens = seq.num_tokens - 1
        return seq

    batch = [new_seq(i) for i in range(10)]
    for step in range(60):
        buffers.stage(batch, 16, BLOCK_SIZE)
        for i, seq in enumerate(batch):
            pos = seq.num_computed_tokens
            table = buffers.np_block_tables[i, :len(seq.block_table)].tolist()
            assert table == seq.block_table, f"step {step} row {i}"
            assert buffers.np_slots[i] == seq.block_table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
            assert (buffers.np_positions[i], buffers.np_input_ids[i]) == (pos, seq.token_ids[pos])
            assert buffers.np_context_lens[i] == pos + 1
        assert (buffers.np_slots[len(batch):16] == PAD_SLOT).all()
        for seq in batch:   # the step: one token each, a new block when the last one is full
            seq.append_token(rng.randrange(VOCAB))
            seq.num_computed_tokens += 1
            if seq.num_tokens > len(seq.block_table) * BLOCK_SIZE:
                seq.block_table.append(free.pop())
        if step % 7 == 3:   # one finishes: every later row shifts up
            batch.pop(rng.randrange(len(batch)))
        if step % 5 == 1 and len(batch) < 16:
            batch.append(new_seq(100 + step))
        if step % 11 == 5:  # preempted and recomputed: same sequence, a new table of the same length
            seq = batch[rng.randrange(len(batch))]
            seq.block_table = [free.pop() for _ in seq.block_table]
