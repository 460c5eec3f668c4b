"""AEM (arXiv:2605.00425), ASPO (arXiv:2508.19201), GUI-G1 (arXiv:2505.15810), GUI-Libra (arXiv:2602.22190):
spec numbers and properties."""

from __future__ import annotations

import pytest
import torch

from policylab.algo.advantages.group_baselines import dr_grpo_advantage, grpo_advantage
from policylab.algo.advantages.shaping import (
    aem_advantage,
    aem_weights,
    aspo_advantage,
    aspo_bonus,
    gui_libra_advantage,
    success_adaptive_scale,
)
from policylab.algo.token_weights.difficulty import difficulty_weights, gui_g1_weights
from policylab.algo.aggregate import seq_mean_token_sum_norm
from policylab.rollouts import Normaliser, PolicyOutputs
from test_advantages_probe_common import make_rollouts

SQ = 0.866025

# -- AEM -----------------------------------------------------------------------------------------------


def _aem_rollouts(u):
    r = make_rollouts(["p"] * 4, ["abcd"] * 4, [0] * 4, rewards=[1.0, 1.0, 0.0, 0.0])
    r.behavior_logp = -torch.tensor(u)[:, None].expand(4, 4).clone()
    return r


def test_aem_t1_spec_numbers():
    u = [0.2, 0.6, 1.0, 0.2]
    w = aem_weights(torch.tensor(u), torch.zeros(4, dtype=torch.long))
    assert w.tolist() == pytest.approx([1.391674, 0.869442, 0.5, 1.391674], abs=1e-5)
    out = aem_advantage(_aem_rollouts(u))
    assert out.tolist() == pytest.approx([1.205224, 0.752959, -0.433013, -1.205224], abs=1e-5)


def test_aem_t2_beta_zero_and_t3_constant_surprisal():
    r = _aem_rollouts([0.2, 0.6, 1.0, 0.2])
    torch.testing.assert_close(aem_advantage(r, beta=0.0), grpo_advantage(r))
    torch.testing.assert_close(aem_advantage(_aem_rollouts([0.5] * 4)), grpo_advantage(r))


def test_aem_singleton_and_missing_logp():
    w = aem_weights(torch.tensor([0.1, 0.9]), torch.tensor([0, 1]))
    assert w.tolist() == [1.0, 1.0]
    r = make_rollouts(["p"], ["a"], [0], rewards=[1.0])
    with pytest.raises(ValueError, match="behavior_logp"):
        aem_advantage(r)


# -- ASPO ----------------------------------------------------------------------------------------------


def _aspo_rollouts():
    # first tool call at characters 1, 5 (correct rows), 2 (incorrect), none: only the order of ρ matters
    comps = ["x<tool_call>", "xxxxx<tool_call>", "xx<tool_call>", "x" * 10]
    return make_rollouts(["p"] * 4, comps, [0] * 4, rewards=[1.0, 1.0, 0.0, 0.0])


def test_aspo_t1_clipped_and_t2_unclipped():
    r = _aspo_rollouts()
    assert aspo_advantage(r, delta=1.0, k=0.5).tolist() == pytest.approx([1.299038, 0.433013, -SQ, -SQ], abs=1e-5)
    assert aspo_advantage(r, delta=0.5, k=0.5).tolist() == pytest.approx([1.219577, 0.512473, -SQ, -SQ], abs=1e-5)


def test_aspo_t3_sign_preserved_for_any_delta():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        adv = torch.randn(6, generator=g)
        pref = torch.rand(6, generator=g)
        out = aspo_bonus(adv, pref, torch.ones(6, dtype=torch.bool), torch.zeros(6, dtype=torch.long),
                         delta=float(torch.rand(1, generator=g) * 100), k=0.9)
        assert torch.all(torch.sign(out) == torch.sign(adv))


def test_aspo_text_pattern_and_no_tools_equals_base():
    r = make_rollouts(["p"] * 3, ["<tool_call>a....", "....<tool_call>", "plain"], [0] * 3, rewards=[1.0, 1.0, 0.0])
    out = aspo_advantage(r, delta=1.0, k=0.5)
    base = grpo_advantage(r)
    assert out[0] > base[0] and out[1] < base[1] and out[2] == base[2]
    plain = make_rollouts(["p"] * 2, ["1", "2"], [0, 0], rewards=[1.0, 0.0])
    torch.testing.assert_close(aspo_advantage(plain), grpo_advantage(plain))
    with pytest.raises(ValueError, match="preference"):
        aspo_advantage(plain, preference="late")


