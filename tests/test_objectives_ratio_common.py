"""Helpers for the ratio-family objective tests, and the property every ``annotate``-using objective of the family
must keep: after ``annotate`` on the whole rollout batch, micro-batches that split groups sum to the full-batch
loss and gradient (T-MICRO, with the group statistics computed once per rollout batch); plus the declarations
check of every converted component (annotate returns its ``provides``; its recipe's components chain).
"""

from __future__ import annotations

import math

import pytest
import torch

from policylab import registry
from policylab.algo.advantages.group_baselines import grpo_advantage
from policylab.config import load_recipe
from policylab.fields import CORE_FIELDS
from policylab.interfaces import declared
from policylab.rollouts import Normaliser, PolicyOutputs
from policylab.testing import make_rollouts
from policylab.train.components import build_components


def make_batch(logp, old_logp=None, adv=None, *, mask=None, rewards=None, group=None, entropy=None, ids=None,
               truncated=None, extras=None):
    """A Rollouts (policylab.testing.make_rollouts) whose policy log-probs are returned as a leaf; everything else
    as given (tiny tensors). ``mask`` may have holes; the default is all ones."""
    logp = torch.as_tensor(logp, dtype=torch.float32)
    b, t = logp.shape
    fields = {name: torch.as_tensor(value, dtype=torch.float32)
              for name, value in (("old_logp", old_logp), ("entropy", entropy), ("advantages", adv)) if value is not None}
    batch = make_rollouts(rewards, group=group, lengths=[t] * b, prompt_len=2, truncated=truncated,
                          completion_ids=ids, extras=extras, batch=b, **fields)
    if mask is not None:
        batch.completion_mask = torch.as_tensor(mask, dtype=torch.float32)
    return batch, logp.clone().requires_grad_(True)


def annotated(component, batch, ctx=None):
    """``batch`` with the component's ``annotate`` result written in, as the loop does; checks that the hook
    returns exactly the fields it declares in ``provides``."""
    values = component.annotate(batch, ctx)
    assert set(values) == set(declared(component, "provides")), f"annotate returned {sorted(values)}"
    core = {k: v for k, v in values.items() if k in CORE_FIELDS}
    out = batch.with_(extras={**batch.extras, **{k: v for k, v in values.items() if k not in CORE_FIELDS}}, **core)
    out.validate("annotate")
    return out


def chain_builds(recipe):
    """The recipe's components chain (every field a component requires has a provider); returns them."""
    return build_components(load_recipe(recipe))


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
    logp = torch.log(torch.rand(6, width, generator=gen) * 0.85 + 0.1)
    old = (logp + off_policy * (2 * torch.rand(6, width, generator=gen) - 1)).clamp(max=0.0)
    ids = torch.randint(3, 6, (6, width), generator=gen)  # a small vocabulary, so conflicts occur
    batch = make_rollouts([1.0, 0.0, 0.0, 1.0, 0.5, 0.2], group=[3, 8, 3, 8, 3, 8], lengths=lengths, width=width,
                          prompt_len=2, completion_ids=ids, old_logp=old,
                          entropy=torch.rand(6, width, generator=gen) * 1.5 + 0.1)
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
def test_micro_batches_after_annotate_sum_to_the_full_batch(name, partition):
    batch, logp = random_rollouts()
    objective = registry.build("objective", name, PREPARED[name])
    batch = annotated(objective, batch)
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


# ---------------------------------------------------------------------------------------------------
# declarations: what annotate returns is what the component provides, and the recipes' components chain

ANNOTATING = {  # objective -> (params, fields it requires)
    "dhpo": ({}, ("entropy",)),
    "etr": ({}, ("rewards",)),
    "gbpo": ({}, ("rewards",)),
    "gtpo": ({}, ("rewards",)),
    "hapo": ({}, ("entropy",)),
    "mdpo": ({}, ()),
}


@pytest.mark.parametrize("name", list(ANNOTATING))
def test_annotate_returns_exactly_what_the_objective_provides(name):
    params, requires = ANNOTATING[name]
    objective = registry.build("objective", name, params)
    assert declared(objective, "requires") == requires
    batch, _ = random_rollouts()
    annotated(objective, batch)  # asserts the returned keys equal `provides` and the values fit their declarations
    assert not hasattr(objective, "prepare")


def test_constant_mixing_and_no_temperature_need_no_entropy_pass():
    assert declared(registry.build("objective", "dhpo", {"mixing": "constant"}), "requires") == ()
    assert declared(registry.build("objective", "dhpo", {"mixing": "constant"}), "provides") == ()
    assert declared(registry.build("objective", "hapo", {"temperature_tau": 0.0}), "requires") == ()


@pytest.mark.parametrize("recipe", ["dhpo", "minpro", "fiberpo", "r2vpo", "gbpo", "bpo", "mdpo", "etr", "hapo", "gtpo",
                                    "t_ppo", "ppo_gae", "grpo", "gspo", "cispo", "dapo"])
def test_the_recipes_components_chain(recipe):
    parts = chain_builds(recipe)
    planned = [node.label for node in parts.plan.prepare]
    if recipe in ("dhpo", "hapo"):  # the entropy pass comes from the built-in annotator, before the objective
        entropy = next(i for i, label in enumerate(planned) if "policy_entropy" in label)
        objective = next(i for i, label in enumerate(planned) if label.startswith("algorithm.objective"))
        assert entropy < objective
