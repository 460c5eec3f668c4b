"""Your own reward: TRL-style and policylab-style functions from a file, a module or a callable; how they
are recorded in config.yaml and loaded again by --resume and `policylab eval`; errors before the model loads."""

import json
import math
import sys
import textwrap

import pytest
import yaml

import policylab
from policylab import models
from policylab.cli import main
from policylab.config import load_recipe
from policylab.eval.evaluate import main_eval
from policylab.rewards.combine import RewardCombiner
from policylab.rewards.user import RewardImportError, reward_entries
from policylab.train.loop import TrainingError
from tests.conftest import TINY_RUN

ONE_STEP = {**TINY_RUN, "train.steps": 1, "train.eval_size": 2, "train.eval_samples": 0, "train.log_samples": 0}

TRL_FILE = """
CALLS = []

def exact(prompts, completions, answer, **kwargs):
    CALLS.append({"prompts": list(prompts), "completions": list(completions), "answer": list(answer),
                  "keys": sorted(kwargs)})
    return [None if c == "skip" else float(c.strip() == a) for c, a in zip(completions, answer)]

def only_named(completions, level):
    return [float(len(c)) * lv for c, lv in zip(completions, level)]

def wrong_length(prompts, completions, **kwargs):
    return [1.0]

def per_sample(prompt, completion, row):
    return 2.0 if completion == row["answer"] else -1.0

def bad_signature(x):
    return 0.0

def constant(prompts, completions, **kwargs):
    return [1.0] * len(completions)
"""


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(TRL_FILE)
    return path


def combiner(*rewards):
    return RewardCombiner(load_recipe("grpo", {"rewards": list(rewards)}).rewards)


def test_trl_signature_gets_columns_as_kwargs_and_none_fails_that_sample(reward_file):
    c = combiner({"name": f"{reward_file}:exact", "weight": 2.0})
    rows = [{"prompt": "1+1=", "answer": "2", "level": 1}, {"prompt": "2+2=", "answer": "4", "level": 3}]
    total, parts = c(["<fmt>1+1=", "<fmt>2+2="] * 1 + ["<fmt>2+2="], ["2", "5", "skip"], rows + [rows[1]])
    assert total[:2].tolist() == [2.0, 0.0] and math.isnan(total[2])  # weight 2; None -> NaN (failed sample)
    assert parts["exact"][:2].tolist() == [1.0, 0.0]
    calls = sys.modules[c.rewards[0].fn.fn.__module__].CALLS
    assert len(calls) == 1  # one call per batch, as TRL does
    # TRL passes the dataset prompts (not the chat-formatted text) and every other column by name
    assert calls[0]["prompts"] == ["1+1=", "2+2=", "2+2="] and calls[0]["answer"] == ["2", "4", "4"]
    assert calls[0]["keys"] == ["level"]


def test_function_without_kwargs_gets_only_its_columns_and_per_sample_signature(reward_file):
    rows = [{"prompt": "p", "answer": "ab", "level": 2, "other": "x"}]
    named = combiner({"name": f"{reward_file}:only_named"})
    assert named(["p"], ["abc"], rows)[0].tolist() == [6.0]
    mine = combiner({"name": f"{reward_file}:per_sample"})
    assert mine(["p", "p"], ["ab", "zz"], rows * 2)[0].tolist() == [2.0, -1.0]


def test_conversational_prompt_gives_trl_message_completions(reward_file):
    c = combiner({"name": f"{reward_file}:exact"})
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1="}]
    with pytest.warns(UserWarning, match="'list' object has no attribute 'strip'"):  # exact() expects strings
        c(["formatted"], ["2"], [{"prompt": messages, "answer": "2"}])
    call = sys.modules[c.rewards[0].fn.fn.__module__].CALLS[-1]
    assert call["prompts"] == [messages]
    assert call["completions"] == [[{"role": "assistant", "content": "2"}]]


def test_wrong_length_result_fails_the_batch_with_a_warning_not_a_crash(reward_file):
    c = combiner({"name": f"{reward_file}:wrong_length"})
    with pytest.warns(UserWarning, match="returned 1 values for 2 completions"):
        total, _ = c(["a", "b"], ["x", "y"], [{"prompt": "a"}, {"prompt": "b"}])
    assert all(math.isnan(v) for v in total.tolist())


def test_reward_path_errors_name_the_path_and_what_is_missing(tmp_path, reward_file):
    broken = tmp_path / "broken.py"
    broken.write_text("def f(prompts, completions):\n    return [\n\nx = (\n")
    cases = [
        (f"{tmp_path}/nope.py:score", "nope.py does not exist"),
        (f"{reward_file}:exactt", "has no 'exactt' (did you mean 'exact'?)"),
        (f"{broken}:f", "syntax error at line"),
        (f"{reward_file}:bad_signature", "expected TRL's fn(prompts, completions"),
        ("no_such_module_xyz:fn", "no module named 'no_such_module_xyz'"),
        ("json:no_such_fn", "has no 'no_such_fn'"),
    ]
    for path, message in cases:
        with pytest.raises(RewardImportError, match="reward") as err:
            combiner({"name": path})
        assert message in str(err.value), (path, str(err.value))
        assert path.split(":")[0].split("/")[-1] in str(err.value)


