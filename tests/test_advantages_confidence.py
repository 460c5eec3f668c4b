"""advantages_rewards.md B6 ProGRPO/ARM and B10 CAPO calibration (+ data_agents_eval.md E3 rows)."""

import pytest
import torch

from policylab import registry
from policylab.algo.advantages.confidence import (
    capo_noise_mask,
    capo_pairwise_advantages,
    confidence_auc,
    low_probability_confidence,
)
from policylab.rollouts import PolicyOutputs
from policylab.testing import make_rollouts

ATOL = 1e-4


def make(rewards, token_logp, group=None, ref_logp=None, prompt_ids=None, prompt_mask=None, extras=None):
    """token_logp: one list of log-probs per row (its length is the row's length)."""
    b = len(rewards)
    width = max(max(len(t) for t in token_logp), 1)
    logp = torch.zeros(b, width)
    for i, t in enumerate(token_logp):
        logp[i, : len(t)] = torch.tensor(t)
    ref = None
    if ref_logp is not None:
        ref = torch.zeros(b, width)
        for i, t in enumerate(ref_logp):
            ref[i, : len(t)] = torch.tensor(t)
    return make_rollouts(rewards, group=group, lengths=[len(t) for t in token_logp], width=width, prompt_len=2,
                         prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                         completion_ids=torch.arange(1, b * width + 1).reshape(b, width), old_logp=logp, ref_logp=ref,
                         extras=extras)


# ---------------------------------------------------------------------------------------------- B6 ProGRPO


def test_progrpo_t1_low_probability_tokens_raise_credit():
    batch = make([1.0, 0.0], [[-0.1, -0.2, -3.0, -0.5, -0.05], [-0.3, -0.4]],
                 extras={"progrpo_prompt_confidence": torch.tensor([-2.0, -2.0])})
    adv = registry.build("advantage", "progrpo")(batch)
    assert torch.allclose(adv, torch.tensor([0.807106, -0.707106]), atol=ATOL)


def test_progrpo_t2_overconfident_correct_answer_is_attenuated():
    batch = make([1.0, 0.0], [[-0.01] * 5, [-0.3, -0.4]], extras={"progrpo_prompt_confidence": torch.tensor([-2.0, -2.0])})
    adv = registry.build("advantage", "progrpo")(batch)
    assert adv[0].item() == pytest.approx(0.707106 - 0.199, abs=ATOL)
    assert adv[1].item() == pytest.approx(-0.707106, abs=ATOL)


def test_progrpo_t3_all_wrong_group_unchanged_and_options():
    batch = make([0.0, 0.0], [[-3.0], [-0.1]], extras={"progrpo_prompt_confidence": torch.tensor([-2.0, -2.0])})
    assert torch.equal(registry.build("advantage", "progrpo")(batch), torch.zeros(2))
    mixed = make([1.0, 0.0], [[-0.1, -0.2, -3.0, -0.5, -0.05], [-0.3, -0.4]],
                 extras={"progrpo_prompt_confidence": torch.tensor([-2.0, -2.0])})
    every = registry.build("advantage", "progrpo", {"apply_to": "all"})(mixed)
    assert every[1].item() == pytest.approx(-0.707106 + 0.1 * (-2.0 + 0.4), abs=ATOL)  # k = ceil(0.4) = 1 -> -0.4
    clipped = registry.build("advantage", "progrpo", {"shift_clip": 0.05})(mixed)
    assert clipped[0].item() == pytest.approx(0.707106 + 0.05, abs=ATOL)


def test_low_probability_confidence_takes_the_lowest_fraction():
    logp = torch.tensor([[-1.0, -5.0, -2.0, -4.0, -3.0, -0.5, -0.1, -0.2, -0.3, -0.4], [0.0] * 10])
    mask = torch.tensor([[1.0] * 10, [0.0] * 10])
    conf = low_probability_confidence(logp, mask, 0.2)
    assert conf[0].item() == pytest.approx(-4.5) and conf[1].item() == 0.0  # k = 2: (-5-4)/2; empty row -> 0


