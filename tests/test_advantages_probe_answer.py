"""SPAE (arXiv:2601.03823) and GRPO-VPS (arXiv:2604.20659): spec numbers, probe alignment, edge cases."""

from __future__ import annotations

import pytest
import torch

from policylab.algo.advantages.group_baselines import grpo_advantage
from policylab.algo.advantages.probe_credit import (
    NO_SEGMENT,
    spae_potential,
    spae_step_terms,
    spae_token_advantages,
    vps_token_advantages,
)
from policylab.annotate.answer_probes import GRPOVPSAdvantage, SPAEAdvantage
from policylab.config import load_recipe
from policylab.train.components import build_components
from test_advantages_probe_common import (
    CharTokenizer,
    annotated,
    make_ctx,
    make_rollouts,
    manual_answer_logp,
    manual_answer_scores,
    tiny_model,
)

# -- SPAE ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("acc,conf,phi", [(1, 1, 1.0), (0, 1, -1.0), (0, 0, 0.0), (1, 0, 0.5), (0.8, 0.9, 0.58)])
def test_spae_t1_potential(acc, conf, phi):
    assert float(spae_potential(torch.tensor(acc, dtype=torch.float), torch.tensor(conf, dtype=torch.float))) == pytest.approx(phi, abs=1e-6)


def test_spae_t2_segment_advantages():
    potentials = torch.tensor([[0.2, 0.95, 0.9]])
    delta, k_star = spae_step_terms(potentials[0])
    torch.testing.assert_close(delta, torch.tensor([0.0, 0.75, -0.05]), atol=1e-6, rtol=0)
    assert k_star == 1  # the second step (1-based k* = 2)
    segment = torch.tensor([[0, 0, 1, 2, 2]])
    out = spae_token_advantages(torch.tensor([1.0]), segment, potentials, torch.tensor([3]), alpha=1.0, rho=0.5)
    torch.testing.assert_close(out[0], torch.tensor([1.0, 1.0, 1.75, 0.45, 0.45]), atol=1e-6, rtol=0)


def test_spae_tail_and_answer_tokens():
    # tail after the last probed step: ΔΦ = 0 but past k* -> penalised; after </think>: A_i untouched
    potentials = torch.tensor([[0.95]])
    segment = torch.tensor([[0, 1, NO_SEGMENT]])
    out = spae_token_advantages(torch.tensor([-2.0]), segment, potentials, torch.tensor([1]), alpha=1.0, rho=0.5)
    torch.testing.assert_close(out[0], torch.tensor([-2.0, -3.0, -2.0]))


def test_spae_t3_no_boundary_gives_outcome_advantage():
    r = make_rollouts(["Q: 1+1?"] * 2, ["2", "3"], [0, 0], rewards=[1.0, 0.0], rows=[{"answer": "2"}] * 2)
    spae = SPAEAdvantage(confidence="teacher_forced")
    r = annotated(spae, r, make_ctx(tiny_model()))
    out = spae(r)
    torch.testing.assert_close(out, grpo_advantage(r)[:, None] * r.completion_mask)


def test_spae_probe_matches_unpadded_teacher_forcing():
    model, tok = tiny_model(), CharTokenizer()
    prompts = ["Q: 2+2?", "Q?"]
    comps = ["2+2 is 4.\n\nSo 4.\n\n", "Hmm.\n\nx"]
    answers = ["4", "17"]
    r = make_rollouts(prompts, comps, [0, 1], rewards=[1.0, 0.0], rows=[{"answer": a} for a in answers])
    spae = SPAEAdvantage(confidence="teacher_forced", template="=")
    r = annotated(spae, r, make_ctx(model))
    assert r.extras["spae_num_steps"].tolist() == [2, 1]
    for i, (p, c, a) in enumerate(zip(prompts, comps, answers)):
        ends = [j + 1 for j in range(len(c)) if c[: j + 1].endswith(".\n\n")]
        for k, end in enumerate(ends):
            logp, entropy = manual_answer_scores(model, tok, p + c[:end] + "=", a)
            acc, conf = logp.exp().mean(), torch.exp(-entropy.mean())
            want = 1.5 * acc * conf + 0.5 * acc - conf
            assert float(r.extras["spae_potential"][i, k]) == pytest.approx(float(want), abs=1e-5)
    seg = r.extras["spae_segment"][0, : len(comps[0])]
    assert seg[0].item() == 0 and seg[-1].item() == 1
    assert r.extras["spae_segment"][1, -1].item() == 1  # "x" is the tail after the last step


def test_spae_sampled_confidence_is_seeded_and_resumable():
    model = tiny_model()
    r = make_rollouts(["Q?"] * 2, ["a.\n\nb.\n\n", "c.\n\n"], [0, 0], rewards=[1.0, 0.0], rows=[{"answer": "7"}] * 2)
    first = SPAEAdvantage(num_probe_samples=2, probe_max_tokens=3, seed=5)
    state = first.state_dict()
    a = first.annotate(r, make_ctx(model))["spae_potential"]
    second = SPAEAdvantage(num_probe_samples=2, probe_max_tokens=3, seed=99)
    second.load_state_dict(state)
    b = second.annotate(r, make_ctx(model))["spae_potential"]
    torch.testing.assert_close(a, b, equal_nan=True)
    assert not torch.isnan(a[0, :2]).any()


