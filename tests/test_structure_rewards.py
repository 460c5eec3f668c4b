"""Format and structure rewards: tag format, RL-Struct JSON (C7), soft length penalty (objectives.md
§1.3 numbers), SSL tiers (C1) and OTC (C4 / D3), with the specs' hand-computed examples."""

import json
import math

import pytest
import torch

from policylab.rewards import structure as S
from policylab.rollouts import Rollouts


# ---------------------------------------------------------------------------------------------------
# think / answer format
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("<think>add them</think>\n<answer>42</answer>", 1.0),
    ("  <think>\nmulti\nline\n</think><answer> 42 </answer>\n", 1.0),
    ("<think>x</think>", 0.0),                                     # no answer
    ("Sure! <think>x</think><answer>1</answer>", 0.0),             # text outside the blocks
    ("<think>x</think><answer>1</answer> done", 0.0),
    ("<think>a<think>b</think><answer>1</answer>", 0.0),           # nested opening tag
    ("<think>x</think><answer>1</answer><answer>2</answer>", 0.0),  # two answers
    ("<think>x</think><answer>  </answer>", 0.0),                  # empty answer
    ("<answer>1</answer><think>x</think>", 0.0),                   # wrong order
])
def test_think_answer_format_is_strict(text, expected):
    assert S.think_answer_format("p", text, {}) == expected


def test_think_answer_format_options():
    assert S.think_answer_format("p", "reasoning</think><answer>1</answer>", {}, think_opened_in_prompt=True) == 1.0
    assert S.think_answer_format("p", "<r>x</r><a>1</a>", {}, think_tag="r", answer_tag="a") == 1.0
    # partial credit: four tag-count checks hold, the order/outside check fails -> 4/5
    assert S.think_answer_format("p", "<think>a</think> chatter <answer>1</answer>", {}, partial_credit=True) == 0.8
    assert S.think_answer_format("p", "<answer>1</answer>", {}, partial_credit=True) == pytest.approx(0.4)


# ---------------------------------------------------------------------------------------------------
# RL-Struct (C7)
# ---------------------------------------------------------------------------------------------------
SCHEMA = {"answer": "number", "steps": "list"}


def test_c7_t1_components_and_total():
    completion = json.dumps({"answer": "5", "steps": ["2+3", "=5"], "extra": 1})
    terms = S.rl_struct_components(completion, SCHEMA, {"answer": 5})
    assert terms == pytest.approx({"valid": 1.0, "struct": 2 / 3, "format": 0.5, "content": 1.0})
    assert S.rl_struct("p", completion, {"schema": SCHEMA, "answer": 5}) == pytest.approx(0.791667, abs=1e-6)
    assert S.json_schema_match("p", completion, {"schema": SCHEMA}) == pytest.approx(2 / 3)
    assert S.json_type_match("p", completion, {"schema": SCHEMA}) == 0.5
    assert S.json_field_accuracy("p", completion, {"schema": SCHEMA, "answer": 5}) == 1.0


def test_c7_t2_unparsable_scores_zero_everywhere():
    row = {"schema": SCHEMA, "answer": 5}
    for reward in (S.rl_struct, S.json_valid, S.json_schema_match, S.json_type_match, S.json_field_accuracy):
        assert reward("p", "answer: 5, steps: none {", row) == 0.0


def test_c7_t3_perfect_prediction_scores_one():
    completion = 'Result:\n```json\n{"answer": 5, "steps": ["2+3=5"]}\n```'
    assert S.rl_struct("p", completion, {"schema": SCHEMA, "answer": {"answer": 5, "steps": ["2+3=5"]}}) == 1.0


def test_json_is_found_inside_text_and_json_schema_is_accepted():
    completion = 'The object is {"answer": 5, "steps": []} as requested.'
    json_schema = {"type": "object", "properties": {"answer": {"type": "number"}, "steps": {"type": "array"}}}
    assert S.rl_struct("p", completion, {"schema": json_schema, "answer": 5}) == 1.0
    assert S.rl_struct("p", completion, {"schema": json.dumps(SCHEMA), "answer": '{"answer": 5}'}) == 1.0


