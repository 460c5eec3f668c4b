"""Code execution reward: test splitting, value transport, assert and stdin/stdout grading, the
registered ``code_tests`` reward. Hostile programs are in test_sandbox_attacks.py."""

import pytest

from policylab.registry import build, get
from policylab.rewards.code_sandbox import CodeRunResult, extract_code, run_code_tests
from policylab.rewards.code_sandbox._child import encode_value
from policylab.rewards.code_sandbox.harness import compile_test, decode_value, evaluate_check, outputs_match

DOUBLE = "def f(x):\n    return x * 2\n"


# ---------------------------------------------------------------------------------------------------
# Splitting asserts: expected values stay in the parent
# ---------------------------------------------------------------------------------------------------
def test_expected_value_is_not_sent_to_the_child():
    test = compile_test("assert f(3) == 987654321")
    assert test.steps == (("probe", "f(3)"),)
    assert all("987654321" not in source for _, source in test.steps)


def test_safe_wrappers_and_arithmetic_are_evaluated_in_the_parent():
    test = compile_test("assert sorted(g(1)) == [1, 2] and abs(h(2) - 0.5) < 1e-6 and math.isclose(k(), 3.0)")
    assert [source for _, source in test.steps] == ["g(1)", "h(2)", "k()"]


def test_calls_with_generators_are_probed_whole():
    test = compile_test("assert all(f(i) == 2 * i for i in range(3))")
    assert test.steps == (("probe", "all((f(i) == 2 * i for i in range(3)))"),)


def test_statements_between_asserts_keep_their_order():
    test = compile_test("x = f(1)\nassert x == 2\nx = f(2)\nassert x == 4")
    assert [kind for kind, _ in test.steps] == ["exec", "probe", "exec", "probe"]
    assert test.num_probes == 2 and len(test.checks) == 2


@pytest.mark.parametrize("bad, message", [("assert f(", "not valid Python"), ("x = f(1)", "no top-level assert"),
                                          (3, "must be a string")])
def test_unusable_tests_are_named(bad, message):
    with pytest.raises(ValueError, match=f"test #4 .*{message}|test #4 {message}"):
        compile_test(bad, 4)


def test_parent_check_refuses_work_the_child_could_blow_up():
    test = compile_test("assert 2 ** f(1) > 0")
    with pytest.raises(OverflowError):
        evaluate_check(test.checks[0], {"__probe_0": 10 ** 9})
    test = compile_test("assert [0] * f(1) == []")
    with pytest.raises(OverflowError):
        evaluate_check(test.checks[0], {"__probe_0": 10 ** 12})


# ---------------------------------------------------------------------------------------------------
# Plain-data transport
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [None, True, 0, -7, 10 ** 40, 1.5, float("inf"), 1 + 2j, "héllo", b"\x00\xff",
                                   [1, [2, (3, "a")]], {1: {"k": [None]}}, {1, 2}, frozenset({"x"}), ()])
def test_plain_values_survive_the_round_trip(value):
    back = decode_value(encode_value(value))
    assert back == value and type(back) is type(value)


def test_nan_round_trips_as_nan():
    back = decode_value(encode_value(float("nan")))
    assert back != back


def test_subclasses_and_objects_are_not_plain_data():
    class Sneaky(int):
        def __eq__(self, other):
            return True

    for value in (Sneaky(1), object(), [Sneaky(2)], {"k": object()}):
        with pytest.raises(TypeError):
            encode_value(value)


@pytest.mark.parametrize("bad", [["i"], ["zz", 1], "i", ["l", "notalist"], ["d", [[["n"]]]], ["b", 1]])
def test_malformed_values_are_rejected(bad):
    with pytest.raises(ValueError):
        decode_value(bad)


# ---------------------------------------------------------------------------------------------------
# Grading
# ---------------------------------------------------------------------------------------------------
def test_assert_tests_give_per_test_outcomes():
    result = run_code_tests(DOUBLE, tests=["assert f(2) == 4", "assert f(3) == 7", "x = f(5)\nassert x == 10",
                                           "assert sorted([f(1), f(0)]) == [0, 2]", "assert f(None) == 0"])
    assert isinstance(result, CodeRunResult)
    assert [o.passed for o in result.outcomes] == [True, False, True, True, False]
    assert result.outcomes[1].detail == "wrong answer"
    assert "TypeError" in result.outcomes[4].detail
    assert result.pass_fraction == pytest.approx(0.6) and not result.all_passed


def test_one_failing_test_does_not_stop_the_next():
    code = "def f(x):\n    if x == 1:\n        raise ValueError('boom')\n    return x\n"
    result = run_code_tests(code, tests=["assert f(1) == 1", "assert f(2) == 2"])
    assert [o.passed for o in result.outcomes] == [False, True]
    assert "ValueError: boom" in result.outcomes[0].detail


