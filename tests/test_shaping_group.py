"""ArenaRL tournaments (arXiv:2601.06487), FAPO flawed positives (arXiv:2510.22543), LLM step judges."""

from __future__ import annotations

import pytest
import torch

import policylab.rewards.shaping_group as sg
from policylab.algo.advantages.group_baselines import grpo_advantage
from policylab.rewards.judges.backends import Judge
from policylab.rewards.judges.steps import LLMStepJudge, resolve_judge
from policylab.rewards.shaping_group import (
    ArenaRLShaping,
    FAPOShaping,
    bracket_order,
    debiased,
    single_elimination,
    tournament_advantage,
)
from test_advantages_probe_common import make_rollouts

# -- ArenaRL -------------------------------------------------------------------------------------------


def test_arena_t1_four_player_bracket():
    outcomes = {(0, 3): True, (1, 2): False, (0, 2): True}  # o1>o4, o3>o2 (an upset), final o1>o3
    wins, played, upsets = single_elimination([0, 1, 2, 3], lambda hi, lo: outcomes[(hi, lo)])
    assert wins == [2, 0, 1, 0] and played == 3 and upsets == 1
    u = torch.tensor(wins, dtype=torch.float32) / 2
    assert u.tolist() == [1.0, 0.0, 0.5, 0.0]
    assert tournament_advantage(u).tolist() == pytest.approx([1.305582, -0.783349, 0.261116, -0.783349], abs=1e-5)


def test_arena_t2_three_players_top_seed_gets_a_bye():
    asked = []
    wins, played, _ = single_elimination([2, 0, 1], lambda hi, lo: asked.append((hi, lo)) or True)
    assert played == 2 and len(asked) == 2 and (2, 0) not in asked[:1]  # seed 1 (player 2) skips round 1
    assert asked[0] == (0, 1) and wins == [1, 0, 2]  # bye counts as a win


def test_arena_t3_position_debiasing():
    table = {(0, 1): 0.8, (1, 0): 0.6}
    assert debiased(lambda a, b: table[(a, b)], 0, 1) == pytest.approx(0.6)


def test_arena_edge_cases_and_bracket_order():
    assert tournament_advantage(torch.tensor([0.0])).tolist() == [0.0]
    assert tournament_advantage(torch.tensor([1.0, 0.0])).tolist() == pytest.approx([0.707107, -0.707107], abs=1e-5)
    assert bracket_order(4) == [1, 4, 2, 3] and bracket_order(8) == [1, 8, 4, 5, 2, 7, 3, 6]
    assert single_elimination([0], lambda a, b: True) == ([0], 0, 0)


def test_arena_shaping_with_closeness_judge_replaces_rewards():
    rows = [{"answer": "10"}] * 4 + [{"answer": "3"}]
    r = make_rollouts(["Q"] * 5, ["10", "12", "x", "9", "3"], [0, 0, 0, 0, 1], rewards=[1.0, 0.0, 0.0, 0.0, 1.0], rows=rows)
    arena = ArenaRLShaping(judge="closeness")
    delta, metrics = arena(r)
    shaped = r.rewards + delta
    assert shaped[0] == 1.0 and shaped[2] == 0.0 and shaped[4] == 0.0  # singleton group: no match, u = 0
    assert metrics["arena/matches"] == 3 and metrics["arena/judge_calls"] == 2 * 3 + 2 * 3  # seeding + matches
    r.rewards = shaped
    assert not torch.isnan(grpo_advantage(r)).any()


def test_arena_reward_judge_custom_callable_and_errors():
    r = make_rollouts(["Q"] * 2, ["a", "b"], [0, 0], rewards=[0.0, 1.0])
    delta, _ = ArenaRLShaping(judge="reward", seeding="reward")(r)
    assert (r.rewards + delta).tolist() == [0.0, 1.0]
    delta, _ = ArenaRLShaping(judge=lambda p, a, b, row: None, mode="add", weight=2.0)(r)  # failed judge -> 0.5
    assert delta.tolist() == [2.0, 0.0]  # tie goes to the higher seed (the anchor, index 0)
    for kw in (dict(judge="gpt"), dict(seeding="elo"), dict(mode="mul")):
        with pytest.raises(ValueError):
            ArenaRLShaping(**kw)


