"""The sampling kernel against its PyTorch twin (``sampler.draw``) and Hugging Face's warpers.

Runs on CUDA; also on CPU under the Triton interpreter (``TRITON_INTERPRET=1``), with fewer rows.
"""
from __future__ import annotations

import pytest
import torch
from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopPLogitsWarper

from tests.gpu.kernel_device import DEVICE, IS_CUDA, KERNEL_TEST_MARKS
from trident.engine.sampler import draw

pytestmark = KERNEL_TEST_MARKS

if DEVICE is not None:
    from trident.engine.kernels.sampling import sample_rows

ROWS = 512 if IS_CUDA else 48


def _inputs(rows: int, vocab: int, seed: int, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * scale
    choices = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.7, 0.9, 0.0], [1.3, 0.3, 0.0],
                            [1.0, 1.0, 0.1], [0.5, 0.8, 0.05], [1.0, 0.02, 0.0]])
    params = choices[torch.arange(rows) % len(choices)].contiguous()   # greedy, plain, top-p, min-p, both
    keys = torch.stack([torch.randint(0, 2**32, (rows,), generator=g), torch.randint(0, 2**32, (rows,), generator=g),
                        torch.randint(0, 1000, (rows,), generator=g), torch.randint(0, 4096, (rows,), generator=g)], 1)
    logits[rows // 2:, : vocab // 3] = float("-inf")   # masked tokens (top-k, min_tokens) in half the rows
    return logits, params, keys


@pytest.mark.parametrize("vocab,block", [(50, 64), (1000, 256), (4099, 1024)])
def test_kernel_draws_what_its_pytorch_twin_draws(vocab, block):
    logits, params, keys = _inputs(ROWS, vocab, seed=vocab)
    expected = draw(logits, params, keys)
    got = sample_rows(logits.to(DEVICE), params.to(DEVICE), keys.to(DEVICE), block=block).cpu()
    # The same hash, the same decisions; only the order of float sums differs (block by block here),
    # which could flip a candidate lying within rounding of the top-p edge: allow one such row.
    assert (got != expected).sum() <= 1, (got != expected).nonzero()
    assert torch.isfinite(logits.gather(1, got[:, None])).all()
    assert torch.equal(got[params[:, 0] == 0], logits.argmax(-1)[params[:, 0] == 0])


@pytest.mark.skipif(not IS_CUDA, reason="bf16 loads: numpy has no bf16")
def test_kernel_reads_bf16_and_strided_rows():
    logits, params, keys = _inputs(ROWS, 2000, seed=1)
    wide = torch.zeros(ROWS, 2048, dtype=torch.bfloat16)
    wide[:, :2000] = logits.to(torch.bfloat16)
    rows = wide.to(DEVICE)[:, :2000]   # stride 2048
    got = sample_rows(rows, params.to(DEVICE), keys.to(DEVICE)).cpu()
    expected = draw(wide[:, :2000].float(), params, keys)
    assert (got != expected).sum() <= 1


def test_kernel_draws_follow_the_filtered_distribution():
    """Many rows of one logits row, each at its own position: frequencies within 4.5 standard errors of
    HF's temperature -> top-p -> min-p distribution, and nothing outside it."""
    n = 20_000 if IS_CUDA else 1_200
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5]])
    for temperature, top_p, min_p in ((0.7, 0.9, 0.0), (1.0, 0.5, 0.0), (1.2, 1.0, 0.15)):
        scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
        scores = TopPLogitsWarper(top_p)(None, scores) if top_p < 1 else scores
        scores = MinPLogitsWarper(min_p)(None, scores) if min_p > 0 else scores
        expected = scores[0].softmax(-1).double()
        params = torch.tensor([[temperature, top_p, min_p]]).expand(n, 3).contiguous()
        keys = torch.stack([torch.full((n,), 5), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                            torch.arange(n)], 1)
        tokens = sample_rows(logits.expand(n, -1).contiguous().to(DEVICE), params.to(DEVICE), keys.to(DEVICE)).cpu()
        frequency = torch.bincount(tokens, minlength=8).double() / n
        standard_error = (expected * (1 - expected) / n).sqrt()
        assert ((frequency - expected).abs() <= 4.5 * standard_error + 1e-12).all(), (frequency, expected)
        assert frequency[expected == 0].sum() == 0
