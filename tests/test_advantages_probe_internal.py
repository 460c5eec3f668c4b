"""POISE (arXiv:2605.07579) and VERL effective-rank shaping (arXiv:2509.23808)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from policylab.algo.advantages.group_baselines import grpo_advantage
from policylab.algo.advantages.hidden_state_critics import (
    cross_rollout_baseline,
    effective_rank,
    entropy_features,
    rank_dynamics,
    rank_indicators,
    verl_aux,
    verl_shape,
)
from policylab.annotate.internal_state import POISEAdvantage, VERLAdvantage, prompt_and_completion_states
from policylab.config import load_recipe
from policylab.train.components import build_components
from test_advantages_probe_common import CharTokenizer, annotated, make_ctx, make_rollouts, tiny_model

# -- POISE ---------------------------------------------------------------------------------------------


def test_poise_t1_cross_rollout_baseline():
    b = cross_rollout_baseline(torch.tensor([0.7, 0.4]), torch.tensor([9.0, 9.0]), torch.tensor([0, 0]))
    assert b.tolist() == pytest.approx([0.4, 0.7])
    adv = torch.tensor([1.0, 0.0]) - b
    assert adv.tolist() == pytest.approx([0.6, -0.7])


def test_poise_partner_is_cyclic_within_noncontiguous_groups():
    values = torch.tensor([10.0, 20.0, 11.0, 12.0, 21.0])
    b = cross_rollout_baseline(values, torch.zeros(5), torch.tensor([1, 2, 1, 1, 2]))
    assert b.tolist() == [11.0, 21.0, 12.0, 10.0, 20.0]


def _poise_batch(group, rewards, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = make_rollouts(["p"] * len(group), ["a"] * len(group), group, rewards=rewards)
    r.extras["poise_features"] = torch.randn(len(group), dim, generator=g)
    r.extras["poise_prompt_features"] = torch.randn(len(group), 3, generator=g)
    return r


def test_poise_t2_own_features_never_enter_own_baseline():
    poise = POISEAdvantage(warmup_steps=0, hidden_width=8)
    r = _poise_batch([0, 0, 0], [1.0, 0.0, 1.0])
    before = copy.deepcopy(poise)(r)
    r2 = copy.deepcopy(r)
    r2.extras["poise_features"][1] += 5.0  # perturb rollout 1's features
    after = copy.deepcopy(poise)(r2)
    assert after[1] == before[1] and after[2] == before[2]
    assert after[0] != before[0]  # rollout 0's partner is rollout 1


def test_poise_t3_singleton_uses_prompt_head_only():
    poise = POISEAdvantage(warmup_steps=0, hidden_width=8)
    r = _poise_batch([0, 1, 1], [1.0, 0.0, 1.0])
    before = copy.deepcopy(poise)(r)
    r2 = copy.deepcopy(r)
    r2.extras["poise_features"][0] += 5.0  # the singleton's own trajectory features
    assert copy.deepcopy(poise)(r2)[0] == before[0]
    r3 = copy.deepcopy(r)
    r3.extras["poise_prompt_features"][0] += 5.0
    assert copy.deepcopy(poise)(r3)[0] != before[0]


def test_poise_warmup_uses_group_mean_and_probe_learns():
    poise = POISEAdvantage(warmup_steps=1, hidden_width=16, lr=0.05)
    r = _poise_batch([0, 0, 1, 1], [1.0, 0.0, 1.0, 1.0])
    assert poise(r).tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])
    losses = [poise.metrics["poise/probe_loss"]]
    for _ in range(30):
        poise(r)
        losses.append(poise.metrics["poise/probe_loss"])
    assert losses[-1] < 0.5 * losses[0]


def test_poise_resume_gives_same_output():
    a = POISEAdvantage(warmup_steps=1, hidden_width=8)
    batches = [_poise_batch([0, 0, 1, 1], [1.0, 0.0, 0.0, 1.0], seed=s) for s in range(3)]
    a(batches[0])
    b = POISEAdvantage(warmup_steps=1, hidden_width=8, seed=123)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for batch in batches[1:]:
        torch.testing.assert_close(a(batch), b(batch))


def test_poise_nan_reward_and_edge_cases():
    poise = POISEAdvantage(warmup_steps=0, hidden_width=8)
    r = _poise_batch([0, 0], [float("nan"), 1.0])
    adv = poise(r)
    assert adv[0] == 0 and not torch.isnan(adv).any()
    assert entropy_features(torch.zeros(1, 3), torch.zeros(1, 3)).tolist() == [[0.0] * 5]
    with pytest.raises(ValueError, match="reward_type"):
        POISEAdvantage(reward_type="ordinal")
    with pytest.raises(ValueError, match="annotate"):
        POISEAdvantage()(make_rollouts(["p"], ["a"], [0], rewards=[1.0]))


def test_poise_entropy_features_values():
    f = entropy_features(torch.tensor([[1.0, 3.0, 9.0]]), torch.tensor([[1.0, 1.0, 0.0]]))
    assert f[0].tolist() == pytest.approx([2.0, 1.0, 3.0, 1.0, math.log(2)])


def test_poise_annotate_features_from_tiny_model():
    r = make_rollouts(["Q: 1+1?", "Q: 2+2?"], ["2", "4!"], [0, 1], rewards=[1.0, 0.0])
    poise = POISEAdvantage()
    r = annotated(poise, r, make_ctx(tiny_model(hidden=32)))
    assert r.extras["poise_features"].shape == (2, 32 + 32 + 5)
    assert r.extras["poise_prompt_features"].shape == (2, 32)
    assert torch.isfinite(r.extras["poise_features"]).all()


def _manual_states(model, prompt: str, completion: str):
    """Last-layer states at every position and entropies predicting each completion token: one unpadded pass."""
    tok = CharTokenizer()
    p, c = tok.encode(prompt), tok.encode(completion)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([p + c]), output_hidden_states=True)
    states = out.hidden_states[-1][0].float()
    logp = torch.log_softmax(out.logits[0].float(), -1)
    entropy = -(logp.exp() * logp).sum(-1)
    return states[: len(p)], states[len(p) - 1 : len(p) - 1 + len(c)], entropy[len(p) - 1 : len(p) - 1 + len(c)]


def test_hidden_state_pass_matches_unpadded_forward():
    model = tiny_model()
    prompts, comps = ["Q: 1+1?", "Hi"], ["2", "abc"]
    r = make_rollouts(prompts, comps, [0, 1], rewards=[1.0, 0.0])
    p_states, p_mask, states, entropy = prompt_and_completion_states(r, make_ctx(model))
    for i, (p, c) in enumerate(zip(prompts, comps)):
        want_p, want_c, want_h = _manual_states(model, p, c)
        torch.testing.assert_close(p_states[i, : len(p)], want_p, atol=1e-4, rtol=1e-4)
        assert p_mask[i].sum() == len(p)
        torch.testing.assert_close(states[i, : len(c)], want_c, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(entropy[i, : len(c)], want_h, atol=1e-4, rtol=1e-4)
    assert states[0, 1:].abs().sum() == 0 and entropy[0, 1:].abs().sum() == 0  # padding stays zero


# -- VERL ----------------------------------------------------------------------------------------------


def test_verl_t1_effective_rank():
    assert effective_rank(torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]])) == pytest.approx(2.0, abs=1e-6)
    assert effective_rank(torch.tensor([[1.0, 0], [2, 0], [3, 0]])) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(torch.tensor([[1.0, 2.0]])) == 0.0
    assert effective_rank(torch.ones(3, 2)) == 0.0  # all rows equal: centred matrix is zero


def test_verl_t2_rank_dynamics():
    erv, era = rank_dynamics([1.0, 2.0, 4.0])
    assert erv == pytest.approx(1.75) and era == pytest.approx(1.5)
    assert rank_dynamics([3.0]) == (0.0, 0.0)
    assert rank_indicators(torch.randn(5, 4), stride=3)[:2] == (0.0, 0.0)  # L < 2s


def test_verl_t3_aux_and_shaping():
    delta = torch.tensor([[0.0, 0.5, 0.2]], dtype=torch.float64)
    assert float(verl_aux(delta, gain=2.0, coef=1.0)) == pytest.approx(0.329746, abs=1e-6)
    shaped = verl_shape(torch.tensor([1.0, -1.0]), torch.tensor([0.8, 0.8]), kappa=2.0)
    assert shaped.tolist() == pytest.approx([1.5, -0.5])
    assert verl_shape(torch.tensor([0.0]), torch.tensor([3.0])).tolist() == [0.0]
    assert verl_shape(torch.tensor([1.0]), torch.tensor([-3.0])).tolist() == [1.0]  # negative aux: no change


def test_verl_baselines_first_step_no_bonus_then_ema_and_resume():
    verl = VERLAdvantage()
    r = make_rollouts(["p"] * 4, ["a"] * 4, [0, 0, 1, 1], rewards=[1.0, 0.0, 1.0, 0.0])
    x = torch.tensor([[0.1, 1.0, 2.0], [0.3, 2.0, 4.0], [0.1, 1.0, 2.0], [0.3, 2.0, 4.0]])
    r.extras.update(verl_era=x[:, 0], verl_erv=x[:, 1], verl_er=x[:, 2])
    torch.testing.assert_close(verl(r), grpo_advantage(r))
    assert verl.baselines.tolist() == pytest.approx([0.2, 1.5, 3.0])
    saved = copy.deepcopy(verl.state_dict())
    out = verl(r)
    assert (out - grpo_advantage(r)).abs().sum() > 0
    assert verl.baselines.tolist() == pytest.approx([0.2, 1.5, 3.0])  # same batch mean -> EMA unchanged
    resumed = VERLAdvantage()
    resumed.load_state_dict(saved)
    torch.testing.assert_close(resumed(r), out)


def test_verl_annotate_on_tiny_model_and_sign_preserved():
    r = make_rollouts(["Q?"] * 4, ["abcdefgh", "abab", "x", "hello world"], [0, 0, 1, 1], rewards=[1.0, 0.0, 0.0, 1.0])
    verl = VERLAdvantage(diff_stride=2)
    r = annotated(verl, r, make_ctx(tiny_model()))
    x = torch.stack([r.extras[k] for k in ("verl_era", "verl_erv", "verl_er")], dim=-1)
    assert x.shape == (4, 3) and torch.isfinite(x).all()
    assert x[2].tolist() == [0.0, 0.0, 0.0]  # one token: no rank, no dynamics
    verl(r)
    out = verl(r)
    base = grpo_advantage(r)
    assert torch.all(torch.sign(out) == torch.sign(base)) and not torch.isnan(out).any()


def test_verl_indicators_from_the_unpadded_states():
    model = tiny_model()
    r = make_rollouts(["Q?"], ["abcdefgh"], [0], rewards=[1.0])
    values = VERLAdvantage(diff_stride=2).annotate(r, make_ctx(model))
    _, states, _ = _manual_states(model, "Q?", "abcdefgh")
    want = rank_indicators(states, 2)
    assert [float(values[k][0]) for k in ("verl_era", "verl_erv", "verl_er")] == pytest.approx(list(want), abs=1e-3)


@pytest.mark.parametrize("cls,recipe", [(POISEAdvantage, "poise"), (VERLAdvantage, "verl_er")])
def test_declarations_and_recipe_chain(cls, recipe):
    component = cls()
    requires = component.requires() if callable(component.requires) else component.requires
    assert set(component.provides) <= set(requires)
    parts = build_components(load_recipe(recipe))
    assert [n.provides for n in parts.plan.prepare if n.where == "algorithm.advantage"] == [cls.provides]
