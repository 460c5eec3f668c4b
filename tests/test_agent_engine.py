"""The agent engine (D0): the training tensors of multi-turn episodes, token-exact.

Property tests of data_agents_eval.md D0: the mask is 1 exactly on the action spans and their separators,
0 on observations; turn ends point at separators; dense-reward placement; zero gradient at observation
positions; re-scoring a stored trajectory reproduces the behaviour log-probs within 1e-3 (packed, padded
and prompt-sharing forwards). Plus the termination reasons, truncation in parallel and failing environments.
"""

from __future__ import annotations

import math

import pytest
import torch

from policylab import models, registry
from policylab.algo.turn_rewards import dense_turn_rewards, place_turn_rewards
from policylab.environments import Environment
from policylab.interfaces import RolloutEngine, Sampling
from policylab.models.forward import policy_forward, trim
from policylab.rollout.agent import AgentEngine
from policylab.rollouts import Normaliser, PolicyOutputs

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
HERE = "tests.test_agent_engine"


class TwoTurn(Environment):
    """Two sums: the first answer gets the next question, the second ends the episode. Score +1 per exact sum."""

    reward_mode = "incremental"

    def _reset(self, row, seed):
        self.turn = 0
        return ""

    def _step(self, action):
        self.turn += 1
        right = action.strip() == ("5" if self.turn == 1 else "8")
        self.score = getattr(self, "score", 0) + right
        return "4 + 4=", self.turn == 2, float(right), {}

    def max_total_reward(self):
        return 2.0

    def success(self):
        return self.turn == 2


class Broken(TwoTurn):
    def _step(self, action):
        raise RuntimeError("the game crashed")


ROWS = [{"prompt": "2 + 3=", "environment": f"{HERE}:TwoTurn"}, {"prompt": "1 + 1=", "environment": f"{HERE}:TwoTurn"}]


@pytest.fixture(scope="module")
def warm(tiny_arith_model):
    return models.load(tiny_arith_model)


def engine_for(model, tok, **params):
    engine = AgentEngine(**params)
    engine.bind(model, tok)
    return engine


def sample(engine, rows=ROWS, g=2, temperature=1.0, max_new=6, seed=0):
    torch.manual_seed(seed)
    return engine.generate(rows, Sampling(group_size=g, temperature=temperature, max_new_tokens=max_new))


def test_the_engine_is_registered_and_declares_its_fields():
    engine = registry.build("rollout_engine", "agent", {"max_turns": 2})
    assert isinstance(engine, RolloutEngine)
    from policylab.interfaces import declared

    assert {"turn_end_positions", "turn_rewards", "final_reward", "num_turns", "tool_calls", "termination",
            "token_rewards"} <= set(declared(engine, "provides"))


@pytest.mark.parametrize("template", [None, TEMPLATE])
def test_mask_is_one_exactly_on_actions_and_separators(template, tiny_arith_model):
    model, tok = models.load(tiny_arith_model)
    tok.chat_template = template
    out = sample(engine_for(model, tok, max_turns=3), temperature=0.0)
    eos = tok.eos_token_id
    for i in range(out.batch_size):
        ids, mask = out.completion_ids[i].tolist(), out.completion_mask[i].tolist()
        ends = out.extras["turn_end_positions"][i]
        assert out.extras["termination"][i] == "done" and out.extras["num_turns"][i] == 2 == len(ends)
        assert [ids[e] for e in ends] == [eos, eos]  # turn ends point at the sampled separators
        # response = action1 (+EOS) | observation | action2 (+EOS); the observation is the template's text
        obs = tok(engine_for(model, tok).observation_text("4 + 4=", "user", ended_with_eot=True),
                  add_special_tokens=False).input_ids
        first = ends[0] + 1
        assert ids[first:first + len(obs)] == obs
        assert mask[:first] == [1.0] * first and mask[first:first + len(obs)] == [0.0] * len(obs)
        assert mask[first + len(obs):ends[1] + 1] == [1.0] * (ends[1] + 1 - first - len(obs))
        assert sum(mask) == sum(out.extras["completion_attention_mask"][i].tolist()) - len(obs)
        assert out.behavior_logp[i][torch.tensor(mask) == 0].abs().sum() == 0
    if template:
        assert out.prompts[0] == "<user>2 + 3=</s>\n<assistant>"
        assert tok.decode(obs) == "\n<user>4 + 4=</s>\n<assistant>"  # the separator was sampled, not repeated


