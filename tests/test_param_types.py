"""Component parameters are type-checked when a recipe loads (policylab/params.py): values are coerced to
the parameter's type ("5e-4" -> 0.0005) or rejected with a message naming component, parameter, recipe
location, expected type and the value given, before any model loads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Literal

import pytest

from policylab import config, registry
from policylab.config import RecipeError, available_recipes, load_recipe
from policylab.params import model_for, validate_params


def error_of(*args, **kwargs) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(*args, **kwargs)
    return str(info.value)


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


# a user-registered component with annotations (registered once, under a name no shipped file uses)
@registry.register("advantage", "test_param_types_adv")
def _typed_advantage(rollouts, *, scale: float = 1.0, steps: int = 2, whiten: bool = False,
                     mode: Literal["mean", "max"] = "mean", label: str = "x", window=3, alpha=0.5, flag=True,
                     anything=None, ratios: list[float] = (1.0,)):
    """Test component: returns its parameters."""
    return dict(scale=scale, steps=steps, whiten=whiten, mode=mode, label=label)


def with_advantage(tmp_path, params: str) -> str:
    return write(tmp_path, f"""
        extends: grpo
        algorithm:
          advantage: {{name: test_param_types_adv, {params}}}
    """)


# ---------------------------------------------------------------------------------------------------
# coercion


def test_string_number_coerces_to_float_in_the_recipe(tmp_path):
    path = write(tmp_path, """
        extends: grpo
        algorithm:
          objective: {name: ppo_clip, eps_low: 0.2, eps_high: "5e-4"}
    """)
    recipe = load_recipe(path)
    value = recipe.algorithm.objective.params["eps_high"]
    assert value == 0.0005 and type(value) is float
    assert recipe.algorithm.objective.eps_high == 0.0005  # the Component model carries it too


def test_override_string_number_coerces():
    recipe = load_recipe("grpo", {"algorithm.objective.eps_high": "1e-3", "task.train_size": "12"})
    assert recipe.algorithm.objective.params["eps_high"] == 1e-3
    assert recipe.task.params["train_size"] == 12 and type(recipe.task.params["train_size"]) is int


def test_int_for_float_becomes_float_and_values_pass_unchanged():
    recipe = load_recipe("grpo", {"algorithm.objective.eps_high": 1})
    assert type(recipe.algorithm.objective.params["eps_high"]) is float


# ---------------------------------------------------------------------------------------------------
# errors


def test_word_for_float_names_component_parameter_location_and_value(tmp_path):
    path = write(tmp_path, """
        extends: grpo
        algorithm:
          objective: {name: ppo_clip, eps_high: abc}
    """)
    msg = error_of(path)
    assert "objective 'ppo_clip' parameter 'eps_high' at algorithm.objective" in msg
    assert "expected a number (float), got 'abc'" in msg


def test_cli_style_override_errors_the_same_way():
    msg = error_of("grpo", ["algorithm.objective.eps_high=abc"])
    assert "objective 'ppo_clip' parameter 'eps_high' at algorithm.objective: expected a number (float), got 'abc'" in msg


def test_list_for_float_is_an_error():
    msg = error_of("grpo", {"algorithm.objective.eps_high": [0.1, 0.2]})
    assert "'eps_high'" in msg and "expected a number (float), got [0.1, 0.2]" in msg


def test_fraction_for_int_is_an_error():
    msg = error_of("grpo", {"task.train_size": 0.5})
    assert "task 'arithmetic' parameter 'train_size' at task: expected a whole number (int), got 0.5" in msg


def test_maybe_for_bool_is_an_error():
    msg = error_of("grpo", {"algorithm.regularizers.0": {"name": "entropy", "adaptive": "maybe"}})
    assert "regularizer 'entropy' parameter 'adaptive' at algorithm.regularizers.0" in msg
    assert "expected true or false (bool), got 'maybe'" in msg


def test_none_allowed_where_the_default_is_none():
    recipe = load_recipe("grpo", {"algorithm.objective.dual_clip_c": None})
    assert recipe.algorithm.objective.params["dual_clip_c"] is None


def test_unknown_name_still_suggests_the_spelling():
    msg = error_of("grpo", {"algorithm.objective.eps_hihg": 0.3})
    assert "has no parameter 'eps_hihg'" in msg and "did you mean 'eps_high'" in msg


def test_missing_required_parameter_is_reported():
    msg = error_of("grpo", {"task": {"name": "file"}})
    assert "task 'file' parameter 'path' at task: required, but not given" in msg


def test_optimizer_params_argument_is_not_required():
    assert "params" not in model_for(registry.get("optimizer", "adamw")).required
    load_recipe("grpo", {"optimizer.lr": "3e-5"})


def test_optimizer_tuple_items_are_checked():
    assert load_recipe("grpo", {"optimizer.betas": ["0.9", 0.95]}).optimizer.params["betas"] == (0.9, 0.95)
    msg = error_of("grpo", {"optimizer.betas": [0.9, "x"]})
    assert "optimizer 'adamw' parameter 'betas' at optimizer" in msg and "item 1" in msg


# ---------------------------------------------------------------------------------------------------
# a user-registered component


def test_user_component_annotations_are_validated(tmp_path):
    recipe = load_recipe(with_advantage(tmp_path, 'scale: "2.5", steps: "4", whiten: "true", mode: max, ratios: [1, "2"]'))
    p = recipe.algorithm.advantage.params
    assert p == {"scale": 2.5, "steps": 4, "whiten": True, "mode": "max", "ratios": [1.0, 2.0]}
    built = registry.build("advantage", "test_param_types_adv", {"scale": "3"}, where="x")
    assert built(None)["scale"] == 3.0


def test_literal_choice_message(tmp_path):
    msg = error_of(with_advantage(tmp_path, "mode: median"))
    assert "advantage 'test_param_types_adv' parameter 'mode' at algorithm.advantage" in msg
    assert "expected one of 'mean', 'max', got 'median'" in msg


def test_str_param_given_a_mapping(tmp_path):
    msg = error_of(with_advantage(tmp_path, "label: {a: 1}"))
    assert "parameter 'label' at algorithm.advantage: expected a string (str), got {'a': 1}" in msg


def test_unannotated_params_take_the_type_of_their_default(tmp_path):
    types = model_for(registry.get("advantage", "test_param_types_adv")).types
    assert types["window"] is int and types["alpha"] is float and types["flag"] is bool
    p = load_recipe(with_advantage(tmp_path, "window: 5, alpha: 1, flag: false, anything: [1, b]")).algorithm.advantage.params
    assert p == {"window": 5, "alpha": 1.0, "flag": False, "anything": [1, "b"]} and type(p["alpha"]) is float
    assert "expected a whole number (int), got 0.5" in error_of(with_advantage(tmp_path, "window: 0.5"))
    assert "expected true or false (bool), got 'maybe'" in error_of(with_advantage(tmp_path, "flag: maybe"))


def test_registry_build_validates_without_a_recipe():
    entry = registry.get("advantage", "test_param_types_adv")
    with pytest.raises(registry.RegistryError, match=r"parameter 'steps' at here: expected a whole number \(int\), got 'x'"):
        validate_params(entry, {"steps": "x"}, "here")
    with pytest.raises(registry.RegistryError, match="parameter 'scale': expected"):
        registry.build("advantage", "test_param_types_adv", {"scale": "abc"})


def test_unresolvable_annotation_falls_back_to_any():
    def odd(rollouts, *, known: int = 1, ghost: "NoSuchType" = None):  # noqa: F821
        return known, ghost

    entry = registry.Entry("advantage", "odd", odd, "", "")
    spec = model_for(entry)
    assert spec.types["known"] is int
    assert validate_params(entry, {"known": "2", "ghost": object}, "") == {"known": 2, "ghost": object}


# ---------------------------------------------------------------------------------------------------
# every shipped recipe and component


@pytest.mark.parametrize("name", sorted(available_recipes()))
def test_every_shipped_recipe_loads(name):
    load_recipe(name)


def test_every_registered_component_has_a_params_model():
    for kind in registry.KINDS:
        for entry in registry.entries(kind).values():
            model_for(entry)


# ---------------------------------------------------------------------------------------------------
# before any model loads


def test_train_fails_before_loading_a_model(monkeypatch, tmp_path):
    from policylab import models
    from policylab.train.loop import train

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load", boom)
    with pytest.raises(RecipeError, match="parameter 'eps_high' at algorithm.objective: expected a number"):
        train("grpo", run_dir=tmp_path / "run", model="tiny", **{"algorithm.objective.eps_high": "abc"})
    assert not (tmp_path / "run").exists()


def test_cli_train_reports_the_error(tmp_path):
    run_dir = tmp_path / "run"
    script = Path(sys.executable).with_name("policylab")  # the installed `policylab` command
    command = [str(script)] if script.exists() else [sys.executable, "-m", "policylab.cli"]
    proc = subprocess.run(
        [*command, "train", "grpo", "algorithm.objective.eps_high=abc", "--model", "tiny",
         "--steps", "1", "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert ("objective 'ppo_clip' parameter 'eps_high' at algorithm.objective: expected a number (float), got 'abc'"
            in proc.stderr)
    assert not (run_dir / "metrics.jsonl").exists() and not run_dir.exists()
    assert not list(tmp_path.rglob("metrics.jsonl"))
