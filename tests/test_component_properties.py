"""Shared property tests for EVERY registered advantage, token-weights component and regularizer.

Like tests/test_objective_properties.py for objectives: the component list comes from the registry at
collection time, so a component added later is covered without editing this file. A component whose
paper says a property does not hold registers with ``tags=("skip:<TEST>",)`` and its docstring says why;
any other failure, including an exception on the shared fixture, is a test FAILURE.

Fields a component ``requires`` beyond the fixture's are filled from their declaration (policylab.fields:
per-row, shape, dtype) with seeded values, so the tests see what the loop would hand the component.

A-PERM   permuting the rows (groups intact) permutes the output the same way (no hidden order dependence).
A-PAD    extra mask-0 completion positions change nothing on the real tokens.
A-RELABEL  renumbering the prompt ids (non-contiguous -> 0..k-1) changes nothing.
A-SHIFT  adding a constant to every reward leaves a group-relative advantage unchanged (tag where absolute).
W-PERM / W-PAD   the same for token weights; W-DETACH: weights carry no gradient to the policy log-probs.
R-PAD / R-MICRO  a regularizer's aggregated loss and gradient ignore padding and are exact under micro-batching
         with the global normaliser (the same definitions as the objective tests).
"""

from __future__ import annotations

import pytest
import torch

from policylab import fields as F
from policylab import registry
from policylab.interfaces import has_hook
from policylab.rollouts import Normaliser, PolicyOutputs, Rollouts
from policylab.testing import fill_required, make_context

def shipped(kind: str) -> list[str]:
    """The components policylab ships: test files register their own (test_param_types_adv) at import, and
    which of them were imported before this collection depends on the order pytest was given the files."""
    return [n for n in registry.names(kind) if registry.get(kind, n).target.__module__.startswith("policylab.")]


ADVANTAGES = shipped("advantage")
TOKEN_WEIGHTS = shipped("token_weights")
REGULARIZERS = shipped("regularizer")

GROUP = [3, 8, 3, 8, 3, 8, 3, 8]  # non-contiguous prompt ids on purpose
LENGTHS = [6, 3, 5, 2, 4, 1, 6, 3]
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5, 1.0]
T = 6
HIDDEN = 8
MAX_LEN = 9