class ScoringContext:
    """ctx.score: log-prob of each completion token = -0.1 * token id; counts calls."""

    def __init__(self):
        self.calls = 0

    def score(self, rollouts, model=None, with_hidden=False):
        self.calls += 1
        return PolicyOutputs(logp=-0.1 * rollouts.completion_ids.float())


def test_progrpo_annotate_scores_each_prompt_once_and_returns_its_declared_field():
    from policylab.interfaces import declared

    prompt_ids = torch.tensor([[0, 5, 6, 7], [0, 5, 6, 7], [0, 0, 3, 9], [0, 0, 3, 9]])
    prompt_mask = (prompt_ids > 0).float()
    batch = make([1.0, 0.0, 1.0, 0.0], [[-1.0], [-1.0], [-1.0], [-1.0]], group=[2, 2, 8, 8],
                 prompt_ids=prompt_ids, prompt_mask=prompt_mask)
    ctx = ScoringContext()
    comp = registry.build("advantage", "progrpo")
    values = comp.annotate(batch, ctx)
    assert set(values) == set(declared(comp, "provides")) == {"progrpo_prompt_confidence"}
    # prompt (5,6,7): tokens 6, 7 scored -> (-0.6 - 0.7)/2; prompt (3,9): token 9 -> -0.9
    assert torch.allclose(values["progrpo_prompt_confidence"], torch.tensor([-0.65, -0.65, -0.9, -0.9]))
    assert ctx.calls == 1 and batch.extras == {}  # one pass over the prompts; the batch is not edited
    assert set(declared(comp, "requires")) == {"rewards", "behavior_logp", "progrpo_prompt_confidence"}


def test_progrpo_one_token_prompts_give_zero_and_behaviour_logp_is_the_confidence():
    batch = make([1.0, 0.0], [[-1.0], [-2.0]], prompt_ids=torch.tensor([[0, 4], [0, 4]]),
                 prompt_mask=torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    comp = registry.build("advantage", "progrpo")
    values = comp.annotate(batch, ScoringContext())
    assert torch.equal(values["progrpo_prompt_confidence"], torch.zeros(2))
    annotated = batch.with_(extras=values)
    behaviour = annotated.with_(old_logp=None, behavior_logp=annotated.old_logp)
    assert torch.equal(comp(behaviour), comp(annotated))
    with pytest.raises(ValueError, match="behavior_logp"):
        comp(annotated.with_(old_logp=None))


def test_progrpo_edges():
    comp = registry.build("advantage", "progrpo")
    conf = {"progrpo_prompt_confidence": torch.tensor([-2.0, -2.0])}
    # all correct: GRPO gives 0 but the published form still shifts correct answers (a group with a correct one)
    assert torch.allclose(comp(make([1.0, 1.0], [[-0.1], [-0.2]], extras=conf)), torch.tensor([-0.19, -0.18]), atol=ATOL)
    empty = comp(make([1.0, 0.0], [[], []], extras=conf))
    assert torch.allclose(empty, torch.tensor([0.707106, -0.707106]), atol=ATOL)  # L = 0: no shift
    with pytest.raises(ValueError, match="annotate"):
        comp(make([1.0], [[-0.1]]))


# ---------------------------------------------------------------------------------------------- B10 CAPO


def test_capo_t1_overconfident_wrong_answer_gets_the_larger_penalty():
    s = torch.tensor([-0.5, -0.2, -1.0])
    adv = capo_pairwise_advantages(s, torch.tensor([True, False, False]), torch.ones(3, dtype=torch.bool),
                                   torch.zeros(3, dtype=torch.long), tau=1.0)
    assert torch.allclose(adv, torch.tensor([0.951983, -1.148885, -0.755081]), atol=ATOL)
    batch = make([1.0, 0.0, 0.0], [[-0.5, -0.5], [-0.2], [-1.0, -1.0, -1.0]])
    comp = registry.build("advantage", "capo_calibration", {"mask_noise": False})
    assert torch.allclose(comp(batch), adv, atol=ATOL)
    assert comp.last_metrics["capo/auc"] == pytest.approx(0.5)


def test_capo_t2_equal_confidences_give_plus_minus_one():
    adv = capo_pairwise_advantages(torch.full((4,), -0.7), torch.tensor([True, False, True, False]),
                                   torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.long), tau=0.5)
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, 1.0, -1.0]))


