"""Rollout engines: EOS/truncation masks, behaviour log-probs, the pruned decode loop, top-k/top-p."""

import pytest
import torch

from policylab import models
from policylab.rollout import decode
from policylab.rollout.decode import PrunedDecodeEngine, draw_inverse_cdf, filter_top_k_top_p
from policylab.interfaces import Sampling
from policylab.models.forward import policy_forward, trim
from policylab.rollout.hf import HFEngine, completion_masks


def bound(engine, model, tok):
    engine.bind(model, tok)
    return engine


def test_completion_mask_stops_after_first_eos_and_flags_truncation():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]])
    mask, truncated = completion_masks(ids, {2})
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, True]


def test_top_k_top_p_filter():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_top_k_top_p(scores, 2, 1.0)).tolist() == [[False, False, True, True]]
    # nucleus 0.7: 0.5 then 0.3 reaches 0.8 >= 0.7, so the first two survive
    assert torch.isinf(filter_top_k_top_p(scores, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_top_k_top_p(scores, 0, 0.4)).tolist() == [[False, True, True, True]]


@pytest.fixture(scope="module")
def warm_model(tiny_arith_model):
    return models.load(tiny_arith_model)


@pytest.mark.parametrize("engine_cls", [HFEngine, PrunedDecodeEngine])
def test_behaviour_logprobs_match_the_training_forward(engine_cls, warm_model):
    model, tok = warm_model
    rows = [{"prompt": f"{a} + {a + 3}="} for a in range(6)]
    torch.manual_seed(0)
    batch = bound(engine_cls(), model, tok).generate(rows, Sampling(group_size=3, max_new_tokens=6, temperature=0.8, top_k=20))
    lengths = batch.completion_mask.sum(-1)
    assert lengths.min() < lengths.max(), "the test needs completions of different lengths"
    out = policy_forward(model, trim(batch), temperature=0.8)
    width = out.logp.shape[1]
    assert torch.allclose(out.logp * batch.completion_mask[:, :width], batch.behavior_logp[:, :width], atol=1e-5)
    assert (batch.group == torch.arange(6).repeat_interleave(3)).all()


def test_pruned_engine_matches_transformers_generate(warm_model):
    model, tok = warm_model
    rows = [{"prompt": f"{a} + {2 * a}="} for a in range(8)]
    greedy = Sampling(group_size=1, max_new_tokens=6, temperature=0.0)
    pruned, hf = bound(PrunedDecodeEngine(), model, tok), bound(HFEngine(), model, tok)
    assert pruned.generate(rows, greedy).completions == hf.generate(rows, greedy).completions
    sampled = Sampling(group_size=4, max_new_tokens=6, temperature=1.0)
    torch.manual_seed(3)
    a = bound(PrunedDecodeEngine(draw="multinomial"), model, tok).generate(rows, sampled)
    torch.manual_seed(3)
    b = hf.generate(rows, sampled)
    # same RNG stream and same distributions: the same samples, EOS flags and masks
    assert a.completions == b.completions
    assert torch.equal(a.truncated, b.truncated)
    assert torch.equal(a.completion_mask, b.completion_mask[:, : a.completion_mask.shape[1]])


def test_pruned_engine_prefills_each_distinct_prompt_once(warm_model):
    model, tok = warm_model
    calls = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    try:
        rows = [{"prompt": "1 + 2="}, {"prompt": "13 + 14 + 15="}, {"prompt": "7 + 8="}]
        out = bound(PrunedDecodeEngine(), model, tok).generate(rows, Sampling(group_size=4, max_new_tokens=3))
    finally:
        hook.remove()
    assert calls[0][0] == 3 and all(shape[1] == 1 for shape in calls[1:])  # one prefill row per prompt, then decode
    assert out.batch_size == 12 and torch.equal(out.prompt_ids[0], out.prompt_ids[3])
    assert not torch.equal(out.prompt_ids[0], out.prompt_ids[4])


def test_inverse_cdf_draw_has_the_categorical_frequencies():
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    n = 200_000
    draws = draw_inverse_cdf((p * 7.0).expand(n, 5))  # unnormalised input is fine
    freq = torch.bincount(draws, minlength=5).double() / n
    sigma = (p.double() * (1 - p.double()) / n).sqrt()
    assert freq[4] == 0  # a zero-probability token is never drawn
    assert ((freq - p.double()).abs() <= 5 * sigma + 1e-12).all(), freq


def test_inverse_cdf_draw_never_passes_the_last_nonzero_token(monkeypatch):
    # u at the very top of [0, 1): rounding of u * total must not select the zero-probability tail
    monkeypatch.setattr(decode.torch, "rand", lambda shape, **kw: torch.ones(shape, **kw))
    assert draw_inverse_cdf(torch.tensor([[0.2, 0.8, 0.0, 0.0], [0.0, 0.0, 0.3, 0.0]])).tolist() == [1, 2]


def test_unknown_draw_is_a_clear_error():
    with pytest.raises(ValueError, match="inverse_cdf"):
        PrunedDecodeEngine(draw="gumbel")
