"""EMPO semantic-entropy rewards (arXiv:2504.05812)."""

from __future__ import annotations

import math

import pytest
import torch

from policylab.algo.advantages.semantic_entropy import cluster_answers, empo_group_rewards, rouge_l_precision, semantic_entropy
from policylab.annotate.semantic_clusters import EQUIVALENCES, EMPOAdvantage, last_boxed
from policylab.config import load_recipe
from policylab.train.components import build_components
from test_advantages_probe_common import annotated, make_rollouts


def run(empo: EMPOAdvantage, rollouts):
    """annotate (semantic rewards, no model needed) then the advantage, as the loop does."""
    return empo(annotated(empo, rollouts, None))


def test_empo_t1_spec_numbers():
    answers = ["2", "2", "3", ""]
    r, h = empo_group_rewards(answers, EQUIVALENCES["exact"])
    assert h == pytest.approx(1.039721, abs=1e-6) and h < math.log(4)
    assert r == pytest.approx([0.5, 0.5, 0.25, 0.0])
    comps = [f"so \\boxed{{{a}}}" if a else "no idea" for a in answers]
    rollouts = make_rollouts(["p"] * 4, comps, [0] * 4, rewards=[0.0] * 4)
    adv = run(EMPOAdvantage(extractor="boxed", equivalence="exact"), rollouts)
    assert adv.tolist() == pytest.approx([0.783022, 0.783022, -0.261007, -1.305037], abs=1e-5)


def test_empo_t2_all_different_gives_zero():
    r, h = empo_group_rewards(["1", "2", "3", "4"], EQUIVALENCES["exact"])
    assert r == [0.0] * 4 and h == pytest.approx(math.log(4))
    rollouts = make_rollouts(["p"] * 3, ["1", "2", "3"], [0] * 3, rewards=[1.0, 0.0, 0.0])
    empo = EMPOAdvantage(extractor="last_number", equivalence="numeric")
    assert run(empo, rollouts).tolist() == [0.0, 0.0, 0.0]
    assert empo.metrics["empo/skipped_frac"] == 1.0


def test_empo_t3_math_verify_clusters_equivalent_forms():
    assert cluster_answers(["1/2", "0.5", "\\frac{1}{2}", "3"], EQUIVALENCES["math_verify"]) == [0, 0, 0, 1]
    assert cluster_answers(["1/2", "0.5"], EQUIVALENCES["exact"]) == [0, 1]


def test_empo_edge_cases_single_rollout_and_nan_reward():
    r, _ = empo_group_rewards(["5"], EQUIVALENCES["exact"])  # G=1: H = 0 = ln 1 -> not below -> 0
    assert r == [0.0]
    rollouts = make_rollouts(["p"] * 3, ["7", "7", "8"], [0] * 3, rewards=[1.0, float("nan"), 0.0])
    adv = run(EMPOAdvantage(extractor="last_number", equivalence="numeric"), rollouts)
    assert adv[1] == 0 and not torch.isnan(adv).any() and adv[0] > 0 > adv[2]


def test_empo_free_form_variant():
    eq = EQUIVALENCES["exact"]
    r, _ = empo_group_rewards(["paris", "paris", "", "what is the capital"], eq, variant="free_form",
                              question="what is the capital of france")
    assert r == [0.5, 0.5, -0.5, 0.0]
    many = [str(i) for i in range(6)] + ["0"]
    r, _ = empo_group_rewards(many, eq, variant="free_form")  # largest share 2/7 >= 0.2 -> rewarded
    assert r[0] == pytest.approx(2 / 7)
    r, _ = empo_group_rewards([str(i) for i in range(10)] + ["0"], eq, variant="free_form")  # 2/11 < 0.2
    assert r == [0.0] * 11


def test_helpers_and_bad_names():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("none") == "" and last_boxed("\\boxed{unclosed") == ""
    assert rouge_l_precision("the capital", "what is the capital of france") == 1.0
    assert semantic_entropy([0, 0]) == 0.0
    for kw in ({"extractor": "xml"}, {"equivalence": "fuzzy"}, {"variant": "code"}):
        with pytest.raises(ValueError):
            EMPOAdvantage(**kw)


def test_empo_declarations_and_recipe_chain():
    empo = EMPOAdvantage(extractor="last_number", equivalence="numeric")
    rollouts = make_rollouts(["p"] * 2, ["7", "7"], [0, 0], rewards=[1.0, 0.0])
    assert annotated(empo, rollouts, None).extras["empo_reward"].tolist() == [1.0, 1.0]
    assert set(empo.metrics) >= {"empo/semantic_entropy", "empo/skipped_frac", "empo/majority_accuracy"}
    with pytest.raises(ValueError, match="annotate"):
        empo(rollouts)
    assert set(EMPOAdvantage.provides) <= set(EMPOAdvantage.requires)
    parts = build_components(load_recipe("empo"))
    assert [n.provides for n in parts.plan.prepare if n.where == "algorithm.advantage"] == [EMPOAdvantage.provides]
