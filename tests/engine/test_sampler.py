"""The batched sampler: results left on the device, logprobs gathered there, read back once."""

from __future__ import annotations

import math

import pytest
import torch

from glmv.engine.runner import PendingStep, StepResult
from glmv.engine.sampler import SampledBatch, SampleRequest, _filter, sample, sample_batch
from glmv.engine.sampling import SamplingParams


def rows(*params: SamplingParams, seed: int | None = None) -> list[SampleRequest]:
    out = []
    for p in params:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        out.append(SampleRequest(p, [1, 2, 3], 2, gen))
    return out


def test_greedy_rows_take_the_argmax_and_stay_on_the_device() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    batch = sample_batch(logits, rows(*[SamplingParams(temperature=0.0)] * 3))
    assert isinstance(batch.token_ids, torch.Tensor) and batch.token_ids.dtype == torch.int64
    assert batch.token_ids.tolist() == logits.argmax(dim=-1).tolist()
    tokens = batch.tokens()
    assert [t.token_id for t in tokens] == logits.argmax(dim=-1).tolist()
    assert all(t.logprob is None and t.top_logprobs is None for t in tokens)
    assert batch.tokens() is tokens  # read back once
    assert batch.finite_rows() is None


def test_logprobs_of_each_row_as_asked() -> None:
    logits = torch.randn(4, 80, generator=torch.Generator().manual_seed(1))
    asked = [None, 0, 2, 5]
    params = [SamplingParams(temperature=0.0, logprobs=k) for k in asked]
    tokens = sample(logits, rows(*params))
    ref = torch.log_softmax(logits, dim=-1)
    for i, (k, tok) in enumerate(zip(asked, tokens, strict=True)):
        assert tok.token_id == int(logits[i].argmax())
        if k is None:
            assert tok.logprob is None and tok.top_logprobs is None
            continue
        assert tok.logprob == float(ref[i, tok.token_id])
        vals, idx = ref[i].topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.long))
        assert tok.top_logprobs == list(zip(idx.tolist(), vals.tolist(), strict=True))


def test_vocab_limit_is_never_sampled_but_logprobs_stay_whole() -> None:
    logits = torch.zeros(2, 64)
    logits[:, 60:] = 10.0  # padding ids would win
    params = [
        SamplingParams(temperature=0.0, logprobs=1),
        SamplingParams(temperature=1.0, seed=1, logprobs=1),
    ]
    tokens = sample(logits, rows(*params, seed=4), vocab_limit=60)
    assert all(t.token_id < 60 for t in tokens)
    assert all(t.top_logprobs is not None and t.top_logprobs[0][0] < 60 for t in tokens)


def _filter_with_mask_indexing(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The top-p step written with boolean indexing (which reads the mask back to the host)."""
    logits = logits / p.temperature
    if p.top_k_enabled and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    drop = sorted_p.cumsum(0) - sorted_p >= p.top_p
    drop[0] = False
    probs = probs.scatter(0, order[drop], 0.0)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_without_a_read_back_keeps_the_same_probabilities(top_p: float) -> None:
    gen = torch.Generator().manual_seed(int(top_p * 1000))
    for _ in range(5):
        logits = torch.randn(300, generator=gen) * 3
        p = SamplingParams(temperature=0.8, top_p=top_p, top_k=100, min_p=0.01)
        assert torch.equal(_filter(logits, p), _filter_with_mask_indexing(logits, p))


def test_seeded_rows_do_not_depend_on_their_neighbours() -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    seeded = SamplingParams(temperature=1.0, seed=9)
    free = SamplingParams(temperature=1.0)
    alone = sample(logits[1:2], rows(seeded, seed=9))
    gen = torch.Generator().manual_seed(9)
    mixed = sample(
        logits,
        [
            SampleRequest(free, [1], 1, None),
            SampleRequest(seeded, [1], 1, gen),
            SampleRequest(free, [1], 1, None),
        ],
        torch.Generator().manual_seed(5),
    )
    assert mixed[1].token_id == alone[0].token_id


def test_pending_step_fails_rows_with_non_finite_logits() -> None:
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(3))
    logits[1, 4] = math.nan
    finite = torch.isfinite(logits).all(dim=-1)
    batch = sample_batch(logits, rows(*[SamplingParams(temperature=0.0)] * 3), finite=finite)
    assert batch.finite_rows() == [True, False, True]
    result = PendingStep(StepResult(), [10, 11, 12], batch).wait()
    assert sorted(result.sampled) == [10, 12] and result.failed == {
        11: "the model produced non-finite logits"
    }
    assert result.sampled[10].token_id == int(logits[0].argmax())
    assert PendingStep(StepResult()).wait().sampled == {}  # a step that sampled nothing


def test_batch_without_started_copy_reads_its_tensors() -> None:
    batch = SampledBatch(torch.tensor([4, 5]), [None, None])
    assert [t.token_id for t in batch.tokens()] == [4, 5]
