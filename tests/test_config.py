"""Recipe schema and loading (design.md "Recipe"; policylab/config.py): every shipped recipe, ``extends:``,
dotted overrides, and the error messages (they name the key and suggest the fix)."""

from __future__ import annotations

import textwrap

import pytest

from policylab.config import RECIPE_DIR, RecipeError, available_recipes, load_recipe, parse_override

RECIPES = sorted(available_recipes())


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(*args, **kwargs) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(*args, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------
# the shipped recipes


def test_the_baseline_recipes_ship():
    for name in ("grpo", "dapo", "dr_grpo", "gspo", "cispo", "rloo", "reinforce_pp", "lite_ppo"):
        assert name in RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_loads_and_is_documented(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.description.strip() and "\n" not in recipe.description.strip(), "description: one line"
    assert recipe.paper.strip(), "paper: authors year, title, arXiv id"
    text = (RECIPE_DIR / f"{name}.yaml").read_text()
    assert text.lstrip().startswith("#"), "a recipe starts with a comment"


def test_grpo_recipe_contents():
    r = load_recipe("grpo")
    assert (r.algorithm.advantage.name, r.algorithm.objective.name, r.algorithm.aggregate.name) == (
        "grpo",
        "ppo_clip",
        "seq-mean-token-mean",
    )
    assert r.algorithm.objective.params == {"eps_low": 0.2, "eps_high": 0.2}
    assert [(c.name, c.params) for c in r.algorithm.regularizers] == [("kl", {"estimator": "k3", "beta": 0.04})]


def test_dapo_recipe_contents():
    r = load_recipe("dapo")
    assert r.algorithm.objective.params["eps_high"] == 0.28
    assert r.algorithm.aggregate.name == "token-mean"
    assert r.algorithm.group_filter.name == "zero_variance"
    assert [c.name for c in r.algorithm.reward_shaping] == ["soft_overlong"]


def test_a_recipe_by_path(tmp_path):
    path = write(tmp_path, "mine.yaml", "# mine\ndescription: x\ntrain: {steps: 3}\n")
    r = load_recipe(str(path))
    assert r.name == "mine" and r.train.steps == 3
    assert r.algorithm.objective.name == "ppo_clip"  # schema defaults fill the rest


# ---------------------------------------------------------------------------------------------------
# extends


def test_extends_merges_parameters_of_the_same_component(tmp_path):
    path = write(
        tmp_path,
        "child.yaml",
        """\
        extends: grpo
        description: GRPO with clip-higher
        algorithm:
          objective: {name: ppo_clip, eps_high: 0.28}
        train: {steps: 7}
        """,
    )
    r = load_recipe(str(path))
    assert r.algorithm.objective.params == {"eps_low": 0.2, "eps_high": 0.28}  # eps_low kept from grpo
    assert r.algorithm.aggregate.name == "seq-mean-token-mean"  # untouched keys inherited
    assert [c.name for c in r.algorithm.regularizers] == ["kl"]
    assert r.train.steps == 7
    assert r.description == "GRPO with clip-higher"
    assert r.name == "child"


def test_extends_replaces_a_component_with_another_name(tmp_path):
    # grpo's ppo_clip parameters must not leak into reinforce (which has none: leaking would be an error)
    path = write(tmp_path, "child.yaml", "extends: grpo\nalgorithm:\n  objective: {name: reinforce}\n")
    r = load_recipe(str(path))
    assert r.algorithm.objective.name == "reinforce" and r.algorithm.objective.params == {}


def test_extends_does_not_inherit_the_parent_description_and_paper(tmp_path):
    r = load_recipe(str(write(tmp_path, "child.yaml", "extends: grpo\n")))
    assert r.description == "" and r.paper == ""


def test_extends_a_chain_of_files(tmp_path):
    write(tmp_path, "base.yaml", "extends: dapo\ntrain: {steps: 2, seed: 5}\n")
    path = write(tmp_path, "leaf.yaml", f"extends: {tmp_path / 'base.yaml'}\ntrain: {{steps: 9}}\n")
    r = load_recipe(str(path))
    assert (r.train.steps, r.train.seed) == (9, 5)
    assert r.algorithm.group_filter.name == "zero_variance"


def test_extends_a_sibling_file_by_relative_path(tmp_path, monkeypatch):
    """A relative ``extends:`` path is found next to the extending file, whatever the working directory."""
    folder = tmp_path / "my_recipes"
    folder.mkdir()
    write(folder, "base.yaml", "extends: rloo\ntrain: {seed: 11}\n")
    path = write(folder, "leaf.yaml", "extends: base.yaml\n")
    monkeypatch.chdir(tmp_path)
    assert load_recipe(str(path)).train.seed == 11


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path, "a.yaml", f"extends: {tmp_path / 'b.yaml'}\n")
    write(tmp_path, "b.yaml", f"extends: {tmp_path / 'a.yaml'}\n")
    assert "extends itself" in error_of(str(tmp_path / "a.yaml"))


# ---------------------------------------------------------------------------------------------------
# dotted overrides


def test_dotted_overrides_as_strings():
    r = load_recipe(
        "grpo",
        [
            "algorithm.objective.eps_high=0.28",
            "train.steps=5",
            "rollout.temperature=0.7",
            "model.name=tiny",
            "algorithm.regularizers.0.beta=0.001",
            "algorithm.objective.dual_clip_c=null",
        ],
    )
    assert r.algorithm.objective.params == {"eps_low": 0.2, "eps_high": 0.28, "dual_clip_c": None}
    assert (r.train.steps, r.rollout.temperature, r.model.name) == (5, 0.7, "tiny")
    assert r.algorithm.regularizers[0].params["beta"] == 0.001


def test_dotted_overrides_as_a_dict_and_creating_a_component():
    r = load_recipe("grpo", {"algorithm.group_filter.name": "zero_variance", "train.seed": 3})
    assert r.algorithm.group_filter.name == "zero_variance" and r.train.seed == 3


def test_override_parsing():
    assert parse_override("a.b=1") == ("a.b", 1)
    assert parse_override("a.b=x=y") == ("a.b", "x=y")
    assert parse_override("a=") == ("a", "")
    with pytest.raises(RecipeError, match="key.path=value"):
        parse_override("train.steps")


def test_override_list_index_out_of_range():
    msg = error_of("grpo", ["algorithm.regularizers.3.beta=0.1"])
    assert "algorithm.regularizers.3" in msg and "below 1" in msg


# ---------------------------------------------------------------------------------------------------
# error messages name the key and suggest the nearest valid one


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("train.step=5", "train.step", "'steps'"),
        ("algorthm.objective.name=ppo_clip", "algorthm", "'algorithm'"),
        ("rollout.group_sise=4", "rollout.group_sise", "'group_size'"),
        ("model.dtpye=float32", "model.dtpye", "'dtype'"),
    ],
)
def test_unknown_key(override, key, suggestion):
    msg = error_of("grpo", [override])
    assert "unknown key" in msg and repr(key) in msg and f"did you mean {suggestion}" in msg


