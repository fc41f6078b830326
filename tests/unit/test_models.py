"""Our Llama and GPT-2 against Hugging Face's, across the config variants real checkpoints use.

Every variant is a tiny random checkpoint saved by transformers; our model loads it by name
mapping and must give the reference logits for every row of a packed batch that mixes a fresh
prompt with a chunk continuing over cached context. The real SmolLM2 (converted from the packaged
GGUF by build/gpt_convert.py) is checked the same way under the ``slow`` mark.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from trident.engine.config import EngineConfig
from trident.engine.model_runner import ModelRunner
from trident.engine.sampling_params import SamplingParams
from trident.engine.sequence import Sequence
from trident.engine.tokenizer import gpt2_tokenizer
from trident.models.loader import load_model
from trident.models.testing import save_tiny_gpt2, save_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_VOCAB = 512
ATOL = 1e-4



@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """One saved tokenizer for all variants (the runner loads one; the logits do not depend on it)."""
    path = tmp_path_factory.mktemp("tokenizer")
    gpt2_tokenizer().save_pretrained(path)
    return path


def packed_logits(model_dir: Path, tokenizer_dir: Path, vocab: int) -> tuple[torch.Tensor, list[Sequence]]:
    """Logits of every new row of a step that packs a fresh 9-token prompt with a 7-token chunk
    continuing 6 cached tokens, over shuffled block tables."""
    runner = ModelRunner(EngineConfig(model=str(model_dir), tokenizer=str(tokenizer_dir), block_size=4,
                                      max_tokens_in_paged_kv_cache=4 * 32))
    g = torch.Generator().manual_seed(0)
    fresh, chunked = (Sequence(i, torch.randint(0, vocab, (n,), generator=g).tolist(), SamplingParams())
                      for i, n in enumerate([9, 13]))
    blocks = random.Random(0).sample(range(32), 8)
    fresh.block_table, chunked.block_table = blocks[:3], blocks[3:7]
    runner.execute([chunked], [6])
    chunked.num_computed_tokens = 6
    batch = runner.prepare([fresh, chunked], [9, 7])
    with torch.inference_mode():
        hidden = runner.model(batch.input_ids, batch.positions, runner.kv_cache, batch.metadata)
        return runner.model.compute_logits(hidden), [fresh, chunked]


@torch.inference_mode()
def hf_logits(model_dir: Path, seqs: list[Sequence], first_rows: list[int]) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return torch.cat([hf(torch.tensor([s.token_ids])).logits[0, start:] for s, start in zip(seqs, first_rows)])


def assert_variant_matches_hf(model_dir: Path, tokenizer_dir: Path) -> None:
    ours, seqs = packed_logits(model_dir, tokenizer_dir, SMALL_VOCAB)
    torch.testing.assert_close(ours, hf_logits(model_dir, seqs, [0, 6]), atol=ATOL, rtol=0)


LLAMA_VARIANTS = {
    "gqa-untied": {},
    "tied-embeddings": dict(tie_word_embeddings=True),
    "mha-with-biases": dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True),
    "head-dim-not-hidden-over-heads": dict(head_dim=32),
    "multi-query": dict(num_key_value_heads=1),
    "rope-theta-and-linear-scaling": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
    "rope-yarn": dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                       "original_max_position_embeddings": 64}),
}


@pytest.mark.parametrize("variant", LLAMA_VARIANTS)
def test_llama_variants_match_hf(variant, tmp_path, tokenizer_dir):
    path = save_tiny_llama(tmp_path, with_tokenizer=False, vocab_size=SMALL_VOCAB, **LLAMA_VARIANTS[variant])
    assert_variant_matches_hf(path, tokenizer_dir)


def test_llama_legacy_rope_fields_in_config_json(tmp_path, tokenizer_dir):
    """Checkpoints from before transformers 5 carry ``rope_theta`` and ``rope_scaling`` (llama3 here)."""
    path = save_tiny_llama(tmp_path, with_tokenizer=False, vocab_size=SMALL_VOCAB)
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_theta"] = 50000.0
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    (path / "config.json").write_text(json.dumps(config))
    assert_variant_matches_hf(path, tokenizer_dir)


GPT2_VARIANTS = {
    "default": {},
    "untied-head": dict(tie_word_embeddings=False),
    "inverse-layer-scaling-relu": dict(scale_attn_by_inverse_layer_idx=True, activation_function="relu"),
    "unscaled-attention-exact-gelu": dict(scale_attn_weights=False, activation_function="gelu", n_inner=96),
}


@pytest.mark.parametrize("variant", GPT2_VARIANTS)
def test_gpt2_variants_match_hf(variant, tmp_path, tokenizer_dir):
    path = save_tiny_gpt2(tmp_path, with_tokenizer=False, vocab_size=SMALL_VOCAB, **GPT2_VARIANTS[variant])
    assert_variant_matches_hf(path, tokenizer_dir)


def test_gpt2_openai_style_names_and_mask_buffers_load(tmp_path, tokenizer_dir):
    """Original GPT-2 checkpoints: no ``transformer.`` prefix, causal-mask buffers stored as tensors."""
    path = save_tiny_gpt2(tmp_path, with_tokenizer=False, vocab_size=SMALL_VOCAB)
    reference_seqs_logits = packed_logits(path, tokenizer_dir, SMALL_VOCAB)[0]
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(path / "model.safetensors").items()}
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 256, 256).tril()
    tensors["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, path / "model.safetensors")
    torch.testing.assert_close(packed_logits(path, tokenizer_dir, SMALL_VOCAB)[0], reference_seqs_logits,
                               atol=0, rtol=0)


def test_sharded_checkpoint_loads_from_its_index(tmp_path, tokenizer_dir):
    path = save_tiny_llama(tmp_path / "one", with_tokenizer=False, vocab_size=SMALL_VOCAB)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert_variant_matches_hf(tmp_path / "sharded", tokenizer_dir)


def test_loader_is_strict_about_names_and_shapes(tmp_path):
    path = save_tiny_llama(tmp_path, with_tokenizer=False, vocab_size=SMALL_VOCAB)
    tensors = load_file(path / "model.safetensors")
    load = lambda: load_model(path, torch.device("cpu"), torch.float32)  # noqa: E731

    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.k_proj.weight"},
              path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing weights for: layers\.1\.self_attn\.qkv_proj\.weight"):
        load()
    save_file({**tensors, "model.layers.0.self_attn.rogue.weight": torch.zeros(2)}, path / "model.safetensors")
    with pytest.raises(ValueError, match="'layers.0.self_attn.rogue.weight' has no matching parameter"):
        load()
    save_file({**tensors, "model.norm.weight": torch.ones(65)}, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"shape mismatch for norm\.weight: model \(64,\), checkpoint \(65,\)"):
        load()


def test_loader_refuses_pickles_and_unknown_architectures(tmp_path):
    path = save_tiny_gpt2(tmp_path, with_tokenizer=False, vocab_size=SMALL_VOCAB)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled checkpoints are not loaded"):
        load_model(path, torch.device("cpu"), torch.float32)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        load_model(path, torch.device("cpu"), torch.float32)


# -- the real SmolLM2-135M-Instruct ----------------------------------------------------------------

@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from build.gpt_convert import main

    return main(["--no-check"])  # converts once; later calls see matching manifest hashes and skip


@pytest.mark.slow
def test_smollm2_next_token_logits_match_hf(smollm2_dir):
    runner = ModelRunner(EngineConfig(model=str(smollm2_dir), max_model_len=128, max_num_seqs=4))
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    prompts = ["The capital of France is", "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n",
               "1, 2, 3, 4,"]
    seqs = [Sequence(i, runner.tokenizer.encode(p), SamplingParams()) for i, p in enumerate(prompts)]
    for i, seq in enumerate(seqs):
        seq.block_table = list(range(4 * i, 4 * i + 4))
    logits = runner.execute(seqs, [s.num_tokens for s in seqs])
    with torch.inference_mode():
        reference = torch.stack([hf(torch.tensor([s.token_ids])).logits[0, -1] for s in seqs])
    torch.testing.assert_close(logits, reference, atol=2e-3, rtol=0)
    assert logits.argmax(-1).tolist() == reference.argmax(-1).tolist()
    assert runner.tokenizer.decode([logits[0].argmax().item()]) == " Paris"
    assert runner.eos_token_ids == [2] and runner.max_model_len == 128 and runner.vocab_size == 49152
