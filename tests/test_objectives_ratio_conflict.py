"""GTPO (policylab/algo/objectives/conflict_tokens.py): conflict masks, entropy filter, and the reduction to REINFORCE."""

from __future__ import annotations

import pytest
import torch

from policylab import registry
from policylab.algo.advantages.group_baselines import dr_grpo_advantage
from policylab.algo.objectives.conflict_tokens import gtpo_conflict_masks, gtpo_token_factors
from policylab.rollouts import PolicyOutputs
from test_objectives_ratio_common import aggregate, annotated, grad_of, make_batch

PAD = 0


def padded(rows):
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows])
    return ids, mask


def test_gtpo_spec_conflict_example():
    ids, mask = padded([[5, 7, 9], [5, 7, 8, 9]])
    sign = torch.tensor([1.0, -1.0])
    delta, n = gtpo_token_factors(ids, mask, torch.zeros(2, dtype=torch.long), sign, 2.0)
    assert torch.equal(delta[0, :3], torch.tensor([2.0, 2.0, 2.0]))
    assert torch.equal(delta[1], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert torch.equal(n, torch.tensor([3.0, 3.0]))
    assert delta[0, 3] == 0  # padding


def test_gtpo_backward_run_aligns_on_each_completions_last_token():
    ids, mask = padded([[4, 2, 3], [8, 8, 2, 3]])
    fwd, bwd = gtpo_conflict_masks(ids, mask, torch.tensor([1.0, -1.0]))
    assert not fwd.any()
    assert torch.equal(bwd, torch.tensor([[False, True, True, False], [False, False, True, True]]))


def test_gtpo_only_the_initial_run_counts_and_both_directions_multiply():
    # positions 0 and 2 match, position 1 does not: only position 0 is a forward conflict
    ids, mask = padded([[1, 2, 3, 4], [1, 9, 3, 4]])
    delta, n = gtpo_token_factors(ids, mask, torch.zeros(2, dtype=torch.long), torch.tensor([1.0, -1.0]), 2.0)
    # forward: pos 0; backward: pos 3 and 2 (then 2 vs 9 breaks the run)
    assert torch.equal(delta[0], torch.tensor([2.0, 1.0, 2.0, 2.0]))
    assert torch.equal(delta[1], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert torch.equal(n, torch.tensor([3.0, 3.0]))
    same, mask = padded([[6, 6], [6, 6]])  # identical completions: every token conflicts both ways
    delta, _ = gtpo_token_factors(same, mask, torch.zeros(2, dtype=torch.long), torch.tensor([1.0, -1.0]), 2.0)
    assert torch.equal(delta, torch.tensor([[4.0, 4.0], [0.0, 0.0]]))


def test_gtpo_inactive_completions_and_other_groups_are_untouched():
    ids, mask = padded([[5, 7], [5, 7], [5, 7]])
    group = torch.tensor([0, 0, 1])
    delta, n = gtpo_token_factors(ids, mask, group, torch.tensor([1.0, 0.0, -1.0]), 2.0)
    assert torch.equal(delta, mask)  # no negative in group 0, and group 1 has no positive
    assert torch.equal(n, torch.ones(3))


def gtpo_batch(rows, rewards, entropy_value=0.3):
    ids, mask = padded(rows)
    b, t = ids.shape
    batch, leaf = make_batch(torch.full((b, t), -1.0).tolist(), None, None, mask=mask, ids=ids, rewards=rewards,
                             entropy=torch.full((b, t), entropy_value).tolist())
    batch.advantages = dr_grpo_advantage(batch)
    return batch, leaf


def test_gtpo_without_conflicts_is_reinforce_with_seq_mean_token_mean():
    batch, leaf = gtpo_batch([[1, 2, 3], [4, 5], [6, 7, 8, 9]], [1.0, 0.0, 0.5])
    loss, _ = registry.build("objective", "gtpo", {"ent_scale": 0.0, "ent_threshold": float("inf"), "gtpo_reduce": "mean"})(
        PolicyOutputs(logp=leaf, entropy=batch.entropy), batch)
    ref_leaf = leaf.detach().clone().requires_grad_(True)
    ref_loss, _ = registry.build("objective", "reinforce")(PolicyOutputs(logp=ref_leaf), batch)
    total, ref_total = aggregate(loss, batch, "seq-mean-token-mean"), aggregate(ref_loss, batch, "seq-mean-token-mean")
    assert torch.allclose(grad_of(total, leaf), grad_of(ref_total, ref_leaf), atol=1e-7)
    # "sum" (the code's total over completions) is the mean times the number of completions
    loss_sum, _ = registry.build("objective", "gtpo", {"ent_scale": 0.0, "ent_threshold": float("inf")})(
        PolicyOutputs(logp=leaf, entropy=batch.entropy), batch)
    assert torch.allclose(loss_sum, 3 * loss)


def test_gtpo_entropy_filter_and_shaping():
    batch, leaf = gtpo_batch([[1, 2], [3, 4]], [1.0, 0.0])
    objective = registry.build("objective", "gtpo", {"gtpo_reduce": "mean"})
    entropy = torch.tensor([[0.8, 0.8], [0.5, 0.5]])
    g = grad_of(objective(PolicyOutputs(logp=leaf, entropy=entropy), batch)[0].sum(), leaf)
    assert torch.all(g[0] == 0)  # Hbar = 0.8 > 0.7: filtered
    assert torch.allclose(g[1], torch.full((2,), -(-0.5 - 0.05)))  # A = -0.5 - 0.1 * 0.5
    _, metrics = objective(PolicyOutputs(logp=leaf, entropy=entropy), batch)
    assert float(metrics["gtpo/filtered_frac"]) == 0.5


def test_gtpo_conflict_tokens_reweight_the_gradient():
    batch, leaf = gtpo_batch([[5, 7, 9], [5, 7, 8, 9]], [1.0, 0.0])
    g = grad_of(registry.build("objective", "gtpo", {"gtpo_reduce": "mean", "ent_scale": 0.0})(
        PolicyOutputs(logp=leaf, entropy=batch.entropy), batch)[0].sum(), leaf)
    # positive: A = 0.5, delta 2 on all three tokens, n = 3; negative: only token 2 keeps A = -0.5, n = 3
    assert torch.allclose(g[0, :3], torch.full((3,), -0.5 * 2 / 3))
    assert torch.allclose(g[1], torch.tensor([0.0, 0.0, 0.5 / 3, 0.0]))


def test_gtpo_annotate_uses_whole_groups_and_survives_a_wider_batch():
    batch, leaf = gtpo_batch([[5, 7, 9], [5, 7, 8, 9]], [1.0, 0.0])
    objective = registry.build("objective", "gtpo")
    prepared = annotated(objective, batch)
    # the positive alone (a micro-batch) still carries the group's conflict factors
    alone = prepared.select([0])
    loss, _ = objective(PolicyOutputs(logp=leaf[:1, :3], entropy=alone.entropy[:, :3]),
                        alone.with_(completion_ids=alone.completion_ids[:, :3], completion_mask=alone.completion_mask[:, :3],
                                    entropy=alone.entropy[:, :3]))
    assert torch.allclose(loss.detach(), torch.full((1, 3), -(0.5 - 0.1 * 0.3) * 2 / 3 * 2))


def test_gtpo_bad_reduce_raises():
    with pytest.raises(ValueError, match="gtpo_reduce"):
        registry.build("objective", "gtpo", {"gtpo_reduce": "max"})
