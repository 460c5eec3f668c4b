"""Helpers for the ratio-family tests (objectives.md §2), and the property every ``prepare``-using objective of
the family must keep: after ``prepare`` on the whole rollout batch, micro-batches that split groups sum to
the full-batch loss and gradient (T-MICRO of §0, with the group statistics computed once per rollout batch).
"""

from __future__ import annotations

import math

import pytest
import torch

from policylab import registry
from policylab.algo.advantages import grpo_advantage
from policylab.rollouts import Normaliser, PolicyOutputs, Rollouts


def make_batch(logp, old_logp=None, adv=None, *, mask=None, rewards=None, group=None, entropy=None, ids=None,
               truncated=None, extras=None):
    """A Rollouts whose policy log-probs are returned as a leaf; everything else as given (tiny tensors)."""
    logp = torch.as_tensor(logp, dtype=torch.float32)
    b, t = logp.shape
    mask = torch.ones(b, t) if mask is None else torch.as_tensor(mask, dtype=torch.float32)
    batch = Rollouts(
        prompt_ids=torch.ones(b, 2, dtype=torch.long),
        prompt_mask=torch.ones(b, 2),
        completion_ids=torch.ones(b, t, dtype=torch.long) if ids is None else torch.as_tensor(ids),
        completion_mask=mask,
        group=torch.zeros(b, dtype=torch.long) if group is None else torch.as_tensor(group),
        truncated=torch.zeros(b, dtype=torch.bool) if truncated is None else torch.as_tensor(truncated),
        rewards=None if rewards is None else torch.as_tensor(rewards, dtype=torch.float32),
        old_logp=None if old_logp is None else torch.as_tensor(old_logp, dtype=torch.float32),
        entropy=None if entropy is None else torch.as_tensor(entropy, dtype=torch.float32),
        advantages=None if adv is None else torch.as_tensor(adv, dtype=torch.float32),
        extras=dict(extras or {}),
    )
    return batch, logp.clone().requires_grad_(True)


def log_of(ratios):
    """old_logp for a wanted ratio per token, with logp = 0 (p = 1 is fine: only differences matter)."""
    return [[-math.log(r) for r in row] for row in ratios]


def aggregate(loss, batch, mode="token-mean", max_len=8.0, **params):
    mask = batch.completion_mask
    return registry.build("aggregate", mode, params)(loss * mask, mask, Normaliser.of(mask, max_len))


def grad_of(total, leaf):
    (g,) = torch.autograd.grad(total, leaf, retain_graph=True)
    return g


def random_rollouts(seed=0, off_policy=0.3):
    """Six completions in two interleaved groups, varied lengths, every field a ratio objective reads."""
    gen = torch.Generator().manual_seed(seed)
    lengths, width = [6, 3, 5, 2, 4, 1], 6
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.2])
    mask = torch.zeros(6, width)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    logp = torch.log(torch.rand(6, width, generator=gen) * 0.85 + 0.1)
    old = (logp + off_policy * (2 * torch.rand(6, width, generator=gen) - 1)).clamp(max=0.0)
    ids = torch.randint(3, 6, (6, width), generator=gen)  # a small vocabulary, so conflicts occur
    batch = Rollouts(
        prompt_ids=torch.ones(6, 2, dtype=torch.long), prompt_mask=torch.ones(6, 2), completion_ids=ids,
        completion_mask=mask, group=torch.tensor([3, 8, 3, 8, 3, 8]), truncated=torch.zeros(6, dtype=torch.bool),
        rewards=rewards, old_logp=old, entropy=torch.rand(6, width, generator=gen) * 1.5 + 0.1,
    )
    batch.advantages = grpo_advantage(batch)
    return batch, logp


PREPARED = {
    "dhpo": {},
    "etr": {"alpha": 0.5, "beta": 2.0},
    "gbpo": {"temperature": 0.5},
    "gtpo": {"ent_threshold": 10.0},
}


@pytest.mark.parametrize("partition", [[[0, 3, 1], [4, 2, 5]], [[0], [1, 2], [3, 4, 5]]], ids=["halves", "uneven"])
@pytest.mark.parametrize("name", list(PREPARED))
def test_micro_batches_after_prepare_sum_to_the_full_batch(name, partition):
    batch, logp = random_rollouts()
    objective = registry.build("objective", name, PREPARED[name])
    batch = objective.prepare(batch, None)
    mask = batch.completion_mask
    norm = Normaliser.of(mask, 8.0)
    agg = registry.build("aggregate", "token-mean")
    leaf = logp.clone().requires_grad_(True)
    loss, _ = objective(PolicyOutputs(logp=leaf, entropy=batch.entropy), batch)
    full = agg(loss * mask, mask, norm)
    g_full = grad_of(full, leaf)

    leaf = logp.clone().requires_grad_(True)
    total = 0.0
    for rows in partition:
        index = torch.tensor(rows)
        sub = batch.select(index)
        sub_loss, _ = objective(PolicyOutputs(logp=leaf[index], entropy=sub.entropy), sub)
        total = total + agg(sub_loss * sub.completion_mask, sub.completion_mask, norm)
    assert torch.allclose(full, total, atol=1e-6), f"{name}: micro-batches sum to {total}, full batch {full}"
    assert torch.allclose(g_full, grad_of(total, leaf), atol=1e-6), f"{name}: micro-batch gradients differ"
    assert g_full.abs().sum() > 0
