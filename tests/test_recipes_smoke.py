"""Every recipe in recipes/ trains end to end for 3 steps on the tiny testbed (design.md §Contracts)."""

import json
import math

import pytest

import policylab
from policylab.config import available_recipes, load_recipe
from tests.conftest import TINY_RUN

RECIPES = sorted(available_recipes())


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_three_steps(name, tmp_path, tiny_arith_model):
    recipe = load_recipe(name)
    assert recipe.description and recipe.paper, f"recipe {name} must name what it does and its paper"
    overrides = {**TINY_RUN, "train.steps": 3}
    if recipe.rollout.engine.name == "agent":  # an agent recipe's task is its environment's (tiny-sized) rows
        overrides.pop("task.name")
    run = policylab.train(name, run_dir=tmp_path / name, **overrides)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r or "skipped_nonfinite" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert "skipped_nonfinite" not in r, f"{name}: step {r['step']} had a non-finite loss"
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        assert r["batch/completions"] > 0
    assert any("eval/accuracy" in r for r in lines)
    assert (run / "checkpoints" / "step-3" / "trainer_state.pt").exists()


def test_baseline_recipes_listed():
    assert {"grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo", "reinforce_pp", "lite_ppo"} <= set(RECIPES)