def test_nested_key_paths():
    schema = {"meta": {"author": "string"}, "tags": [{"name": "string"}]}
    assert S.schema_types(schema) == {"meta": "object", "meta.author": "string", "tags": "list",
                                      "tags[].name": "string"}
    predicted = {"meta": {"author": 3}, "tags": [{"name": "a"}, {"name": "b", "score": 1}]}
    terms = S.rl_struct_components(json.dumps(predicted), schema, None)
    assert terms["struct"] == pytest.approx(4 / 5)  # tags[].score is hallucinated
    assert terms["format"] == pytest.approx(3 / 4)  # meta.author is not a string


def test_content_uses_token_f1_for_lists_and_text():
    assert S.field_score(["a", "b"], ["a", "b", "c"]) == pytest.approx(0.8)
    assert S.field_score("the quick fox", "quick brown fox") == pytest.approx(2 / 3)
    assert S.field_score("5.0", 5) == 1.0 and S.field_score(True, "true") == 1.0 and S.field_score("6", 5) == 0.0


def test_format_over_present_keys_only():
    completion = json.dumps({"answer": 5})
    assert S.rl_struct_components(completion, SCHEMA, None)["format"] == 0.5
    assert S.rl_struct_components(completion, SCHEMA, None, format_over="present")["format"] == 1.0


def test_json_rewards_name_bad_input():
    with pytest.raises(ValueError, match="'answer'"):
        S.schema_types({"answer": "numbr"})
    with pytest.raises(KeyError, match="'schema' column"):
        S.rl_struct("p", "{}", {"answer": 5})
    with pytest.raises(KeyError, match="'answer' column"):
        S.json_field_accuracy("p", "{}", {"schema": SCHEMA})


# ---------------------------------------------------------------------------------------------------
# Soft length penalty (objectives.md §1.3)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("words, expected", [(16000, 0.0), (18000, -0.394531), (20480, -1.0), (30000, -1.0)])
def test_soft_length_penalty_spec_numbers(words, expected):
    completion = "w " * words
    value = S.soft_length_penalty("p", completion, {}, max_len=20480, cache_len=4096)
    assert value == pytest.approx(expected, abs=1e-6)


def test_soft_length_penalty_per_row_budget_and_units():
    # budget 10 words, buffer 20% = 2 -> free up to 8; 9 words -> -0.5
    assert S.soft_length_penalty("p", "a " * 9, {"max_length": 10}) == pytest.approx(-0.5)
    assert S.soft_length_penalty("p", "x" * 90, {}, max_len=100, cache_len=20, unit="chars") == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="max_len"):
        S.soft_length_penalty("p", "a", {})


# ---------------------------------------------------------------------------------------------------
# SSL tiers (C1)
# ---------------------------------------------------------------------------------------------------
def test_ssl_t1_and_t3():
    assert S.ssl_tier(0.8, (0.25, 0.5, 0.75, 0.9)) == 3
    assert S.ssl_reward(1, 0.8) == pytest.approx(1.233333, abs=1e-6)
    assert S.ssl_reward(0, 0.8) == pytest.approx(0.233333, abs=1e-6)
    assert S.ssl_reward(1, 0.1) == 1.0 and S.ssl_reward(0, 0.1) == 0.0


def test_ssl_t2_success_outranks_failure_and_is_monotone_in_quality():
    grid = [i / 20 for i in range(21)]
    successes = [S.ssl_reward(1, q) for q in grid]
    failures = [S.ssl_reward(0, q) for q in grid]
    assert min(successes) > max(failures)
    assert all(b >= a for a, b in zip(successes, successes[1:]))
    assert all(b >= a for a, b in zip(failures, failures[1:]))


def test_ssl_rejects_settings_that_break_the_ordering():
    with pytest.raises(ValueError, match="bonus_scale"):
        S.ssl_reward(1, 0.5, bonus_scale=1.0)
    with pytest.raises(ValueError, match="increasing"):
        S.ssl_reward(1, 0.5, thresholds=(0.5, 0.25))


def test_ssl_tiers_reward_from_a_success_reward_and_milestones():
    row = {"answer": 5, "milestones": ["x = 2", "y = 3", "x + y", "therefore"]}
    completion = "x = 2 and y = 3 so x + y is 5"  # 3 of 4 milestones -> q = 0.75 -> k = 3
    value = S.ssl_tiers("p", completion, row, success_reward="numeric_answer")
    assert value == pytest.approx(1 + 0.5 * 7 / 15)
    assert S.ssl_tiers("p", "x = 2 gives 4", row, success_reward="numeric_answer") == pytest.approx(0.5 * 1 / 15)
    with pytest.raises(KeyError, match="milestones"):
        S.ssl_tiers("p", "5", {"answer": 5}, success_reward="numeric_answer")


