"""Rewards that misbehave cost one sample, never the run: non-finite values and hanging functions are counted
failures (issue 12, deliverable 3)."""

import json
import math
import threading
import time

import pytest
import torch

import policylab
from policylab import registry
from policylab.config import load_recipe
from policylab.registry import register
from policylab.rewards import timeout as reward_timeout
from policylab.rewards.combine import RewardCombiner
from policylab.testing import make_rollouts
from tests.conftest import TINY_RUN

BAD = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan, "1e39": 1e39, "big int": 10**400}


@register("reward", "_test_value_from_completion")
def value_from_completion(prompt, completion, row):
    """The completion names the value: one of BAD's keys, or a number."""
    return BAD[completion] if completion in BAD else float(completion)


@register("reward", "_test_sleeps_on_hang")
def sleeps_on_hang(prompt, completion, row, *, seconds: float = 30.0):
    if completion == "hang":
        time.sleep(seconds)
    return 1.0


@register("reward", "_test_spins_on_hang")
def spins_on_hang(prompt, completion, row):
    """A pure-Python infinite loop that also swallows ordinary exceptions."""
    if completion == "hang":
        while True:
            try:
                sum(range(1000))
            except Exception:  # noqa: BLE001 - a reward written this way must not defeat the deadline
                pass
    return 1.0


def combiner(*rewards, timeout_s=0.0):
    return RewardCombiner(load_recipe("grpo", {"rewards": list(rewards)}).rewards, timeout_s=timeout_s)


def test_non_finite_rewards_are_failures_and_do_not_zero_the_group():
    c = combiner({"name": "_test_value_from_completion"})
    completions = ["1", "0", "inf", "-inf", "nan", "1e39", "big int", "1"]
    with pytest.warns(UserWarning, match="not a finite float32; counted as failed"):
        total, parts = c([""] * 8, completions, [{}] * 8)
    assert total[:2].tolist() == [1.0, 0.0] and total[7] == 1.0
    assert torch.isnan(total[2:7]).all()  # before: inf, -inf and 1e39 (inf in float32) stayed in the total
    assert c.last_metrics()["reward/nonfinite"] == 4  # inf, -inf, 1e39, 10**400 (NaN was a failure already)
    # the group's advantages: the finite samples still get their GRPO values (before: inf made them all 0/NaN)
    adv = registry.build("advantage", "grpo")(make_rollouts(total.tolist(), group=[0] * 8))
    finite = torch.tensor([1.0, 0.0, 1.0])
    expected = (finite - finite.mean()) / (finite.std() + 1e-6)
    assert torch.allclose(adv[[0, 1, 7]], expected, atol=1e-4)
    assert (adv[2:7] == 0).all()


def test_a_weighted_total_past_float32_fails_the_sample():
    c = combiner({"name": "_test_value_from_completion", "weight": 10.0})
    total, _ = c(["", ""], ["3e38", "1"], [{}, {}])
    assert math.isnan(total[0]) and total[1] == 10.0


def test_a_run_with_infinite_rewards_logs_strict_json_and_counts_them(tmp_path, tiny_arith_model):
    @register("reward", "_test_inf_on_every_4th")
    def inf_every_4th(prompt, completion, row, _calls=[0]):
        _calls[0] += 1
        return math.inf if _calls[0] % 4 == 0 else 0.0

    run = policylab.train("grpo", run_dir=tmp_path / "run", **{
        **TINY_RUN, "train.steps": 2, "train.eval_size": 0,
        "rewards": [{"name": "numeric_answer"}, {"name": "_test_inf_on_every_4th", "weight": 0.1}]})
    text = (run / "metrics.jsonl").read_text()
    assert "Infinity" not in text and "NaN" not in text
    steps = [json.loads(line) for line in text.splitlines()]
    assert [s["reward/failed"] for s in steps] == [4.0, 4.0] and [s["reward/nonfinite"] for s in steps] == [4.0, 4.0]
    assert all(math.isfinite(s["reward/max"]) for s in steps)


def test_a_hanging_reward_times_out_as_a_counted_failure():
    c = combiner({"name": "_test_sleeps_on_hang"}, {"name": "_test_spins_on_hang"}, timeout_s=0.3)
    start = time.monotonic()
    with pytest.warns(UserWarning, match="did not return within 0.3 s"):
        total, parts = c(["", "", ""], ["ok", "hang", "ok"], [{}] * 3)
    assert time.monotonic() - start < 5  # two deadlines, not 30 s of sleep or an endless loop
    assert total[0] == 2.0 and total[2] == 2.0 and math.isnan(total[1])
    assert c.last_metrics()["reward/timeouts"] == 2
    assert all(not t.is_alive() for ts in reward_timeout._abandoned.values() for t in ts)  # nothing left running


def test_outside_the_main_thread_the_deadline_still_holds_and_abandoned_calls_are_bounded():
    c = combiner({"name": "_test_sleeps_on_hang", "seconds": 1.5}, timeout_s=0.2)
    out = {}

    def score(key, completions):
        out[key] = c([""] * len(completions), completions, [{}] * len(completions))[0]

    start = time.monotonic()
    with pytest.warns(UserWarning):
        worker = threading.Thread(target=score, args=("first", ["hang", "hang", "hang", "ok"]))
        worker.start()
        worker.join(10)
    # two calls wait their 0.2 s deadline and keep sleeping in the background; while those two are alive the
    # reward's further calls fail at once (a bound on abandoned threads), even the one that would not hang
    assert time.monotonic() - start < 1.2
    assert torch.isnan(out["first"]).all() and c.last_metrics()["reward/timeouts"] == 4
    time.sleep(1.5)  # the abandoned calls end; the reward works again
    worker = threading.Thread(target=score, args=("later", ["ok"]))
    worker.start()
    worker.join(10)
    assert out["later"].tolist() == [1.0]


def test_a_run_goes_on_past_a_hanging_reward(tmp_path, tiny_arith_model):
    @register("reward", "_test_hangs_on_first_call")
    def hangs_once(prompt, completion, row, _calls=[0]):
        _calls[0] += 1
        if _calls[0] == 1:
            time.sleep(600)
        return 0.0

    start = time.monotonic()
    run = policylab.train("grpo", run_dir=tmp_path / "run", **{
        **TINY_RUN, "train.steps": 2, "train.eval_size": 0, "train.reward_timeout_s": 0.5,
        "rewards": [{"name": "numeric_answer"}, {"name": "_test_hangs_on_first_call", "weight": 0.0}]})
    assert time.monotonic() - start < 120
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["reward/timeouts"] for s in steps] == [1.0, 0.0] and steps[0]["reward/failed"] >= 1.0