def test_capo_t3_less_confident_correct_answers_get_more_credit():
    s = torch.tensor([-0.2, -0.9, -0.5, -0.6])
    correct = torch.tensor([True, True, False, False])
    adv = capo_pairwise_advantages(s, correct, torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.long), tau=1.0)
    assert (adv[:2] > 0).all() and (adv[2:] < 0).all()
    assert adv[1] > adv[0]
    bumped = capo_pairwise_advantages(s + torch.tensor([0.1, 0, 0, 0]), correct, torch.ones(4, dtype=torch.bool),
                                      torch.zeros(4, dtype=torch.long), tau=1.0)
    assert bumped[0] < adv[0]  # dA_i/ds_i < 0


def test_capo_auc_e3_example():
    assert confidence_auc(torch.tensor([0.9, 0.8, 0.85, 0.1]), torch.tensor([True, True, False, False])) == pytest.approx(0.75)
    assert confidence_auc(torch.ones(4), torch.tensor([True, True, False, False])) == pytest.approx(0.5)


def test_capo_noise_mask_uses_reference_confidence():
    # correct rows 0,1 and incorrect rows 2,3; reference: row 0 very unlikely (lucky guess), row 3 very likely
    ref = torch.tensor([-5.0, -1.0, -2.0, -0.1])
    correct = torch.tensor([True, True, False, False])
    noisy = capo_noise_mask(ref, correct, torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.long), 0.1)
    assert noisy.tolist() == [True, False, False, True]
    batch = make([1.0, 1.0, 0.0, 0.0], [[-0.5], [-0.4], [-0.6], [-0.3]], ref_logp=[[-5.0], [-1.0], [-2.0], [-0.1]])
    comp = registry.build("advantage", "capo_calibration")
    assert "ref_logp" in comp.requires()
    assert "ref_logp" not in registry.build("advantage", "capo_calibration", {"mask_noise": False}).requires()
    adv = comp(batch)
    assert adv[0] == 0 and adv[3] == 0 and adv[1] > 0 and adv[2] < 0
    assert comp.last_metrics["capo/frac_masked"] == pytest.approx(0.5)


def test_capo_edges():
    comp = registry.build("advantage", "capo_calibration", {"mask_noise": False})
    assert torch.equal(comp(make([1.0, 1.0], [[-0.1], [-0.2]])), torch.zeros(2))  # no incorrect answer
    assert torch.equal(comp(make([1.0], [[-0.1]])), torch.zeros(1))  # G = 1
    empty = comp(make([1.0, 0.0, 0.0], [[], [-0.2], [-0.1]]))
    assert empty[0] == 0 and torch.isfinite(empty).all()  # a row without tokens takes no part
    failed = comp(make([1.0, float("nan"), 0.0], [[-0.1], [-0.2], [-0.3]]))
    assert failed[1] == 0 and torch.isfinite(failed).all()
    with pytest.raises(ValueError, match="ref_logp"):
        registry.build("advantage", "capo_calibration")(make([1.0, 0.0], [[-0.1], [-0.2]]))


# ---------------------------------------------------------------------------------------------- declarations


def test_recipes_chain_and_capo_gets_the_reference_scorer():
    from policylab.config import load_recipe
    from policylab.train.components import build_components

    parts = build_components(load_recipe("prog_rpo"))
    assert [(n.where, n.hook) for n in parts.plan.prepare] == [("algorithm.advantage", "annotate")]
    capo = build_components(load_recipe("capo_calibration"))
    assert capo.plan.needs_reference_model
    assert [n.provides for n in capo.plan.prepare] == [("ref_logp",)]
