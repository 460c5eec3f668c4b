"""SofT-GRPO math (§6.1): Gumbel soft-token inputs and the soft-position log-density."""

from __future__ import annotations

import pytest
import torch

from policylab import registry
from policylab.algo.objectives.soft_thinking import (
    clamped_gumbel,
    mix_embeddings,
    mixed_logprobs,
    soft_token_inputs,
    soft_token_logprob,
)

P = torch.tensor([0.7, 0.3])
NOISE = torch.tensor([0.5, -0.2])
IDS = torch.tensor([3, 1])


def logits_with_probs(probs_at_ids, vocab=5):
    """Logits over a vocabulary whose softmax, restricted to IDS and renormalised, equals ``probs_at_ids``."""
    logits = torch.full((vocab,), -1e4)
    logits[IDS] = torch.log(probs_at_ids)
    return logits


def test_spec_numbers_for_the_soft_log_density_and_its_ratio():
    y, weights = soft_token_inputs(P, NOISE, noise_factor=1.0, gumbel_temperature=0.1)
    old = soft_token_logprob(logits_with_probs(P), IDS, y)
    new = soft_token_logprob(logits_with_probs(torch.tensor([0.6, 0.4])), IDS, y)
    assert old.item() == pytest.approx(-1.063967, abs=1e-5)
    assert new.item() == pytest.approx(-1.157445, abs=1e-5)
    assert (new - old).item() == pytest.approx(-0.093478, abs=1e-5)
    assert weights[0].item() == pytest.approx(0.9999998, abs=1e-6) and weights[1].item() == pytest.approx(1.9e-7, rel=0.05)


def test_phi_peaks_at_zero_offset():
    y = torch.log(P + 1e-6)  # no noise: z = 0 under q = p
    at_peak = soft_token_logprob(logits_with_probs(P), IDS, y)
    assert at_peak.item() == pytest.approx(-1.0, abs=1e-6)
    for other in ([0.5, 0.5], [0.9, 0.1], [0.6, 0.4]):
        assert soft_token_logprob(logits_with_probs(torch.tensor(other)), IDS, y).item() < -1.0


def test_identical_policies_give_ratio_one_at_soft_and_discrete_positions():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, generator=gen)
    ids = torch.topk(logits, 3, dim=-1).indices
    probs = torch.softmax(logits, -1).gather(-1, ids)
    y, _ = soft_token_inputs(probs / probs.sum(-1, keepdim=True), clamped_gumbel((4, 3), gen))
    token_logp = torch.log_softmax(logits, -1)[:, 0]
    is_soft = torch.tensor([True, True, False, True])
    old = mixed_logprobs(token_logp, soft_token_logprob(logits, ids, y), is_soft)
    new = mixed_logprobs(token_logp.clone(), soft_token_logprob(logits.clone(), ids, y), is_soft)
    assert torch.all(torch.exp(new - old) == 1.0)


def test_gumbel_is_clamped_and_components_with_tiny_probability_are_ignored():
    g = clamped_gumbel((20000,), torch.Generator().manual_seed(1))
    assert g.min().item() >= -1.5 and g.max().item() <= 3.0
    # a component with q ~ 1e-6 (log q < -3) does not enter the mean
    y = torch.log(torch.tensor([0.999999, 1e-6]) + 1e-6)
    value = soft_token_logprob(logits_with_probs(torch.tensor([0.999999, 1e-6])), IDS, y)
    assert value.item() == pytest.approx(-1.0, abs=1e-5)


def test_mixture_embedding_is_the_weighted_sum():
    emb = torch.arange(12.0).reshape(6, 2)
    e = mix_embeddings(torch.tensor([0.25, 0.75]), torch.tensor([1, 4]), emb)
    assert e.tolist() == [0.25 * 2 + 0.75 * 8, 0.25 * 3 + 0.75 * 9]


def test_soft_and_latent_methods_register_nothing():
    names = registry.names("objective")
    assert not any(n in names for n in ("soft_grpo", "sof_t_grpo", "latent_grpo", "depo"))