def test_rescoring_reproduces_behaviour_logprobs_in_every_forward(warm):
    model, tok = warm
    engine = engine_for(model, tok, max_turns=3)
    out = sample(engine, temperature=1.0, g=3)
    assert engine.last_metrics["agent/logp_drift_max"] < 1e-3
    for packed, share in [(True, True), (True, False), (False, False), (False, True)]:
        scored = policy_forward(model, trim(out), temperature=1.0, packed=packed, share_prompts=share)
        mask = trim(out).completion_mask > 0
        diff = (scored.logp - trim(out).behavior_logp).abs()[mask]
        worst = float(diff.detach().max())
        assert worst < 1e-3, (packed, share, worst)


def test_without_the_real_token_mask_the_padded_forward_would_drift(warm):
    """The padded forward must attend to observations; dropping the engine's attention field breaks it (so the
    test above can fail)."""
    model, tok = warm
    out = sample(engine_for(model, tok, max_turns=3, drift_rows=0), temperature=1.0, g=2)
    extras = {k: v for k, v in out.extras.items() if k != "completion_attention_mask"}
    blind = out.with_(extras=extras)
    scored = policy_forward(model, trim(blind), temperature=1.0, packed=False)
    diff = (scored.logp - trim(blind).behavior_logp).abs()[trim(blind).completion_mask > 0]
    assert float(diff.max()) > 1e-2


def test_policy_loss_gradient_is_zero_at_observation_positions(warm):
    model, tok = warm
    out = sample(engine_for(model, tok, max_turns=3), g=2)
    out.advantages = torch.tensor([1.0, -0.5, 0.3, 2.0])
    batch = trim(out)
    logp = policy_forward(model, batch, temperature=1.0).logp.detach().requires_grad_(True)
    objective = registry.build("objective", "ppo_clip", {})
    aggregate = registry.build("aggregate", "token-mean", {})
    loss, _ = objective(PolicyOutputs(logp=logp), batch)
    aggregate(loss, batch.completion_mask, Normaliser.of(batch.completion_mask, batch.completion_ids.shape[1])).backward()
    observation = (batch.extras["completion_attention_mask"] > 0) & (batch.completion_mask == 0)
    assert observation.any() and float(logp.grad[observation].abs().max()) == 0.0
    assert float(logp.grad[batch.completion_mask > 0].abs().max()) > 0


def test_dense_reward_placement_examples():
    assert dense_turn_rewards([0, 1, 0, 1], success=True, max_total_reward=4) == [0, 0.5, 0, 0.5]
    assert dense_turn_rewards([0, 1, 0, 0], success=False, max_total_reward=4) == [0, 0.25, 0, 0]
    placed = place_turn_rewards([[1, 4, 6, 9], [2]], [[0, 0.5, 0, 0.5], [1.0]], width=8)
    assert placed[0].tolist() == [0, 0, 0, 0, 0.5, 0, 0, 0] and placed[1].tolist() == [0, 0, 1, 0, 0, 0, 0, 0]


def test_sparse_and_dense_change_only_the_rewards(warm):
    model, tok = warm
    sparse = sample(engine_for(model, tok, max_turns=3, reward="sparse"), seed=3)
    dense = sample(engine_for(model, tok, max_turns=3, reward="dense"), seed=3)
    for name in ("completion_ids", "completion_mask", "behavior_logp", "prompt_ids"):
        assert torch.equal(getattr(sparse, name), getattr(dense, name))
    assert sparse.extras["turn_end_positions"] == dense.extras["turn_end_positions"]
    for i in range(sparse.batch_size):
        ends = sparse.extras["turn_end_positions"][i]
        assert sparse.extras["turn_rewards"][i] == [0.0] * (len(ends) - 1) + [1.0]  # TwoTurn always "succeeds"
        wins = [r for r in dense.extras["turn_rewards"][i] if r > 0]
        assert math.isclose(sum(dense.extras["turn_rewards"][i]), 1.0 if wins else 0.0)
        assert float(dense.extras["token_rewards"][i].sum()) == pytest.approx(float(dense.extras["env_return"][i]))
        assert float(sparse.extras["token_rewards"][i, ends[-1]]) == 1.0


