"""CAPO credit (arXiv:2508.02298) and the step judges it shares with FAPO."""

from __future__ import annotations

import pytest
import torch

from policylab import testing
from policylab.algo.advantages.probe_credit import capo_token_rewards, token_group_normalise, token_step_index, vote
from policylab.annotate.step_credit import CAPOCreditAdvantage, PolicyCritic
from policylab.config import load_recipe
from policylab.rewards.judges.steps import arithmetic_step_judge, critique_prompt, first_flawed_step, parse_critique, resolve_judge
from policylab.train.components import build_components
from test_advantages_probe_common import annotated, make_ctx, make_rollouts


def _verdicts(wrong, n=4):  # 1-based wrong-step sets as in the spec
    return [k + 1 not in wrong for k in range(n)]


def test_capo_t1_voting():
    critiques = [_verdicts({2}), _verdicts({2, 3}), _verdicts({2})]
    assert vote(critiques, 4, "majority").tolist() == [0, 1, 0, 0]
    assert vote(critiques, 4, "intersection").tolist() == [0, 1, 0, 0]
    assert vote(critiques, 4, "average").tolist() == pytest.approx([0, 1, 1 / 3, 0])
    assert vote([None, None], 3).tolist() == [0, 0, 0]
    assert vote([None, _verdicts({1}, 2)], 2, "intersection").tolist() == [1, 0]  # unparsable left out
    with pytest.raises(ValueError, match="voting"):
        vote(critiques, 4, "plurality")


def test_capo_t2_token_rewards():
    flags = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    r = capo_token_rewards(torch.tensor([1.0, 0.0]), flags, w_whole=2.0, w_proc=1.0)
    assert r.tolist() == [[2.0, 1.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0]]


def test_capo_t3_correct_always_above_incorrect():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        f = torch.rand(2, 5, generator=g)
        r = capo_token_rewards(torch.tensor([1.0, 0.0]), f, w_whole=1.0 + float(torch.rand(1, generator=g)), w_proc=1.0)
        assert r[0].min() > r[1].max()


def test_token_step_index_matches_str_split():
    pieces = ["a", "\n", "\n", "b", "\n\n\n", "c"]
    assert "".join(pieces).split("\n\n") == ["a", "b", "\nc"]
    assert token_step_index(pieces, "\n\n").tolist() == [0, 0, 0, 1, 1, 2]


def test_token_group_normalise_edge_cases():
    mask = torch.ones(2, 2)
    same = token_group_normalise(torch.ones(2, 2), mask, torch.tensor([0, 0]), torch.tensor([True, True]))
    assert same.abs().sum() == 0
    single = token_group_normalise(torch.tensor([[2.0, 1.0]]), torch.ones(1, 2), torch.tensor([0]), torch.tensor([True]))
    assert single[0].tolist() == pytest.approx([2.0, 1.0], abs=1e-5)


def test_capo_end_to_end_with_arithmetic_judge():
    comps = ["2 + 2 = 4\n\n4 + 1 = 6\n\nso 5", "2 + 2 = 4\n\nso 4", "3 + 3 = 6\n\nso 6"]
    r = make_rollouts(["Q"] * 3, comps, [0, 0, 0], rewards=[1.0, 0.0, 0.0])
    capo = CAPOCreditAdvantage(judge="arithmetic", num_critiques=2)
    r = annotated(capo, r, make_ctx(None))
    flags = r.extras["capo_step_flags"][0]
    start, end = comps[0].index("4 + 1"), comps[0].index("so 5")
    assert flags[:start].sum() == 0 and bool((flags[start:end] == 1).all()) and flags[end:].sum() == 0
    adv = capo(r)
    assert not torch.isnan(adv).any()
    # correct-with-flaw rollout: its flagged tokens are below its clean tokens, still above wrong rollouts
    assert adv[0, start] < adv[0, 0] and adv[0, start] > adv[1, 0]
    assert capo.metrics["capo/flagged_rate_correct"] == 1.0


def test_arithmetic_judge_and_first_flaw():
    v = arithmetic_step_judge("", "1 + 1 = 2\n\n2 * 3 = 7\n\ndone")
    assert v == [True, False, True] and first_flawed_step(v) == 1
    assert first_flawed_step([True, True]) == -1 and first_flawed_step(None) == -1


def test_resolve_judge_and_parse_critique():
    assert resolve_judge("none")("", "a\n\nb") == [True, True]
    assert resolve_judge("policylab.rewards.judges.steps:arithmetic_step_judge")("", "1 + 1 = 3") == [False]
    with pytest.raises(ValueError, match="unknown judge"):
        resolve_judge("gpt")
    with pytest.raises(ValueError, match="cannot import"):
        resolve_judge("nowhere.module:fn")
    assert parse_critique("Wrong steps: 2, 9", 3) == [True, False, True]
    assert parse_critique("wrong steps: none", 2) == [True, True]
    assert parse_critique("looks fine", 2) is None


class CannedEngine:
    """Stands in for the run's rollout engine: records the requests, answers with canned critiques."""

    def __init__(self, texts):
        self.texts, self.calls = texts, []

    def generate(self, requests, sampling):
        self.calls.append((list(requests), sampling))
        n = len(requests) * sampling.group_size
        return testing.make_rollouts(batch=n, completions=[self.texts[j % len(self.texts)] for j in range(n)])


def test_policy_critic_goes_through_the_engine_and_unparsable_output_gives_no_flags():
    engine = CannedEngine(["Wrong steps: 2", "garbage"])
    ctx = make_ctx(None, engine=engine)
    critiques = PolicyCritic(ctx, temperature=0.5, max_new_tokens=7).critiques(["Q"], ["a\n\nb"], k=2)
    assert critiques == [[[True, False], None]]
    (requests, sampling), = engine.calls
    assert requests == [{"prompt": critique_prompt("Q", "a\n\nb")}]
    assert (sampling.group_size, sampling.temperature, sampling.max_new_tokens) == (2, 0.5, 7)
    r = make_rollouts(["Q"] * 2, ["a\n\nb", "c"], [0, 0], rewards=[1.0, 0.0])
    capo = CAPOCreditAdvantage(judge="policy", num_critiques=1, critique_max_tokens=3)
    r = annotated(capo, r, make_ctx(None, engine=CannedEngine(["looks fine"])))
    assert r.extras["capo_step_flags"].sum() == 0
    flagged = annotated(capo, r, make_ctx(None, engine=CannedEngine(["Wrong steps: 2"])))
    assert flagged.extras["capo_flagged_steps"].tolist() == [1.0, 0.0]  # "c" has one step: 2 is out of range


def test_capo_declarations_and_recipe_chain():
    assert set(CAPOCreditAdvantage.provides) <= set(CAPOCreditAdvantage.requires)
    parts = build_components(load_recipe("capo_credit"))
    assert [n.provides for n in parts.plan.prepare if n.where == "algorithm.advantage"] == [CAPOCreditAdvantage.provides]