# ---------------------------------------------------------------------------------------------------
# OTC (C4 / D3)
# ---------------------------------------------------------------------------------------------------
def test_otc_tool_reward_spec_numbers():
    assert S.otc_tool_reward(2, 2) == pytest.approx(1.0)                              # C4 T1
    assert S.otc_tool_reward(4, 2) == pytest.approx(0.866025, abs=1e-6)
    assert S.otc_tool_reward(3, 0, c=2) == pytest.approx(math.cos(3 * math.pi / 8))  # C4 T2: 0.382683
    assert S.otc_tool_reward(3, 0, c=2) == pytest.approx(0.382683, abs=1e-6)
    assert S.otc_tool_reward(0, 0) == 1.0
    assert S.otc_tool_reward(1, 2) == pytest.approx(math.sin(math.pi / 3))            # D3
    assert S.otc_tool_reward(1, None, c=1) == pytest.approx(0.5)                      # D3 OTC-PPO, c = 1


def rollouts_for(completions, rewards, groups, prompts=None, **extras):
    b = len(completions)
    return Rollouts(
        prompt_ids=torch.zeros(b, 1, dtype=torch.long), prompt_mask=torch.ones(b, 1),
        completion_ids=torch.zeros(b, 1, dtype=torch.long), completion_mask=torch.ones(b, 1),
        group=torch.tensor(groups), truncated=torch.zeros(b, dtype=torch.bool),
        prompts=prompts or [f"q{g}" for g in groups], completions=completions,
        rows=[{} for _ in range(b)], rewards=torch.tensor(rewards, dtype=torch.float32), extras=extras)


def calls(n):
    return "<tool_call>{}</tool_call>" * n


def test_otc_grpo_shaping_replaces_the_reward():
    batch = rollouts_for([calls(2), calls(4), calls(1), calls(0)], [1.0, 1.0, 0.0, 0.0], [0, 0, 0, 0])
    delta, metrics = S.OptimalToolCalls()(batch)
    shaped = batch.rewards + delta
    assert shaped.tolist() == pytest.approx([1.0, 0.866025, 0.0, 0.0], abs=1e-6)  # C4 T1, T3
    assert metrics["otc/tool_productivity"] == pytest.approx(2 / 7)


def test_otc_history_keeps_the_best_count_across_steps_and_checkpoints():
    stage = S.OptimalToolCalls()
    stage(rollouts_for([calls(2)], [1.0], [0]))
    later = rollouts_for([calls(3)], [1.0], [0])
    assert (later.rewards + stage(later)[0]).item() == pytest.approx(math.sin(2.4 * math.pi / 4))  # n = 2, m = 3
    fresh = S.OptimalToolCalls(history=False)
    assert (later.rewards + fresh(later)[0]).item() == pytest.approx(1.0)  # n = 3 from this group alone
    restored = S.OptimalToolCalls()
    restored.load_state_dict(stage.state_dict())
    assert restored.best_calls == {"q0": 2.0}


def test_otc_groups_are_separate_questions_and_failed_rewards_stay_untouched():
    batch = rollouts_for(["", "", "", ""], [1.0, float("nan"), 1.0, 0.0], [0, 0, 1, 1], tool_calls=[1, 0, 3, 1])
    delta, _ = S.OptimalToolCalls(variant="ppo", c=1.0, mode="bonus")(batch)
    assert delta.tolist() == pytest.approx([0.5, 0.0, math.cos(3 * math.pi / 7), 0.0])
    with pytest.raises(ValueError, match="variant"):
        S.OptimalToolCalls(variant="sft")


def test_otc_is_built_from_a_recipe_with_checked_parameters():
    from policylab.registry import RegistryError, build

    stage = build("reward_shaping", "otc", {"c": 1.0, "history": False})
    assert isinstance(stage, S.OptimalToolCalls) and stage.c == 1.0
    with pytest.raises(RegistryError, match="smoothing"):
        build("reward_shaping", "otc", {"smoothing": 1.0})