def test_a_bad_reward_stops_train_before_the_task_and_model_load(tmp_path, reward_file, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before the reward was checked")

    monkeypatch.setattr(models, "load", no_loading)
    with pytest.raises(RewardImportError, match=r"rewards\.0: .*has no 'exactt'"):
        policylab.train("grpo", run_dir=tmp_path / "run", reward_funcs=[f"{reward_file}:exactt"], **ONE_STEP)
    assert not (tmp_path / "run").exists()


def test_relative_reward_file_is_recorded_absolute_and_resume_and_eval_load_it(tmp_path, reward_file, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["train", "grpo", "--reward", "my_rewards.py:exact", "--run-dir", "run",
                 *[f"{k}={v}" for k, v in ONE_STEP.items()]])
    assert code == 0
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["rewards"]
    assert recorded == [{"name": "python", "path": f"{reward_file}:exact"}]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the recorded path is absolute, so another working directory works
    assert main(["train", "--resume", str(tmp_path / "run"), "train.steps=2"]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "reward/exact" in m] == [1, 2]  # logged under the function's name
    capsys.readouterr()
    assert main_eval([str(tmp_path / "run"), "-k", "1", "-n", "2", "--no-greedy", "--er-stride", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["num_prompts"] == 2


def test_importable_callable_is_recorded_by_module_and_resumes_without_passing_it(tmp_path, monkeypatch, recwarn):
    (tmp_path / "pkg_rewards_mod.py").write_text(TRL_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import pkg_rewards_mod

    run = policylab.train("grpo", run_dir=tmp_path / "run", reward_funcs=[pkg_rewards_mod.exact],
                          reward_weights=[0.5], **ONE_STEP)
    assert not [w for w in recwarn if "cannot be imported again" in str(w.message)]
    recorded = yaml.safe_load((run / "config.yaml").read_text())["rewards"]
    assert recorded == [{"name": "python", "path": "pkg_rewards_mod:exact", "weight": 0.5}]
    policylab.train(run_dir=run, resume=True, **{"train.steps": 2})
    assert len(pkg_rewards_mod.CALLS) >= 4  # steps 1 and 2 and their evals called the same module's function


def test_lambda_warns_at_start_and_resume_without_it_is_an_error_naming_it(tmp_path, monkeypatch):
    seen = []

    def local_reward(prompts, completions, **kwargs):
        seen.append(len(completions))
        return [float(len(c) < 3) for c in completions]

    with pytest.warns(UserWarning, match="cannot be imported again"):
        run = policylab.train("grpo", run_dir=tmp_path / "run", reward_funcs=[local_reward], **ONE_STEP)
    path = yaml.safe_load((run / "config.yaml").read_text())["rewards"][0]["path"]
    assert path.endswith("<locals>.local_reward")
    monkeypatch.setattr(models, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    with pytest.raises(RewardImportError, match="local_reward.*pass it again"):
        policylab.train(run_dir=run, resume=True, **{"train.steps": 2})
    monkeypatch.undo()
    before = len(seen)
    with pytest.warns(UserWarning):
        policylab.train(run_dir=run, resume=True, reward_funcs=[local_reward], **{"train.steps": 2})
    assert len(seen) > before
    # and `policylab eval` says the same instead of failing after the model loaded
    assert main_eval([str(run), "-k", "1", "-n", "2"]) == 2


def test_reward_weights_combine_like_trl_and_must_match(reward_file):
    entries, _ = reward_entries([f"{reward_file}:constant", f"{reward_file}:per_sample"], [0.25, 4.0])
    total, parts = combiner(*entries)(["p"], ["ab"], [{"prompt": "p", "answer": "ab"}])
    assert total.tolist() == [0.25 * 1.0 + 4.0 * 2.0]
    assert set(parts) == {"constant", "per_sample", "accuracy"}
    with pytest.raises(ValueError, match="reward_weights has 1 values but reward_funcs has 2"):
        reward_entries([f"{reward_file}:constant", f"{reward_file}:exact"], [1.0])


def test_yaml_recipe_names_rewards_by_import_path(tmp_path, reward_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text(textwrap.dedent("""
        extends: grpo
        rewards:
          - my_rewards.py:exact
          - {name: my_rewards.py:constant, weight: 0.1}
          - {name: numeric_answer, weight: 0.5}
    """))
    recipe = load_recipe(str(tmp_path / "mine.yaml"))
    assert [(r.name, r.params) for r in recipe.rewards] == [
        ("python", {"path": f"{reward_file}:exact"}), ("python", {"path": f"{reward_file}:constant", "weight": 0.1}),
        ("numeric_answer", {"weight": 0.5})]


def test_reward_funcs_and_rewards_overrides_together_are_refused(reward_file):
    with pytest.raises(TrainingError, match="not both"):
        policylab.train("grpo", reward_funcs=[f"{reward_file}:exact"], **{"rewards.0.weight": 2.0})
