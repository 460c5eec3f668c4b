"""Shared property tests for EVERY registered objective (objectives.md §0 "Shared property tests").

The objective list comes from the registry at collection time, so an objective added later by anyone is
covered without editing this file. An objective whose spec says a property does not hold registers
itself with ``tags=("skip:T-ONPOL",)`` (etc.) and its docstring says why; any other failure, including
an exception because the objective wants an input this fixture lacks, is a test FAILURE.

T-ONPOL   logp == old_logp: d(Agg(loss))/d logp[i,t] == -a[i,t] * A[i,t] (REINFORCE), for every aggregation.
T-ZEROADV a group with equal rewards (A = 0) contributes exactly zero gradient.
T-PAD     extra mask-0 positions with arbitrary values change neither the aggregated loss nor the gradients.
T-MICRO   micro-batches aggregated with the global Normaliser sum to the full-batch loss and gradient.
Contract  loss is [B,T] and finite (also with an empty completion row); metrics are finite scalars.

The aggregation weights a[i,t] below are written from the spec, not read from policylab.algo.aggregate.
"""

from __future__ import annotations

import math

import pytest
import torch

from policylab import registry
from policylab.algo.advantages.group_baselines import grpo_advantage
from policylab.rollouts import Normaliser, PolicyOutputs, Rollouts
from policylab.testing import fill_required

OBJECTIVES = registry.names("objective")
MAX_LEN = 9.0  # the constant length normaliser; deliberately larger than the batch's T so a batch-max bug shows
HIDDEN = 8

# (registered aggregate, its params, expected d Agg / d (m*l)[i,t] from objectives.md §0)
AGGREGATIONS = {
    "token-mean": ("token-mean", {}, lambda m: m / m.sum()),
    "seq-mean-token-mean": (
        "seq-mean-token-mean",
        {},
        lambda m: m / ((m.sum(-1) > 0).sum() * m.sum(-1, keepdim=True).clamp(min=1)),
    ),
    "seq-mean-token-sum": ("seq-mean-token-sum", {}, lambda m: m / (m.sum(-1) > 0).sum()),
    "sum-norm-trl": (
        "seq-mean-token-sum-norm",
        {"norm_constant": "batch_x_max_len"},
        lambda m: m / (m.shape[0] * MAX_LEN),
    ),
    "sum-norm-verl": ("seq-mean-token-sum-norm", {"norm_constant": "max_len"}, lambda m: m / MAX_LEN),
}

GROUP = [3, 8, 3, 8, 3, 8]  # non-contiguous prompt ids on purpose
LENGTHS = [6, 3, 5, 2, 4, 1]
T = 6


# ---------------------------------------------------------------------------------------------------
# a generous fixture: every optional Rollouts / PolicyOutputs field filled with sensible values


def make_rollouts(rewards, *, lengths=LENGTHS, group=GROUP, width=T, off_policy=0.3, seed=0):
    """Rollouts + PolicyOutputs leaves (logp, entropy) with every optional field filled.

    ``off_policy``: scale of old_logp - logp (0 = on-policy values); values up to ~0.3 put some tokens
    outside a 0.2 clip range so clipping branches are exercised.
    """
    gen = torch.Generator().manual_seed(seed)
    b = len(rewards)
    mask = torch.zeros(b, width)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
    logp = torch.log(torch.rand(b, width, generator=gen) * 0.85 + 0.1)
    old_logp = (logp + off_policy * (2 * torch.rand(b, width, generator=gen) - 1)).clamp(max=0.0)
    ref_logp = (logp + 0.4 * (2 * torch.rand(b, width, generator=gen) - 1)).clamp(max=0.0)
    entropy = torch.rand(b, width, generator=gen) * 1.9 + 0.1
    hidden = torch.randn(b, width, HIDDEN, generator=gen)
    r = torch.tensor(rewards, dtype=torch.float32)
    batch = Rollouts(
        prompt_ids=torch.ones(b, 4, dtype=torch.long),
        prompt_mask=torch.ones(b, 4),
        completion_ids=torch.randint(3, 50, (b, width), generator=gen),
        completion_mask=mask,
        group=torch.tensor(group[:b]),
        truncated=torch.tensor([n == width for n in lengths]),
        prompts=[f"What is {g} + 1?" for g in group[:b]],
        completions=[f"The answer is {int(x)}" for x in rewards],
        rows=[{"answer": str(g + 1), "prompt_index": g, "difficulty": 0.5} for g in group[:b]],
        rewards=r,
        reward_components={"accuracy": (r > 0).float(), "format": torch.ones(b)},
        behavior_logp=old_logp.clone(),
        old_logp=old_logp,
        ref_logp=ref_logp,
        entropy=entropy.clone(),
        extras={"max_new_tokens": int(MAX_LEN)},
    )
    batch.advantages = grpo_advantage(batch)
    return batch, logp, entropy, hidden