def test_a_slow_test_times_out_alone():
    code = "import time\ndef f(x):\n    if x:\n        time.sleep(30)\n    return x\n"
    result = run_code_tests(code, tests=["assert f(1) == 1", "assert f(0) == 0"], timeout_s=0.5)
    assert [o.detail for o in result.outcomes] == ["timeout", "passed"]


def test_solution_that_fails_to_load_fails_every_test():
    result = run_code_tests("def f(x):\n    return (\n", tests=["assert f(1) == 1", "assert True"])
    assert [o.passed for o in result.outcomes] == [False, False]
    assert "SyntaxError" in result.outcomes[0].detail


def test_io_cases_compare_stdout():
    code = "n = int(input())\nprint(n * n)\n"
    result = run_code_tests(code, io=[{"stdin": "3\n", "stdout": "9\n"}, {"stdin": "4", "stdout": "15"},
                                      {"stdin": "x", "stdout": "1"}, {"stdin": "5", "stdout": "25   \n\n"}])
    assert [o.passed for o in result.outcomes] == [True, False, False, True]
    assert result.outcomes[1].detail == "wrong answer"
    assert "exit status 1" in result.outcomes[2].detail and "ValueError" in result.outcomes[2].detail


def test_io_nonzero_exit_with_right_output_fails():
    result = run_code_tests("print(9)\nraise SystemExit(3)\n", io=[{"stdin": "", "stdout": "9"}])
    assert not result.outcomes[0].passed and "exit status 3" in result.outcomes[0].detail


@pytest.mark.parametrize("got, expected, mode, same", [("1 2\n3", "1 2 3", "tokens", True),
                                                      ("1 2\n3", "1 2 3", "lines", False),
                                                      ("a \r\nb\n\n", "a\nb", "lines", True),
                                                      ("a\n", "a", "exact", False)])
def test_output_comparison_modes(got, expected, mode, same):
    assert outputs_match(got, expected, mode) is same


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="exactly one of"):
        run_code_tests(DOUBLE)
    with pytest.raises(ValueError, match="io case #0"):
        run_code_tests(DOUBLE, io=[{"stdin": "1"}])
    with pytest.raises(ValueError, match="compare must be one of"):
        run_code_tests(DOUBLE, tests=["assert f(1) == 2"], compare="fuzzy")


def test_extract_code_takes_the_last_python_block():
    text = "First try:\n```python\nprint(1)\n```\nBetter:\n```py\nprint(2)\n```\n"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("print(3)") == "print(3)"
    assert extract_code("print(3)", "last_block") == ""
    with pytest.raises(ValueError, match="extract must be one of"):
        extract_code("x", "first")


# ---------------------------------------------------------------------------------------------------
# The registered reward
# ---------------------------------------------------------------------------------------------------
def test_code_tests_reward_is_registered_with_its_parameters():
    entry = get("reward", "code_tests")
    reward = build("reward", "code_tests", {"timeout_s": 2.0, "all_or_nothing": False})
    completion = "```python\ndef f(x):\n    return x + 1\n```"
    assert entry.kind == "reward"
    assert reward("p", completion, {"tests": ["assert f(1) == 2", "assert f(2) == 4"]}) == 0.5
    strict = build("reward", "code_tests", {"all_or_nothing": True})
    assert strict("p", completion, {"tests": ["assert f(1) == 2", "assert f(2) == 4"]}) == 0.0
    assert reward("p", completion, {"tests": '["assert f(1) == 2"]'}) == 1.0  # JSON text column
    assert reward("p", "print(int(input()) + 1)", {"io": [{"stdin": "1", "stdout": "2"}]}) == 1.0


def test_code_tests_reward_without_code_scores_zero_and_without_tests_names_the_column():
    reward = build("reward", "code_tests")
    assert reward("p", "```python\n```", {"tests": ["assert True"]}) == 0.0
    with pytest.raises(KeyError, match="'tests' column"):
        reward("p", "print(1)", {"answer": "1"})


def test_sandbox_that_cannot_start_gives_none_not_zero(monkeypatch):
    import policylab.rewards.code_sandbox.reward as reward_module
    from policylab.rewards.code_sandbox.process import SandboxResult

    failed = SandboxResult(returncode=97, stdout=b"", stderr=b"", setup_error="unshare: Operation not permitted")
    monkeypatch.setattr(reward_module, "run_python", lambda *a, **k: failed)
    assert build("reward", "code_tests")("p", DOUBLE, {"tests": ["assert f(1) == 2"]}) is None
