"""The environment contract (D0), tools (parsing, schemas, limits, timeouts, truncation) and the built-in
environments (tool_math, text_game): exact success checks, optimal lengths, disjoint held-out splits."""

from __future__ import annotations

import time

import pytest

from policylab import registry
from policylab.environments import Environment, EnvironmentContractError, ObjectEnvironment, ToolBox, increments
from policylab.environments.builtin_tools import calculator
from policylab.environments.tasks import build_environment
from policylab.environments.text_game import build_world, optimal_length, walkthrough
from policylab.environments.tools import TRUNCATION_MARKER, parse_tool_calls, tool_from_function, truncate


def test_environment_is_a_registered_kind_with_the_builtins():
    assert "environment" in registry.KINDS
    assert {"text_game", "tool_math"} <= set(registry.names("environment"))


def test_cumulative_scores_become_increments():
    assert increments([0, 1, 1, 2], "cumulative") == [0, 1, 0, 1]
    assert increments([0, 1, 0, 1], "incremental") == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="reward mode"):
        increments([1], "total")


class Counter(Environment):
    reward_mode = "incremental"

    def _reset(self, row, seed):
        self.n = seed
        return f"n={self.n}"

    def _step(self, action):
        self.n += int(action)
        return f"n={self.n}", self.n >= 5, float(action), {}


def test_step_before_reset_and_after_done_are_contract_errors():
    env = Counter()
    with pytest.raises(EnvironmentContractError, match="before reset"):
        env.step("1")
    env.reset({"prompt": "p"}, 3)
    assert env.step("2")[1] is True
    with pytest.raises(EnvironmentContractError, match="after the episode ended"):
        env.step("1")


def test_replay_reexecutes_from_the_episode_reset():
    env = Counter()
    env.reset({"prompt": "p"}, 1)
    env.step("1")
    env.step("1")
    assert env.replay(["1", "1"]) == ("n=3", False, 2.0)
    assert env.replay(["1", "3", "9"]) == ("n=5", True, 4.0)  # stops at done


# -- tools ------------------------------------------------------------------------------------------

def add(a: int, b: int = 0) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


def test_a_function_becomes_a_tool_schema():
    tool = tool_from_function(add)
    assert tool.schema() == {"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer", "description": "the first"},
                                                        "b": {"type": "integer", "description": "the second"}},
                       "required": ["a"]}}}


def test_a_tool_needs_a_docstring_and_annotations():
    def nodoc(a: int):
        return a

    def untyped(a):
        """Doc."""

    with pytest.raises(ValueError, match="docstring"):
        tool_from_function(nodoc)
    with pytest.raises(TypeError, match="parameter 'a' needs a type annotation"):
        tool_from_function(untyped)


def test_parsing_returns_calls_text_and_errors():
    text = ('think <tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call> and '
            '<tool_call>{"name": add}</tool_call><tool_call>[1]</tool_call> <tool_call>{"name": "x"')
    calls, rest, errors = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 1})]
    assert rest.startswith("think") and "<tool_call>{\"name\": \"x\"" in rest
    assert len(errors) == 3
    assert "tool call 2 is not valid JSON" in errors[0] and "must be a JSON object" in errors[1]
    assert "not closed" in errors[2]


def test_toolbox_runs_valid_calls_and_reports_every_bad_one():
    box = ToolBox({"add": tool_from_function(add)}, max_calls_per_turn=4, max_calls_per_episode=3)
    turn = ('<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
            '<tool_call>{"name": "mul", "arguments": {}}</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"a": "2"}}</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"a": 1, "c": 1}}</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>')
    lines, executed, rejected = box.run_turn(turn)
    assert lines[0] == "5" and executed == 1 and rejected == 4
    assert "unknown tool 'mul'" in lines[1]
    assert "argument 'a' must be integer, got str" in lines[2]
    assert "has no argument(s) ['c']" in lines[3]
    assert "more than 4 tool calls in one turn" in lines[4]
    assert box.calls == 1 and box.format_errors == 4
    box.run_turn('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>' * 2)
    lines, executed, _ = box.run_turn('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>')
    assert executed == 0 and "limit of 3 tool calls" in lines[0]


def test_a_tool_that_raises_or_hangs_is_an_error_observation_and_a_counted_failure():
    def boom(x: int) -> int:
        """Fail."""
        raise RuntimeError("kaput")

    def hang(x: int) -> int:
        """Hang."""
        time.sleep(2)
        return x

    slow = tool_from_function(hang, timeout_s=0.2)
    box = ToolBox({"boom": tool_from_function(boom), "hang": slow})
    lines, executed, rejected = box.run_turn('<tool_call>{"name": "boom", "arguments": {"x": 1}}</tool_call>'
                                             '<tool_call>{"name": "hang", "arguments": {"x": 1}}</tool_call>')
    assert "raised RuntimeError: kaput" in lines[0] and "timed out after 0.2 s" in lines[1]
    assert executed == 2 and rejected == 0 and box.failures == 2


def test_long_outputs_are_cut_with_an_explicit_marker():
    assert truncate("x" * 10, 4) == "xxxx" + TRUNCATION_MARKER.format(n=6)
    assert truncate("short", 10) == "short"
    box = ToolBox({"add": tool_from_function(add)}, max_output_chars=2)
    lines, _, _ = box.run_turn('<tool_call>{"name": "add", "arguments": {"a": 12345}}</tool_call>')
    assert lines == ["12" + TRUNCATION_MARKER.format(n=3)]