def leaves(logp, entropy):
    return logp.clone().requires_grad_(True), entropy.clone().requires_grad_(True)


def call_objective(name, out, batch, test_id):
    """Run a freshly built objective; any exception is a failure that says how to resolve it."""
    try:
        objective = registry.build("objective", name)
        result = objective(out, fill_required(objective, batch, hidden=HIDDEN))
    except Exception as err:  # noqa: BLE001 - we want every failure reported the same clear way
        pytest.fail(
            f"objective {name!r} raised {type(err).__name__}: {err}\n"
            f"on the shared {test_id} fixture (PolicyOutputs: logp, entropy, hidden; Rollouts: behavior_logp, old_logp, "
            f"ref_logp, entropy, rewards, reward_components 'accuracy'/'format', advantages [B], rows, "
            f"extras 'max_new_tokens'). If the objective needs a generic input missing here, add it "
            f"to make_rollouts() in tests/test_objective_properties.py; if its spec says {test_id} does not hold, "
            f"register it with tags=('skip:{test_id}',) and say why in its docstring."
        )
    assert isinstance(result, tuple) and len(result) == 2, f"objective {name!r} must return (loss [B,T], metrics)"
    loss, metrics = result
    assert loss.shape == batch.completion_mask.shape, (
        f"objective {name!r} returned loss of shape {tuple(loss.shape)}, expected per-token {tuple(batch.completion_mask.shape)}"
    )
    return loss, metrics


def aggregate(loss, mask, mode):
    agg_name, params, _ = AGGREGATIONS[mode]
    norm = Normaliser.of(mask, MAX_LEN)
    return registry.build("aggregate", agg_name, params)(loss * mask, mask, norm)


def grads(total, logp_leaf, ent_leaf):
    g_logp, g_ent = torch.autograd.grad(total, [logp_leaf, ent_leaf], allow_unused=True, retain_graph=True)
    g_logp = torch.zeros_like(logp_leaf) if g_logp is None else g_logp
    g_ent = torch.zeros_like(ent_leaf) if g_ent is None else g_ent
    return g_logp, g_ent


def skip_if_tagged(name, test_id):
    if f"skip:{test_id}" in registry.get("objective", name).tags:
        pytest.skip(f"objective {name!r} is tagged skip:{test_id} (its spec says the property does not hold)")


def test_the_registry_has_the_baseline_objectives():
    for name in ("reinforce", "ppo_clip", "gspo", "gspo_token", "cispo"):
        assert name in OBJECTIVES


# ---------------------------------------------------------------------------------------------------
# T-ONPOL


@pytest.mark.parametrize("mode", list(AGGREGATIONS))
@pytest.mark.parametrize("old_stored", [True, False], ids=["old_logp=logp", "old_logp=None"])
@pytest.mark.parametrize("name", OBJECTIVES)
def test_onpolicy_gradient_is_reinforce(name, old_stored, mode):
    skip_if_tagged(name, "T-ONPOL")
    # rewards give positive and negative advantages in both groups
    batch, logp, entropy, hidden = make_rollouts([1.0, 0.0, 0.0, 1.0, 0.5, 0.2], off_policy=0.0)
    batch.old_logp = logp.clone() if old_stored else None
    batch.behavior_logp = logp.clone()
    adv = batch.seq_advantages()
    assert (adv > 0).any() and (adv < 0).any()
    logp_leaf, ent_leaf = leaves(logp, entropy)
    out = PolicyOutputs(logp=logp_leaf, entropy=ent_leaf, hidden=hidden)
    loss, _ = call_objective(name, out, batch, "T-ONPOL")
    mask = batch.completion_mask
    g_logp, g_ent = grads(aggregate(loss, mask, mode), logp_leaf, ent_leaf)
    weight = AGGREGATIONS[mode][2](mask)
    expected = -weight * adv
    assert torch.allclose(g_logp, expected, atol=1e-6, rtol=1e-4), (
        f"{name} on-policy gradient under {mode} differs from REINFORCE -a*A:\n"
        f"got {g_logp}\nexpected {expected}"
    )
    assert torch.all(g_ent == 0), f"{name}: on-policy REINFORCE has no gradient through the entropy"


# ---------------------------------------------------------------------------------------------------
# T-ZEROADV


