"""Agent episodes through the training stages: rollout-level rewards (env_return, env_success), GRPO/RLOO
over trajectory returns, the stop string of tool calls, and a 3-step run with its metrics and samples."""

from __future__ import annotations

import json

import pytest
import torch

import policylab
from policylab import models, registry
from policylab.config import Component
from policylab.interfaces import Sampling
from policylab.rewards.combine import RewardCombiner
from policylab.rollout.agent import AgentEngine
from tests.test_agent_engine import ROWS


@pytest.fixture(scope="module")
def episodes(tiny_arith_model):
    model, tok = models.load(tiny_arith_model)
    engine = AgentEngine(max_turns=3, reward="dense")
    engine.bind(model, tok)
    torch.manual_seed(1)
    return engine.generate(ROWS, Sampling(group_size=3, temperature=1.0, max_new_tokens=6))


def test_rollout_level_rewards_read_the_engine_fields(episodes):
    combiner = RewardCombiner([Component(name="env_success", weight=0.0), Component(name="env_return")])
    total, parts = combiner(episodes.prompts, episodes.completions, episodes.rows, rollouts=episodes)
    assert torch.equal(total, episodes.extras["env_return"])
    assert torch.equal(parts["accuracy"], episodes.extras["env_success"])  # the first reward: success
    with pytest.raises(ValueError, match="reads the rollout batch"):
        combiner(episodes.prompts, episodes.completions, episodes.rows)


def test_a_rollout_reward_without_the_agent_engine_fails_its_samples_not_the_run(episodes):
    plain = episodes.with_(extras={})
    with pytest.warns(UserWarning, match="'agent' rollout engine writes"):
        total, _ = RewardCombiner([Component(name="env_return")])(plain.prompts, plain.completions, plain.rows,
                                                                   rollouts=plain)
    assert torch.isnan(total).all()


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_group_advantages_work_over_trajectory_returns(episodes, name):
    batch = episodes.with_(rewards=episodes.extras["env_return"].clone())
    adv = registry.build("advantage", name, {})(batch)
    for g in batch.group.unique():
        r = batch.rewards[batch.group == g]
        a = adv[batch.group == g]
        assert torch.allclose(a.sum(), torch.tensor(0.0), atol=1e-5)  # a group baseline
        order_r, order_a = torch.argsort(r), torch.argsort(a)
        if r.unique().numel() == r.numel():
            assert torch.equal(order_r, order_a)  # a higher return never gets a lower advantage


def test_a_tool_call_close_tag_ends_the_turn(tiny_arith_model):
    model, tok = models.load(tiny_arith_model)
    engine = AgentEngine(stop_strings=["</tool_call>"])
    engine.bind(model, tok)
    stop = engine._stop_check()
    text = 'x<tool_call>{"a": 1}</tool_call>'
    ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
    n = ids.shape[1]
    assert stop(torch.tensor([0]), n - 1, ids).tolist() == [True]
    assert stop(torch.tensor([0]), n - 2, ids).tolist() == [False]  # one character short of the tag


def test_agent_recipe_trains_and_logs_whole_conversations(tmp_path, tiny_arith_model):
    run = policylab.train("agent_text_game", run_dir=tmp_path / "run", model="tiny-arith", steps=2,
                          **{"rollout.group_size": 2, "train.prompts_per_step": 2, "train.eval_size": 4,
                             "train.progress": False, "optimizer.lr": 1e-4})
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert len(steps) == 2
    for key in ("agent/turns_mean", "agent/invalid_action_rate", "agent/tool_calls_mean", "agent/format_error_rate",
                "agent/truncation_rate", "agent/success_rate", "agent/observation_frac", "agent/logp_drift_max"):
        assert key in steps[0], key
    assert steps[0]["agent/logp_drift_max"] < 1e-3
    sample = json.loads((run / "samples.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in sample["conversation"][:2]] == ["system", "user"]
    assert sample["termination"] in ("done", "max_turns", "invalid_action", "context_budget")


def test_cli_lists_environments_and_env_switches_a_single_turn_recipe(capsys, tmp_path, tiny_arith_model):
    from policylab import cli

    assert cli.main(["environments", "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed["text_game"]["reward"] == "cumulative" and "rooms=2" in listed["text_game"]["parameters"]
    assert cli.env_overrides("grpo", "text_game", own_rewards=False) == {
        "task.name": "environment", "task.environment": "text_game", "task.params": {},
        "rollout.engine": {"name": "agent"}, "rewards": [{"name": "env_return"}]}
    assert "rewards" not in cli.env_overrides("agent_text_game", "tool_math", own_rewards=False)
    with pytest.raises(registry.RegistryError, match="unknown environment 'text_gam'"):
        cli.env_overrides("grpo", "text_gam", own_rewards=False)
    code = cli.main(["train", "grpo", "--env", "text_game", "--model", "tiny-arith", "--steps", "1",
                     "task.params.prompt_style=brief", "rollout.group_size=2", "train.prompts_per_step=2",
                     "train.eval_size=2", "rollout.max_new_tokens=6", "train.progress=false",
                     "--run-dir", str(tmp_path / "run")])
    assert code == 0
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "environment: text_game" in config and "name: agent" in config and "env_return" in config


def test_a_user_class_trains_through_env_with_its_own_rows(tmp_path, tiny_arith_model):
    from policylab import cli

    (tmp_path / "vault.py").write_text(
        "class Vault:\n"
        "    def reset(self, code, **_):\n"
        "        self.code = code\n"
        "    def guess(self, value: int) -> str:\n"
        '        """Try a code."""\n'
        '        return "open" if value == self.code else "no"\n'
        "    def reward(self, answer):\n"
        "        return float(answer.strip() == str(self.code))\n")
    rows = json.dumps([{"prompt": f"{a} + 1=", "code": a + 1} for a in range(4)])
    code = cli.main(["train", "grpo", "--env", f"{tmp_path}/vault.py:Vault", "--model", "tiny-arith", "--steps", "1",
                     f"task.rows={rows}", "task.eval_size=0", "rollout.group_size=2", "train.prompts_per_step=2",
                     "train.eval_size=0", "rollout.max_new_tokens=6", "train.progress=false",
                     "--run-dir", str(tmp_path / "run")])
    assert code == 0  # the tool schema outgrows the tiny model's 256 positions: a warning, not a crash
    assert "vault.py:Vault" in (tmp_path / "run" / "config.yaml").read_text()
    sample = json.loads((tmp_path / "run" / "samples.jsonl").read_text().splitlines()[0])
    assert '"name": "guess"' in sample["conversation"][0]["content"] and sample["termination"] == "context_budget"