class CannedBackend:
    def __init__(self, texts):
        self.texts = texts

    def complete(self, prompt, k):
        return self.texts[:k]


def test_arena_llm_judge_options(monkeypatch):
    monkeypatch.setattr(sg, "llm_judge", lambda options: Judge(CannedBackend(["Choice: A"]), k=1))
    r = make_rollouts(["Q"] * 2, ["a", "b"], [0, 0], rewards=[0.0, 1.0])
    delta, _ = ArenaRLShaping(judge={"backend": "hf", "model": "x"})(r)
    # A always wins in both orders -> J̄ = 0.5 everywhere -> the higher seed (anchor) wins
    assert (r.rewards + delta).tolist() == [1.0, 0.0]


# -- FAPO ----------------------------------------------------------------------------------------------


class SpyJudge:
    def __init__(self, verdicts):
        self.verdicts, self.seen = verdicts, []

    def __call__(self, prompt, completion):
        self.seen.append(completion)
        return self.verdicts[completion]


def test_fapo_t1_and_t2():
    spy = SpyJudge({"clean": [True, True], "flawed": [True, False]})
    r = make_rollouts(["Q"] * 4, ["clean", "flawed", "wrong1", "wrong2"], [0] * 4, rewards=[1.0, 1.0, 0.0, 0.0])
    delta, metrics = FAPOShaping(judge=spy)(r)
    r.rewards = r.rewards + delta
    assert r.rewards.tolist() == [1.0, 0.0, -1.0, -1.0]
    assert spy.seen == ["clean", "flawed"]  # incorrect rollouts are never judged
    assert metrics["fapo/flawed_positive_rate"] == 0.5
    assert grpo_advantage(r).tolist() == pytest.approx([1.305581, 0.261116, -0.783349, -0.783349], abs=1e-5)


def test_fapo_t3_unparsable_is_not_flawed_and_rule_judge():
    r = make_rollouts(["Q"] * 2, ["?", "1 + 1 = 3\n\nso 2"], [0, 0], rewards=[1.0, 1.0])
    delta, metrics = FAPOShaping(judge=lambda p, c: None)(r)
    assert (r.rewards + delta).tolist() == [1.0, 1.0] and metrics["fapo/unparsable_rate"] == 1.0
    delta, _ = FAPOShaping(judge="arithmetic")(r)
    assert (r.rewards + delta).tolist() == [1.0, 0.0]
    nan = make_rollouts(["Q"], ["a"], [0], rewards=[float("nan")])
    assert FAPOShaping()(nan)[0].tolist() == [0.0]
    with pytest.raises(ValueError, match="policy"):
        FAPOShaping(judge="policy")
    with pytest.raises(ValueError, match="base_reward"):
        FAPOShaping(base_reward="zero_one")


def test_llm_step_judge_majority_and_resolve_mapping():
    judge = LLMStepJudge(Judge(CannedBackend(["Wrong steps: 2", "Wrong steps: 2, 3", "garbage"]), k=3))
    assert judge("Q", "a\n\nb\n\nc") == [True, False, True]
    assert LLMStepJudge(Judge(CannedBackend(["nothing"]), k=1))("Q", "a") is None
    with pytest.raises(ValueError, match="unknown LLM judge option"):
        resolve_judge({"backend": "hf", "modle": "x"})


def test_rl_struct_fixed_schema_spec_numbers():
    from policylab.rewards.shaping_group import rl_struct_fixed_schema

    schema = {"answer": "number", "steps": "list"}
    pred = '{"answer": "5", "steps": ["a"], "extra": 1}'
    assert rl_struct_fixed_schema("", pred, {"answer": "5"}, schema=schema) == pytest.approx(0.791667, abs=1e-6)
    assert rl_struct_fixed_schema("", "not json", {"answer": "5"}, schema=schema) == 0.0
    assert rl_struct_fixed_schema("", '{"answer": 19}', {"answer": "19"}) == pytest.approx(1.0)