@pytest.mark.parametrize("off_policy", [0.0, 0.3], ids=["on-policy", "off-policy"])
@pytest.mark.parametrize("mode", list(AGGREGATIONS))
@pytest.mark.parametrize("name", OBJECTIVES)
def test_equal_reward_group_gives_exactly_zero_gradient(name, mode, off_policy):
    skip_if_tagged(name, "T-ZEROADV")
    # group 3 (rows 0, 2, 4) all correct; group 8 informative. Off-policy: ratios differ from 1, some clipped.
    batch, logp, entropy, hidden = make_rollouts([1.0, 1.0, 1.0, 0.0, 1.0, 0.0], off_policy=off_policy)
    zero_group = batch.group == 3
    assert torch.all(batch.advantages[zero_group] == 0)
    logp_leaf, ent_leaf = leaves(logp, entropy)
    out = PolicyOutputs(logp=logp_leaf, entropy=ent_leaf, hidden=hidden)
    loss, _ = call_objective(name, out, batch, "T-ZEROADV")
    g_logp, g_ent = grads(aggregate(loss, batch.completion_mask, mode), logp_leaf, ent_leaf)
    assert torch.all(g_logp[zero_group] == 0), f"{name}/{mode}: equal-reward group got logp gradient {g_logp[zero_group]}"
    assert torch.all(g_ent[zero_group] == 0), f"{name}/{mode}: equal-reward group got entropy gradient {g_ent[zero_group]}"
    # on-policy the informative group must still learn something, or the test above proves nothing
    # (off-policy a tight trust region, e.g. GSPO's 3e-4, may legitimately clip everything)
    if off_policy == 0.0:
        assert g_logp[~zero_group].abs().sum() > 0, f"{name}/{mode}: no gradient at all, even from the informative group"


# ---------------------------------------------------------------------------------------------------
# T-PAD


def pad_batch(batch: Rollouts, logp, entropy, hidden, extra: int, seed: int = 1):
    """The same batch with ``extra`` more mask-0 positions holding arbitrary (but valid) values."""
    gen = torch.Generator().manual_seed(seed)
    b = batch.batch_size

    def logprobs():  # arbitrary log-probabilities, some very unlikely
        return torch.log(torch.rand(b, extra, generator=gen) * 0.999 + 1e-6)

    def cat(x, new):
        return torch.cat([x, new], dim=1)

    padded = batch.with_(
        completion_ids=cat(batch.completion_ids, torch.randint(0, 50, (b, extra), generator=gen)),
        completion_mask=cat(batch.completion_mask, torch.zeros(b, extra)),
        behavior_logp=cat(batch.behavior_logp, logprobs()),
        old_logp=cat(batch.old_logp, logprobs()),
        ref_logp=cat(batch.ref_logp, logprobs()),
        entropy=cat(batch.entropy, torch.rand(b, extra, generator=gen) * 5),
    )
    return (
        padded,
        cat(logp, logprobs()),
        cat(entropy, torch.rand(b, extra, generator=gen) * 5),
        cat(hidden, 10 * torch.randn(b, extra, HIDDEN, generator=gen)),
    )


# on: ratios 1; near: GSPO's 3e-4 trust region clips some sequences only; far: PPO's 0.2 range clips some tokens
OFF_POLICY = {"on": 0.0, "near": 1e-3, "far": 0.3}


@pytest.mark.parametrize("off_policy", list(OFF_POLICY))
@pytest.mark.parametrize("mode", list(AGGREGATIONS))
@pytest.mark.parametrize("name", OBJECTIVES)
def test_padding_changes_neither_loss_nor_gradient(name, mode, off_policy):
    skip_if_tagged(name, "T-PAD")
    batch, logp, entropy, hidden = make_rollouts([1.0, 0.0, 0.0, 1.0, 0.5, 0.2], off_policy=OFF_POLICY[off_policy])
    logp_leaf, ent_leaf = leaves(logp, entropy)
    loss, _ = call_objective(name, PolicyOutputs(logp_leaf, ent_leaf, hidden), batch, "T-PAD")
    total = aggregate(loss, batch.completion_mask, mode)
    g_logp, g_ent = grads(total, logp_leaf, ent_leaf)

    pbatch, plogp, pent, phidden = pad_batch(batch, logp, entropy, hidden, extra=3)
    plogp_leaf, pent_leaf = leaves(plogp, pent)
    ploss, _ = call_objective(name, PolicyOutputs(plogp_leaf, pent_leaf, phidden), pbatch, "T-PAD")
    ptotal = aggregate(ploss, pbatch.completion_mask, mode)
    assert torch.isfinite(ptotal), f"{name}/{mode}: padding made the loss non-finite"
    pg_logp, pg_ent = grads(ptotal, plogp_leaf, pent_leaf)

    assert torch.allclose(total, ptotal, atol=1e-6, rtol=1e-5), f"{name}/{mode}: loss {total} became {ptotal} with padding"
    assert torch.allclose(g_logp, pg_logp[:, :T], atol=1e-6, rtol=1e-5), f"{name}/{mode}: padding changed logp gradients"
    assert torch.all(pg_logp[:, T:] == 0), f"{name}/{mode}: padding positions got gradient {pg_logp[:, T:]}"
    assert torch.allclose(g_ent, pg_ent[:, :T], atol=1e-6, rtol=1e-5), f"{name}/{mode}: padding changed entropy gradients"
    assert torch.all(pg_ent[:, T:] == 0), f"{name}/{mode}: padding positions got entropy gradient"