def test_unknown_key_in_a_recipe_file(tmp_path):
    msg = error_of(str(write(tmp_path, "bad.yaml", "train:\n  micro_batchsize: 4\n")))
    assert "'train.micro_batchsize'" in msg and "'micro_batch_size'" in msg and "bad.yaml" in msg


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("train.steps=abc", "train.steps", "integer"),
        ("rollout.top_p=2", "rollout.top_p", "less than or equal to 1"),
        ("model.dtype=float8", "model.dtype", "'float32'"),
        ("train.progress=maybe", "train.progress", "boolean"),
    ],
)
def test_wrong_type(override, key, expected):
    msg = error_of("grpo", [override])
    assert key in msg and expected in msg, msg
    assert repr(override.split("=", 1)[1]) in msg or override.split("=", 1)[1] in msg  # shows the bad value


@pytest.mark.parametrize(
    "override, where, suggestion",
    [
        ("algorithm.objective.name=ppo_clp", "algorithm.objective", "'ppo_clip'"),
        ("algorithm.advantage.name=gpro", "algorithm.advantage", "'grpo'"),
        ("algorithm.aggregate.name=token_mean", "algorithm.aggregate", "'token-mean'"),
        ("algorithm.regularizers.0.name=kll", "algorithm.regularizers.0", "'kl'"),
    ],
)
def test_unknown_component(override, where, suggestion):
    msg = error_of("grpo", [override])
    assert where in msg and suggestion in msg and "did you mean" in msg, msg


