"""Prompts over the context budget are handled by rollout.overlong_prompt before any generation, with a count
(issue 12, deliverable 3). The tiny model has a 256-position context and a character-level tokenizer."""

import json

import pytest

import policylab
from policylab import models
from policylab.config import RecipeError
from policylab.registry import register
from policylab.train.loop import TrainingError
from policylab.train.prompt_budget import apply_policy, prompt_budget, prompt_tokens
from tests.conftest import TINY_RUN

LONG = "Background. " * 40  # 480 characters: over the 250-token budget (256 - max_new_tokens 6)
SEEN = []


@register("reward", "_test_records_prompt_rows")
def records_prompt_rows(prompt, completion, row):
    SEEN.append(row["prompt"])
    return 0.0


@pytest.fixture
def data(tmp_path):
    rows = [{"prompt": f"{a} + {a}=", "answer": str(2 * a)} for a in range(12)]
    rows[3]["prompt"] = LONG + rows[3]["prompt"]
    rows[7]["prompt"] = LONG + LONG + rows[7]["prompt"]
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _settings(data, **extra):
    return {**TINY_RUN, "task.name": str(data), "task.eval_fraction": 0.0, "train.steps": 2, "train.eval_size": 0,
            "rewards": [{"name": "_test_records_prompt_rows"}], **extra}


def test_default_refuses_overlong_prompts_before_any_generation(tmp_path, data, tiny_arith_model):
    SEEN.clear()
    with pytest.raises(TrainingError, match=r"2 of 12 train prompts are longer than the 250-token prompt budget .*"
                                            r"row \d+ \(486 tokens, 'Background. Background. Backgr...'\), row \d+ \(966 tokens.*rollout.overlong_prompt="):
        policylab.train("grpo", run_dir=tmp_path / "run", **_settings(data))
    assert SEEN == [] and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_drop_leaves_the_rows_out_and_counts_them(tmp_path, data, tiny_arith_model, capfd):
    SEEN.clear()
    policylab.train("grpo", run_dir=tmp_path / "run", **_settings(data, **{"rollout.overlong_prompt": "drop"}))
    assert "rollout.overlong_prompt=drop: dropped 2 of 12 train prompts longer than the 250-token" in capfd.readouterr().err
    assert SEEN and max(len(p) for p in SEEN) < 250


def test_truncate_left_keeps_the_end_of_the_prompt(tmp_path, data, tiny_arith_model, capfd):
    SEEN.clear()
    policylab.train("grpo", run_dir=tmp_path / "run",
                    **_settings(data, **{"rollout.overlong_prompt": "truncate_left", "train.prompts_per_step": 12,
                                         "rollout.group_size": 2}))
    assert "truncated from the left 2 of 12 train prompts" in capfd.readouterr().err
    cut = {p for p in SEEN if "Background" in p}
    assert {len(p) for p in cut} == {250} and sorted(p[-6:] for p in cut) == ["3 + 3=", "7 + 7="]


def test_unknown_policy_is_a_recipe_error(tmp_path, data):
    with pytest.raises(RecipeError, match="overlong_prompt"):
        policylab.train("grpo", run_dir=tmp_path / "run", **_settings(data, **{"rollout.overlong_prompt": "shorten"}))


def test_truncate_left_on_chat_prompts_drops_the_oldest_messages_first():
    tok = models.tiny_tokenizer()
    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a" * 100},
                      {"role": "assistant", "content": "b" * 100}, {"role": "user", "content": "c" * 30 + " 1+1="}]}
    (out,) = apply_policy([row], tok, 60, "truncate_left", "train", warn=lambda m: None)
    assert [m["content"] for m in out["prompt"]] == ["Be brief.", "c" * 30 + " 1+1="]
    assert prompt_tokens(tok, out) <= 60
    (cut,) = apply_policy([row], tok, 20, "truncate_left", "train", warn=lambda m: None)
    assert cut["prompt"][0]["content"] == "Be brief." and cut["prompt"][1]["content"].endswith(" 1+1=")
    assert prompt_tokens(tok, cut) == 20
    assert row["prompt"][1]["content"] == "a" * 100  # the task's own row is unchanged


def test_a_completion_budget_past_the_context_is_an_error():
    model, _ = models.load("tiny")
    assert prompt_budget(model, 6) == 250
    with pytest.raises(TrainingError, match="max_new_tokens=256 leaves no room"):
        prompt_budget(model, 256)