# ---------------------------------------------------------------------------------------------------
# T-MICRO

PARTITIONS = {
    "uneven-across-groups": [[0, 3], [1, 4, 5], [2]],
    "one-row-each": [[i] for i in range(6)],
}


@pytest.mark.parametrize("off_policy", list(OFF_POLICY))
@pytest.mark.parametrize("partition", list(PARTITIONS))
@pytest.mark.parametrize("mode", list(AGGREGATIONS))
@pytest.mark.parametrize("name", OBJECTIVES)
def test_micro_batches_sum_to_the_full_batch(name, mode, partition, off_policy):
    skip_if_tagged(name, "T-MICRO")
    batch, logp, entropy, hidden = make_rollouts([1.0, 0.0, 0.0, 1.0, 0.5, 0.2], off_policy=OFF_POLICY[off_policy])
    # annotated fields are computed once per batch, before it is cut into micro-batches (as in the loop)
    batch = fill_required(registry.build("objective", name), batch, hidden=HIDDEN)
    agg_name, params, _ = AGGREGATIONS[mode]
    aggregate_fn = registry.build("aggregate", agg_name, params)
    norm = Normaliser.of(batch.completion_mask, MAX_LEN)  # global counts of the whole mini-batch

    logp_leaf, ent_leaf = leaves(logp, entropy)
    loss, _ = call_objective(name, PolicyOutputs(logp_leaf, ent_leaf, hidden), batch, "T-MICRO")
    full = aggregate_fn(loss * batch.completion_mask, batch.completion_mask, norm)
    g_logp, g_ent = grads(full, logp_leaf, ent_leaf)

    logp_leaf, ent_leaf = leaves(logp, entropy)
    micro_total = 0.0
    for rows in PARTITIONS[partition]:
        index = torch.tensor(rows)
        sub = batch.select(index)
        out = PolicyOutputs(logp=logp_leaf[index], entropy=ent_leaf[index], hidden=hidden[index])
        sub_loss, _ = call_objective(name, out, sub, "T-MICRO")
        micro_total = micro_total + aggregate_fn(sub_loss * sub.completion_mask, sub.completion_mask, norm)
    m_logp, m_ent = grads(micro_total, logp_leaf, ent_leaf)

    assert torch.allclose(full, micro_total, atol=1e-6, rtol=1e-5), f"{name}/{mode}: micro-batch losses sum to {micro_total}, full {full}"
    assert torch.allclose(g_logp, m_logp, atol=1e-6, rtol=1e-5), f"{name}/{mode}/{partition}: summed micro-batch gradient differs"
    assert torch.allclose(g_ent, m_ent, atol=1e-6, rtol=1e-5), f"{name}/{mode}/{partition}: summed entropy gradient differs"


# ---------------------------------------------------------------------------------------------------
# contract: shapes, finiteness, an empty completion row (rules: "empty masks -> no NaN")


@pytest.mark.parametrize("name", OBJECTIVES)
def test_contract_finite_loss_and_scalar_metrics_with_an_empty_row(name):
    batch, logp, entropy, hidden = make_rollouts(
        [1.0, 0.0, 0.0, 1.0, 0.5, 0.2], lengths=[6, 3, 0, 2, 4, 1], off_policy=0.3
    )
    logp_leaf, ent_leaf = leaves(logp, entropy)
    loss, metrics = call_objective(name, PolicyOutputs(logp_leaf, ent_leaf, hidden), batch, "contract")
    masked = loss * batch.completion_mask
    assert torch.isfinite(masked).all(), f"{name}: non-finite per-token loss {loss}"
    for mode in AGGREGATIONS:
        total = aggregate(loss, batch.completion_mask, mode)
        g_logp, g_ent = grads(total, logp_leaf, ent_leaf)
        assert torch.isfinite(total) and torch.isfinite(g_logp).all() and torch.isfinite(g_ent).all(), f"{name}/{mode}"
        assert torch.all(g_logp[2] == 0), f"{name}/{mode}: the empty row got a gradient"
    assert isinstance(metrics, dict), f"{name}: metrics must be a dict"
    for key, value in metrics.items():
        value = torch.as_tensor(value)
        assert value.numel() == 1, f"{name}: metric {key!r} is not a scalar (shape {tuple(value.shape)})"
        assert math.isfinite(float(value)), f"{name}: metric {key!r} = {float(value)} is not finite"
        assert not value.requires_grad, f"{name}: metric {key!r} carries a graph (detach it)"