def test_calculator_is_exact_and_refuses_anything_else():
    assert calculator("(12 + 7) * 3") == "57" and calculator("7 / 2") == "3.5" and calculator("2**10") == "1024"
    with pytest.raises(ValueError):
        calculator("__import__('os')")
    with pytest.raises(ValueError, match="small integer exponent"):
        calculator("9**999999")


@pytest.mark.slow
def test_python_tool_runs_in_the_code_sandbox():
    from policylab.environments.builtin_tools import python_tool

    tool = python_tool(timeout_s=5.0)
    assert tool.fn(code="print(6 * 7)") == "42"
    assert "ZeroDivisionError" in tool.fn(code="1/0")


# -- the plain-Python (TRL environment_factory) form ------------------------------------------------

class Vault:
    """A user class: reset takes the row's columns it names; public methods are tools."""

    def reset(self, code: int, **_):
        self.code = code
        return "A vault. Guess the code."

    def guess(self, value: int) -> str:
        """Try a code.

        Args:
            value: the guess
        """
        return "higher" if value < self.code else "lower" if value > self.code else "open"

    def reward(self, answer: str) -> float:
        return float(answer.strip() == str(self.code))


def test_a_plain_class_is_an_environment_with_its_methods_as_tools():
    env = ObjectEnvironment(Vault)
    assert [t.name for t in env.tool_list] == ["guess"] and '"name": "guess"' in env.instructions
    assert env.reset({"prompt": "p", "code": 7}, 0) == "A vault. Guess the code."
    obs, done, reward, info = env.step('<tool_call>{"name": "guess", "arguments": {"value": 3}}</tool_call>')
    assert (obs, done, reward, info["tool_calls"], info["role"]) == ("higher", False, 0.0, 1, "tool")
    assert env.step("7")[1:3] == (True, 1.0) and env.success()


def test_a_user_class_is_named_by_import_path():
    env = build_environment("tests.test_environments:Vault")
    assert isinstance(env, ObjectEnvironment)


# -- built-in environments --------------------------------------------------------------------------

def test_text_game_walkthrough_wins_in_the_optimal_length_with_cumulative_score():
    env = build_environment("text_game", {"rooms": 4, "objects": 3})
    for row in env.task_rows("train", 5, seed=0):
        world = build_world(row["game_seed"], 4, 3)
        plan = walkthrough(world)
        assert len(plan) == optimal_length(world) == row["optimal_length"]
        env.reset(row, 0)
        scores = [env.step(a)[2] for a in plan]
        assert scores[-1] == env.max_total_reward() == 2.0 and env.success()
        assert increments(scores, env.reward_mode).count(1.0) == 2
        assert env.replay(plan) == (f"You drop the {world['goal_object']}. You win!", True, 2.0)


def test_text_game_invalid_commands_score_nothing_and_are_flagged():
    env = build_environment("text_game", {})
    env.reset(env.task_rows("train", 1, 0)[0], 0)
    obs, done, score, info = env.step("dance wildly")
    assert obs == "I don't understand that." and not done and score == 0 and info["invalid"]
    assert not env.success()


def test_text_game_sizes_scale_and_splits_are_disjoint():
    small, large = build_environment("text_game", {"rooms": 2}), build_environment("text_game", {"rooms": 8, "objects": 4})
    mean = lambda rows: sum(r["optimal_length"] for r in rows) / len(rows)  # noqa: E731
    assert mean(large.task_rows("train", 40, 0)) > mean(small.task_rows("train", 40, 0))
    train = {r["game_seed"] for r in small.task_rows("train", 50, 0)}
    held = {r["game_seed"] for r in small.task_rows("eval", 50, 0)}
    assert not train & held
    with pytest.raises(ValueError, match="rooms"):
        build_environment("text_game", {"rooms": 99})


def test_tool_math_checks_the_final_answer_exactly_and_splits_are_disjoint():
    env = build_environment("tool_math", {"digits": 3})
    train, held = env.task_rows("train", 100, 0), env.task_rows("eval", 20, 0)
    assert not {r["expression"] for r in train} & {r["expression"] for r in held}
    row = train[0]
    env.reset(row, 0)
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "%s"}}</tool_call>' % row["expression"]
    assert env.step(call)[0] == str(row["answer"])
    assert env.step(f"So it is {row['answer'] + 1}.")[2] == 0.0 and not env.success()
    env.reset(row, 0)
    assert env.step(f"The answer is {row['answer']:,}")[2] == 1.0 and env.success()


def test_environment_task_tags_rows_with_their_environment():
    task = registry.build("task", "environment", {"environment": "text_game", "params": {"rooms": 3},
                                                  "train_size": 4, "eval_size": 2})()
    assert len(task.train) == 4 and len(task.eval) == 2
    assert all(r["environment"] == "text_game" and r["env_params"] == {"rooms": 3} for r in task.train + task.eval)
    with pytest.raises(registry.RegistryError, match="unknown environment 'text_gmae'.*text_game"):
        registry.build("task", "environment", {"environment": "text_gmae"})()
