"""The engine on the real SmolLM2-135M-Instruct (converted from the packaged GGUF by build/)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trident.engine.config import EngineConfig
from trident.engine.engine import LLMEngine
from trident.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="session")
def smollm2_dir():
    from build.gpt_convert import DEFAULT_OUT, convert, smollm2_gguf_path

    convert(smollm2_gguf_path(), DEFAULT_OUT)   # idempotent: a no-op when the manifest matches
    return DEFAULT_OUT


def test_greedy_capital_of_france_matches_hf(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        reference = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                   max_new_tokens=8)[0, input_ids.shape[1]:].tolist()

    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), device="cpu", dtype="float32",
                                    max_model_len=128, max_num_seqs=4))
    # Alongside other prompts, so the batch is packed and paged rather than a lone sequence.
    prompts = [PROMPT, "Write a haiku about the sea.", "1, 2, 3, 4,"]
    outputs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8))
    out = outputs[0]
    assert out.prompt_token_ids == input_ids[0].tolist()
    assert out.output_token_ids == reference
    assert out.text == tokenizer.decode(reference, skip_special_tokens=True)
    assert out.text.startswith(" Paris")