def test_aspo_more_turns_rewards_more_calls():
    r = make_rollouts(["p"] * 3, ["<tool_call>", "<tool_call>" * 3, "x"], [0] * 3, rewards=[1.0, 1.0, 0.0])
    out, base = aspo_advantage(r, preference="more_turns"), grpo_advantage(r)
    assert out[1] > base[1] and out[0] < base[0]


# -- GUI-Libra -----------------------------------------------------------------------------------------


def test_gui_libra_t1_t2_t3():
    r = make_rollouts(["p"] * 4, ["a"] * 4, [0] * 4, rewards=[1.0, 0.0, 0.0, 0.0])
    assert gui_libra_advantage(r).tolist() == pytest.approx([1.5, -0.125, -0.125, -0.125], abs=1e-5)
    r = make_rollouts(["p"] * 4, ["a"] * 4, [0] * 4, rewards=[1.0, 1.0, 1.0, 0.0])
    assert float(gui_libra_advantage(r)[3]) == pytest.approx(-1.125, abs=1e-5)
    adv = torch.tensor([2.0, 0.5, -1.0])
    out = success_adaptive_scale(adv, torch.tensor([0.0, 0.0, 0.0]))
    assert out[:2].tolist() == [2.0, 0.5] and float(out[2]) == pytest.approx(-0.1)  # s_min floor


def test_gui_libra_all_wrong_group_no_nan():
    r = make_rollouts(["p"] * 3, ["a"] * 3, [0] * 3, rewards=[0.0, 0.0, float("nan")])
    out = gui_libra_advantage(r)
    assert not torch.isnan(out).any() and out.abs().sum() == 0


# -- GUI-G1 --------------------------------------------------------------------------------------------


def _g1_loss(rows):
    r = make_rollouts(["p"] * 2, ["ab", "abcd"], [0, 0], rewards=[1.0, 0.0], rows=rows)
    out = PolicyOutputs(logp=torch.zeros(2, 4))
    w, _ = gui_g1_weights(out, r)
    loss_tok = torch.ones(2, 4) * w
    return seq_mean_token_sum_norm(loss_tok, r.completion_mask, Normaliser.of(r.completion_mask, max_len=64))


def test_gui_g1_t1_constant_normaliser_and_t2_weights():
    assert float(_g1_loss([{}, {}])) == pytest.approx(0.046875)
    assert float(_g1_loss([{"rate": 2.0}, {"rate": 1.0}])) == pytest.approx(0.0625)


def test_gui_g1_t3_mean_only_advantage():
    r = make_rollouts(["p"] * 4, ["a"] * 4, [0] * 4, rewards=[1.0, 0.0, 0.0, 0.0])
    assert dr_grpo_advantage(r).tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_gui_g1_difficulty_sources():
    rows = [{"p": 0.0}, {"p": 0.5}, {"p": 0.95}]
    w = difficulty_weights(rows, source="pass_rate", field="p", mean_value=0.5)
    assert w.tolist() == pytest.approx([2.0, 1.0, 0.5])  # (1-0)/0.5=2, 1, 0.1 -> 0.5
    w = difficulty_weights([{"a": 0.01}, {"a": 0.04}, {"a": 1.0}], source="box", field="a", mean_value=0.04)
    assert w.tolist() == pytest.approx([2.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="lack"):
        difficulty_weights([{}], source="pass_rate", field="p")
    with pytest.raises(ValueError, match="source"):
        difficulty_weights([{}], source="area")


# -- declarations ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["aem", "aspo", "gui_libra", "gui_g1"])
def test_recipes_chain(recipe):
    from policylab.config import load_recipe
    from policylab.train.components import build_components

    parts = build_components(load_recipe(recipe))
    assert all(n.where != "algorithm.advantage" for n in parts.plan.prepare)  # pure: no annotate pass of its own