@pytest.mark.parametrize(
    "override, param, where, suggestion",
    [
        ("algorithm.objective.eps_hihg=0.3", "eps_hihg", "algorithm.objective", "'eps_high'"),
        ("algorithm.regularizers.0.estimater=k2", "estimater", "algorithm.regularizers.0", "'estimator'"),
        ("algorithm.advantage.epsilon=0.1", "epsilon", "algorithm.advantage", "'eps'"),
    ],
)
def test_unknown_parameter(override, param, where, suggestion):
    msg = error_of("grpo", [override])
    assert repr(param) in msg and where in msg and suggestion in msg, msg


def test_unknown_reward_parameter():
    msg = error_of("grpo", ["rewards.0.tolerence=0.1"])
    assert "'tolerence'" in msg and "rewards.0" in msg and "'tolerance'" in msg


def test_reward_weight_is_not_a_reward_parameter():
    assert load_recipe("grpo", ["rewards.0.weight=0.5"]).rewards[0].params["weight"] == 0.5


def test_overriding_one_parameter_of_a_default_component():
    """grpo.yaml sets no task, sampler or rewards: an override of one parameter keeps the default name."""
    r = load_recipe("grpo", ["task.train_size=10", "sampler.seed=3", "rewards.0.tolerance=0.5"])
    assert (r.task.name, r.task.params) == ("arithmetic", {"train_size": 10})
    assert (r.sampler.name, r.sampler.params) == ("shuffle", {"seed": 3})
    assert (r.rewards[0].name, r.rewards[0].params) == ("numeric_answer", {"tolerance": 0.5})
    r = load_recipe(str(RECIPE_DIR / "grpo.yaml"), {"task.name": "file", "task.path": "rows.jsonl",  # path: required
                                                     "algorithm.group_filter.metric": "score",
                                                     "algorithm.group_filter.name": "zero_variance"})
    assert r.task.name == "file" and r.algorithm.group_filter.params == {"metric": "score"}


def test_unknown_recipe_name():
    msg = error_of("gpro")
    assert "'gpro'" in msg and "did you mean" in msg and "'grpo'" in msg


def test_missing_file_and_bad_yaml(tmp_path):
    assert "does not exist" in error_of(str(tmp_path / "nope.yaml"))
    assert "mapping" in error_of(str(write(tmp_path, "list.yaml", "- a\n- b\n")))
    assert "not valid YAML" in error_of(str(write(tmp_path, "broken.yaml", "train: {steps: [1\n")))


def test_a_recipe_needs_a_reward(tmp_path):
    assert "at least one reward" in error_of(str(write(tmp_path, "none.yaml", "rewards: []\n")))


def test_recipe_name_is_not_shadowed_by_a_folder_of_the_same_name(tmp_path, monkeypatch):
    from policylab.config import load_recipe

    (tmp_path / "grpo").mkdir()  # e.g. a run directory named after the recipe
    monkeypatch.chdir(tmp_path)
    assert load_recipe("grpo").algorithm.advantage.name == "grpo"


def test_renaming_a_component_drops_the_old_ones_parameters():
    # quickstart's arithmetic parameters (low, high, ...) mean nothing to another task
    assert load_recipe("quickstart", {"task.name": "tiny_arithmetic"}).task.params == {}
    # the same name keeps them, and parameters given beside a rename apply to the new component in any order
    kept = load_recipe("quickstart", {"task.high": 30, "task.name": "arithmetic"}).task.params
    assert kept["low"] == 1 and kept["high"] == 30
    assert load_recipe("grpo", {"algorithm.advantage.name": "rloo"}).algorithm.advantage.params == {}
    # a reward's combiner weight is not the component's parameter: it stays
    rewards = load_recipe("quickstart", {"rewards.1.name": "numeric_answer"}).rewards
    assert rewards[1].name == "numeric_answer" and rewards[1].params == {"weight": 0.2}