def test_a_turn_without_separator_is_invalid_and_ends_the_trajectory(warm):
    model, tok = warm
    out = sample(engine_for(model, tok, max_turns=3, drift_rows=0), max_new=1)
    assert set(out.extras["termination"]) == {"invalid_action"}
    assert out.extras["num_turns"].tolist() == [1] * 4 and out.truncated.all()


def test_the_response_budget_truncates_tokens_mask_and_turn_ends_in_parallel(warm):
    model, tok = warm
    full = sample(engine_for(model, tok, max_turns=3), temperature=0.0)
    cut = sample(engine_for(model, tok, max_turns=3, max_response_tokens=5), temperature=0.0)
    assert cut.completion_ids.shape[1] == 5
    assert torch.equal(cut.completion_ids, full.completion_ids[:, :5])
    assert torch.equal(cut.completion_mask, full.completion_mask[:, :5])
    assert torch.equal(cut.behavior_logp, full.behavior_logp[:, :5])
    for i in range(cut.batch_size):
        assert cut.extras["turn_end_positions"][i] == [e for e in full.extras["turn_end_positions"][i] if e < 5]
    assert cut.truncated.all()


def test_a_context_budget_ends_trajectories_with_their_reason(warm):
    model, tok = warm
    out = sample(engine_for(model, tok, max_turns=3, context_budget=16, drift_rows=0), temperature=0.0)
    assert set(out.extras["termination"]) == {"context_budget"}
    assert all(len(tok(p, add_special_tokens=False).input_ids) + out.completion_mask[i].sum() <= 16 + 6
               for i, p in enumerate(out.prompts))


def test_prompts_that_leave_no_room_are_warned_about(warm):
    model, tok = warm
    with pytest.warns(UserWarning, match="no trajectory took a turn.*exceed the context budget of 8 tokens"):
        out = sample(engine_for(model, tok, context_budget=8, drift_rows=0))
    assert out.completion_mask.sum() == 0 and set(out.extras["termination"]) == {"context_budget"}


def test_a_failing_environment_ends_its_trajectory_and_the_batch_goes_on(warm):
    model, tok = warm
    rows = [ROWS[0], {"prompt": "1 + 1=", "environment": f"{HERE}:Broken"}]
    out = sample(engine_for(model, tok, max_turns=3), rows=rows, temperature=0.0)
    assert out.extras["termination"] == ["done", "done", "env_error", "env_error"]
    assert torch.isnan(out.extras["env_return"][2:]).all() and not torch.isnan(out.extras["env_return"][:2]).any()
    with pytest.raises(RuntimeError, match="every trajectory of the batch failed in environment .*Broken.*the game crashed"):
        sample(engine_for(model, tok, max_turns=3), rows=rows[1:], temperature=0.0)


def test_rows_without_an_environment_are_a_clear_error(warm):
    model, tok = warm
    with pytest.raises(ValueError, match="request 0 names no environment"):
        sample(engine_for(model, tok), rows=[{"prompt": "1 + 1="}])


def test_a_drift_above_the_stop_threshold_stops_with_a_message(warm):
    model, tok = warm
    engine = engine_for(model, tok, max_turns=2, drift_stop=-1.0)
    with pytest.raises(RuntimeError, match="re-scoring .* differs from the behaviour log-probs"):
        sample(engine)


def test_metrics_cover_the_d0_log(warm):
    model, tok = warm
    engine = engine_for(model, tok, max_turns=3)
    sample(engine, temperature=0.0)
    m = engine.last_metrics
    assert m["agent/turns_mean"] == 2.0 and m["agent/success_rate"] == 1.0 and m["agent/termination/done"] == 1.0
    for key in ("agent/invalid_action_rate", "agent/tool_calls_mean", "agent/format_error_rate", "agent/truncation_rate",
                "agent/observation_frac", "agent/logp_drift_max"):
        assert key in m
    assert 0 < m["agent/observation_frac"] < 1