def make_batch(kind: str, name: str, *, rewards=REWARDS, lengths=LENGTHS, group=GROUP, width=T, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b = len(rewards)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()
    logp = torch.log(torch.rand(b, width, generator=gen) * 0.85 + 0.1)
    old = (logp + 0.2 * (2 * torch.rand(b, width, generator=gen) - 1)).clamp(max=0.0)
    ref = (logp + 0.4 * (2 * torch.rand(b, width, generator=gen) - 1)).clamp(max=0.0)
    entropy = torch.rand(b, width, generator=gen) * 1.9 + 0.1
    r = torch.tensor(rewards, dtype=torch.float32)
    batch = Rollouts(
        prompt_ids=torch.ones(b, 4, dtype=torch.long), prompt_mask=torch.ones(b, 4),
        completion_ids=torch.randint(3, 50, (b, width), generator=gen) * mask.long(), completion_mask=mask,
        group=torch.tensor(group), truncated=torch.tensor([n == width for n in lengths]),
        prompts=[f"What is {g} + 1?" for g in group], completions=[f"The answer is {int(x)}" for x in rewards],
        rows=[{"prompt": f"What is {g} + 1?", "answer": str(g + 1), "prompt_index": g, "difficulty": 0.5, "task": f"task{g % 2}"} for g in group],
        rewards=r, reward_components={"accuracy": (r > 0.5).float(), "format": torch.ones(b)},
        behavior_logp=old * mask, old_logp=old * mask, ref_logp=ref * mask, entropy=entropy * mask,
        extras={"max_new_tokens": MAX_LEN},
    )
    component = registry.build(kind, name, PARAMS.get(name, {}))
    batch = fill_required(component, batch, seed=seed, hidden=HIDDEN)
    if has_hook(component, "annotate"):  # what the loop would do: the component's own pass, on a tiny policy
        values = component.annotate(batch, tiny_context())
        batch = batch.with_(extras={**batch.extras, **{k: v for k, v in values.items() if k not in F.CORE_FIELDS}},
                            **{k: v for k, v in values.items() if k in F.CORE_FIELDS})
    return component, batch, logp * mask, entropy * mask


_CONTEXT = []


def tiny_context():
    """A StageContext over the tiny character-level model (hidden size HIDDEN), built once."""
    if not _CONTEXT:
        from policylab import models

        tok = models.tiny_tokenizer()
        policy = models.tiny_model(tok, hidden_size=HIDDEN, intermediate_size=16).eval()
        _CONTEXT.append(make_context(policy, tok, reference=policy, reward=_accuracy_reward))
    return _CONTEXT[0]


def _accuracy_reward(prompts, completions, rows):
    acc = torch.tensor([float(c.strip() == str(r.get("answer"))) for c, r in zip(completions, rows)])
    return acc, {"accuracy": acc}


# Parameters without a usable default (the recipe always sets them).
PARAMS = {"capo_curvature": {"lr": 1e-5}}


def skip_if_tagged(kind, name, test_id):
    if f"skip:{test_id}" in registry.get(kind, name).tags:
        pytest.skip(f"{kind} {name!r} is tagged skip:{test_id} (its paper says the property does not hold)")


def permute(batch: Rollouts, order: list[int]) -> Rollouts:
    return batch.select(order)


def pad(batch: Rollouts, extra: int, seed: int = 1) -> Rollouts:
    """``extra`` more completion positions, mask 0, with arbitrary values in every [B,T] tensor."""
    gen = torch.Generator().manual_seed(seed)
    b, t = batch.completion_ids.shape

    def widen(x):
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[:2] != (b, t):
            return x
        junk = (torch.rand((b, extra) + tuple(x.shape[2:]), generator=gen) * 3).to(x.dtype)
        return torch.cat([x, junk], dim=1)

    widened = {name: widen(getattr(batch, name)) for name in
               ("completion_ids", "behavior_logp", "old_logp", "ref_logp", "entropy", "advantages")}
    widened["completion_ids"] = torch.cat([batch.completion_ids, torch.zeros(b, extra, dtype=torch.long)], dim=1)
    return batch.with_(**widened, completion_mask=torch.cat([batch.completion_mask, torch.zeros(b, extra)], dim=1),
                       extras={k: widen(v) if F.lookup(k).per_row else v for k, v in batch.extras.items()})


def as_tokens(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    adv = adv.float()
    return (adv[:, None].expand_as(mask) if adv.dim() == 1 else adv[:, : mask.shape[1]]) * mask


def call(component, *args):
    result = component(*args)
    return result


# -- advantages -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ADVANTAGES)
def test_advantage_contract_and_permutation(name):
    skip_if_tagged("advantage", name, "A-PERM")
    component, batch, _, _ = make_batch("advantage", name)
    adv = as_tokens(component(batch), batch.completion_mask)
    assert torch.isfinite(adv).all(), f"advantage {name!r} is not finite on the shared fixture"
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    fresh, _, _, _ = make_batch("advantage", name)
    adv_p = as_tokens(fresh(permute(batch, order)), batch.completion_mask[order])
    torch.testing.assert_close(adv_p, adv[order], atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"advantage {name!r} depends on row order: {m}")


@pytest.mark.parametrize("name", ADVANTAGES)
def test_advantage_padding_invariance(name):
    skip_if_tagged("advantage", name, "A-PAD")
    component, batch, _, _ = make_batch("advantage", name)
    adv = as_tokens(component(batch), batch.completion_mask)
    fresh, _, _, _ = make_batch("advantage", name)
    padded = pad(batch, 3)
    adv_pad = as_tokens(fresh(padded), padded.completion_mask)[:, : batch.completion_mask.shape[1]]
    torch.testing.assert_close(adv_pad, adv, atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"advantage {name!r} changes with mask-0 padding: {m}")


@pytest.mark.parametrize("name", ADVANTAGES)
def test_advantage_group_relabel_invariance(name):
    skip_if_tagged("advantage", name, "A-RELABEL")
    component, batch, _, _ = make_batch("advantage", name)
    adv = as_tokens(component(batch), batch.completion_mask)
    fresh, _, _, _ = make_batch("advantage", name)
    relabelled = batch.with_(group=torch.tensor([{3: 0, 8: 1}[g] for g in GROUP]))
    torch.testing.assert_close(as_tokens(fresh(relabelled), batch.completion_mask), adv, atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"advantage {name!r} depends on the prompt ids' values: {m}")


@pytest.mark.parametrize("name", ADVANTAGES)
def test_advantage_reward_shift_invariance(name):
    """Group-relative estimators subtract a per-group baseline: a constant added to every reward cancels."""
    skip_if_tagged("advantage", name, "A-SHIFT")
    component, batch, _, _ = make_batch("advantage", name)
    adv = as_tokens(component(batch), batch.completion_mask)
    fresh, _, _, _ = make_batch("advantage", name)
    shifted = batch.with_(rewards=batch.rewards + 3.0)
    torch.testing.assert_close(as_tokens(fresh(shifted), batch.completion_mask), adv, atol=1e-4, rtol=1e-4,
                               msg=lambda m: f"advantage {name!r} is not invariant to a reward offset: {m}")


# -- token weights ----------------------------------------------------------------------------------------


def weights_of(component, batch, logp, entropy, requires_grad=False):
    logp = logp.clone().requires_grad_(requires_grad)
    out = PolicyOutputs(logp=logp, entropy=entropy.clone(), hidden=torch.randn(*logp.shape, HIDDEN,
                                                                               generator=torch.Generator().manual_seed(3)))
    weights, metrics = component(out, batch)
    assert weights.shape == batch.completion_mask.shape
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in metrics.values())
    return weights, logp


def _with_advantages(batch):
    from policylab.algo.advantages.group_baselines import grpo_advantage

    batch.advantages = grpo_advantage(batch)
    return batch


@pytest.mark.parametrize("name", TOKEN_WEIGHTS)
def test_token_weights_contract_permutation_and_no_gradient(name):
    skip_if_tagged("token_weights", name, "W-PERM")
    component, batch, logp, entropy = make_batch("token_weights", name)
    batch = _with_advantages(batch)
    w, leaf = weights_of(component, batch, logp, entropy, requires_grad=True)
    mask = batch.completion_mask
    assert torch.isfinite(w * mask).all()
    assert not w.requires_grad, f"token_weights {name!r} passes gradient into the policy log-probs (weights must be detached)"
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    fresh, _, _, _ = make_batch("token_weights", name)
    w_p, _ = weights_of(fresh, permute(batch, order), logp[order], entropy[order])
    torch.testing.assert_close(w_p * mask[order], (w * mask)[order], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", TOKEN_WEIGHTS)
def test_token_weights_padding_invariance(name):
    skip_if_tagged("token_weights", name, "W-PAD")
    component, batch, logp, entropy = make_batch("token_weights", name)
    batch = _with_advantages(batch)
    w, _ = weights_of(component, batch, logp, entropy)
    padded = pad(batch, 3)
    junk = torch.rand(logp.shape[0], 3, generator=torch.Generator().manual_seed(9))
    fresh, _, _, _ = make_batch("token_weights", name)
    w_pad, _ = weights_of(fresh, padded, torch.cat([logp, -junk], 1), torch.cat([entropy, junk], 1))
    t = batch.completion_mask.shape[1]
    torch.testing.assert_close(w_pad[:, :t] * batch.completion_mask, w * batch.completion_mask, atol=1e-5, rtol=1e-5)


# -- regularizers -----------------------------------------------------------------------------------------


def reg_loss(component, batch, logp, entropy, norm):
    leaf_l = logp.clone().requires_grad_(True)
    leaf_e = entropy.clone().requires_grad_(True)
    out = PolicyOutputs(logp=leaf_l, entropy=leaf_e,
                        hidden=torch.randn(*logp.shape, HIDDEN, generator=torch.Generator().manual_seed(3)))
    loss, metrics = component(out, batch)
    assert loss.shape == batch.completion_mask.shape
    mask = batch.completion_mask
    total = registry.build("aggregate", "token-mean")(loss * mask, mask, norm)
    g_l, g_e = torch.autograd.grad(total, [leaf_l, leaf_e], allow_unused=True)
    g_l = torch.zeros_like(leaf_l) if g_l is None else g_l
    g_e = torch.zeros_like(leaf_e) if g_e is None else g_e
    return total, g_l, g_e


@pytest.mark.parametrize("name", REGULARIZERS)
def test_regularizer_padding_invariance(name):
    skip_if_tagged("regularizer", name, "R-PAD")
    component, batch, logp, entropy = make_batch("regularizer", name)
    batch = _with_advantages(batch)
    total, g_l, g_e = reg_loss(component, batch, logp, entropy, Normaliser.of(batch.completion_mask, MAX_LEN))
    assert torch.isfinite(total)
    padded = pad(batch, 3)
    junk = torch.rand(logp.shape[0], 3, generator=torch.Generator().manual_seed(9))
    fresh, _, _, _ = make_batch("regularizer", name)
    total_p, g_lp, g_ep = reg_loss(fresh, padded, torch.cat([logp, -junk], 1), torch.cat([entropy, junk], 1),
                                   Normaliser.of(padded.completion_mask, MAX_LEN))
    t = logp.shape[1]
    torch.testing.assert_close(total_p, total, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_lp[:, :t], g_l, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_ep[:, :t], g_e, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", REGULARIZERS)
def test_regularizer_micro_batch_invariance(name):
    skip_if_tagged("regularizer", name, "R-MICRO")
    component, batch, logp, entropy = make_batch("regularizer", name)
    batch = _with_advantages(batch)
    norm = Normaliser.of(batch.completion_mask, MAX_LEN)
    total, g_l, g_e = reg_loss(component, batch, logp, entropy, norm)
    parts_total, parts_gl = 0.0, torch.zeros_like(logp)
    for rows in ([0, 1, 2], [3, 4, 5, 6, 7]):
        fresh, _, _, _ = make_batch("regularizer", name)
        t_i, gl_i, _ = reg_loss(fresh, batch.select(rows), logp[rows], entropy[rows], norm)
        parts_total = parts_total + t_i
        parts_gl[rows] = gl_i
    torch.testing.assert_close(parts_total, total, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts_gl, g_l, atol=1e-6, rtol=1e-5)
