"""CalibRL guide term (arXiv:2602.20197)."""

from __future__ import annotations

import pytest
import torch

from policylab.algo.advantages.group_baselines import dr_grpo_advantage
from policylab.algo.regularizers.expert_guide import calibrl_guide_loss
from policylab.annotate.expert_scoring import CalibRLGuide
from policylab.config import load_recipe
from policylab.rollouts import PolicyOutputs
from policylab.train.components import build_components
from test_advantages_probe_common import CharTokenizer, annotated, make_ctx, make_rollouts, manual_answer_logp, tiny_model


def _guide(passed: bool):
    logp = torch.tensor([[-1.0]], requires_grad=True)
    loss = calibrl_guide_loss(logp, torch.tensor([[-0.5]]), torch.tensor([passed]), torch.tensor([[0.5]]))
    loss.sum().backward()
    return float(loss.detach()), float(logp.grad)


def test_calibrl_t1_pass_sample():
    value, grad = _guide(True)
    assert value == pytest.approx(0.25) and grad == pytest.approx(-0.5)


def test_calibrl_t2_fail_sample():
    value, grad = _guide(False)
    assert value == pytest.approx(-0.125) and grad == pytest.approx(0.25)


def test_calibrl_t3_advantage_over_on_policy_rows_only():
    r = make_rollouts(["p"] * 4, ["a"] * 4, [0] * 4, rewards=[1.0, 0.0, 0.0, 0.0])
    assert dr_grpo_advantage(r).tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_calibrl_annotate_aligns_expert_logp_and_masks_past_its_length():
    model, tok = tiny_model(), CharTokenizer()
    rows = [{"solution": "42"}] * 2 + [{}]
    r = make_rollouts(["Q: 6*7?", "Q: 6*7?", "Q: 1+1?"], ["42xyz", "41", "2"], [0, 0, 1], rewards=[1.0, 0.0, 1.0], rows=rows)
    guide = CalibRLGuide()
    r = annotated(guide, r, make_ctx(model))
    want = manual_answer_logp(model, tok, "Q: 6*7?", "42\x01")  # solution + EOS
    torch.testing.assert_close(r.extras["calibrl_expert_logp"][0, :3], want, atol=1e-5, rtol=0)
    assert r.extras["calibrl_expert_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert r.extras["calibrl_expert_mask"][2].sum() == 0  # no expert for that prompt


def test_calibrl_loss_values_and_no_expert_rows_are_zero():
    r = make_rollouts(["p"] * 3, ["ab", "ab", "ab"], [0, 0, 1], rewards=[1.0, 0.0, float("nan")])
    r.advantages = torch.tensor([0.5, -0.5, 0.0])
    r.extras.update(calibrl_expert_logp=torch.full((3, 2), -0.5),
                    calibrl_expert_mask=torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]))
    out = PolicyOutputs(logp=torch.full((3, 2), -1.0, requires_grad=True))
    loss, metrics = CalibRLGuide(coef=0.1)(out, r)
    torch.testing.assert_close(loss.detach(), torch.tensor([[0.025, 0.0], [-0.0125, 0.0], [0.0, 0.0]]))
    assert float(metrics["calibrl/guided_loss"]) == pytest.approx((0.25 - 0.125) / 2)
    assert not torch.isnan(loss).any()
    with pytest.raises(ValueError, match="annotate"):
        CalibRLGuide()(out, make_rollouts(["p"], ["a"], [0], rewards=[1.0]))


def test_calibrl_declarations_and_recipe_chain():
    assert set(CalibRLGuide.provides) <= set(CalibRLGuide.requires)
    parts = build_components(load_recipe("calibrl"))
    assert [n.provides for n in parts.plan.prepare if n.where == "algorithm.regularizers.0"] == [CalibRLGuide.provides]