def test_spae_requires_annotate_and_context():
    r = make_rollouts(["Q?"], ["a"], [0], rewards=[1.0])
    with pytest.raises(ValueError, match="annotate"):
        SPAEAdvantage()(r)
    with pytest.raises(ValueError, match="ctx.policy"):
        SPAEAdvantage().annotate(r, make_ctx(None))
    with pytest.raises(ValueError, match="confidence"):
        SPAEAdvantage(confidence="magic")


def test_spae_failed_reward_row_gets_zero():
    potentials = torch.tensor([[0.2, 0.95], [0.2, 0.95]])
    r = make_rollouts(["Q?"] * 2, ["ab", "cd"], [0, 0], rewards=[1.0, float("nan")])
    r.extras.update(spae_segment=torch.tensor([[0, 1], [0, 1]]), spae_potential=potentials, spae_num_steps=torch.tensor([2, 2]))
    out = SPAEAdvantage()(r)
    assert out[1].abs().sum() == 0 and not torch.isnan(out).any()


# -- GRPO-VPS ------------------------------------------------------------------------------------------


def test_vps_t1_one_rollout():
    out = vps_token_advantages(torch.tensor([0.5]), torch.tensor([0]), [torch.tensor([0.1, 0.4, 0.3])],
                               torch.tensor([[0, 1, 2]]), beta=0.5, eps=1e-6)
    torch.testing.assert_close(out[0], torch.tensor([0.853552, 0.146448, 0.5]), atol=1e-5, rtol=0)


def test_vps_t2_answer_probability_excludes_template_tokens():
    model, tok = tiny_model(seed=3), CharTokenizer()
    prompt, comp, answer, template = "Q: 3+4?", "3+4\n\nis 7\n\n", "7", " ans:"
    r = make_rollouts([prompt], [comp], [0], rewards=[1.0], rows=[{"answer": answer}])
    r = annotated(GRPOVPSAdvantage(template=template), r, make_ctx(model))
    probs = r.extras["vps_answer_prob"][0]
    cuts = [0, comp.index("\n\n") + 2, len(comp)]
    for k, cut in enumerate(cuts):
        logp = manual_answer_logp(model, tok, prompt + comp[:cut] + template, answer)
        assert float(probs[k]) == pytest.approx(float(logp.mean().exp()), abs=1e-5)
    # including the template tokens would give a different number
    with_template = manual_answer_logp(model, tok, prompt, template + answer)
    assert float(probs[0]) != pytest.approx(float(with_template.mean().exp()), abs=1e-4)


def test_vps_t3_no_steps_equals_grpo():
    r = make_rollouts(["Q?"] * 3, ["1", "2", "3"], [0, 0, 0], rewards=[1.0, 0.0, 0.0], rows=[{"answer": "1"}] * 3)
    vps = GRPOVPSAdvantage()
    r = annotated(vps, r, make_ctx(tiny_model()))
    assert torch.equal(vps(r), grpo_advantage(r)[:, None] * r.completion_mask)


def test_vps_group_normalisation_pools_rollouts_and_zero_std():
    # two rollouts, one step each, equal deltas -> std 0 -> no change
    adv = torch.tensor([1.0, -1.0])
    probs = [torch.tensor([0.25, 0.5]), torch.tensor([0.5, 0.75])]  # exactly representable
    out = vps_token_advantages(adv, torch.tensor([0, 0]), probs, torch.tensor([[0, 1], [0, 1]]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
    # different groups never pool: each group has one delta -> fewer than 2 -> no change
    out = vps_token_advantages(adv, torch.tensor([0, 1]), [torch.tensor([0.1, 0.9]), torch.tensor([0.9, 0.1])],
                               torch.tensor([[0, 1], [0, 1]]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
    # pooled over the group: deltas [0.8, -0.8] -> ±0.707104
    out = vps_token_advantages(adv, torch.tensor([0, 0]), [torch.tensor([0.1, 0.9]), torch.tensor([0.9, 0.1])],
                               torch.tensor([[0, 1], [0, 1]]), beta=1.0)
    torch.testing.assert_close(out[:, 0], torch.tensor([1.707106, -1.707106]), atol=1e-5, rtol=0)


def test_vps_end_to_end_shapes_and_no_nan():
    r = make_rollouts(["Q: 3+4?"] * 2, ["3+4\n\nis 7\n\n7", "no\n\n8"], [0, 0], rewards=[1.0, 0.0],
                      rows=[{"answer": "7"}] * 2)
    vps = GRPOVPSAdvantage()
    r = annotated(vps, r, make_ctx(tiny_model()))
    out = vps(r)
    assert out.shape == r.completion_mask.shape and not torch.isnan(out).any()
    assert out[0, -1] == pytest.approx(float(grpo_advantage(r)[0]))  # final answer token keeps A_i
    assert set(vps.metrics) == {"vps/delta_correct", "vps/delta_incorrect", "vps/negative_step_share"}


# -- declarations --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,recipe", [(SPAEAdvantage, "spae"), (GRPOVPSAdvantage, "grpo_vps")])
def test_declarations_hold_and_recipe_chains(cls, recipe):
    component = cls(confidence="teacher_forced") if cls is SPAEAdvantage else cls()
    r = make_rollouts(["Q?"] * 2, ["a.\n\nb.\n\n", "c"], [0, 0], rewards=[1.0, 0.0], rows=[{"answer": "7"}] * 2)
    annotated(component, r, make_ctx(tiny_model()))  # returns exactly its provides, values fit their declarations
    assert set(component.provides) <= set(component.requires())  # __call__ reads them: the property tests fill them
    parts = build_components(load_recipe(recipe))
    assert [n.provides for n in parts.plan.prepare if n.where == "algorithm.advantage"] == [cls.provides]
