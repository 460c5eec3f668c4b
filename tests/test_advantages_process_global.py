"""advantages_rewards.md B9 ReNorm (step-level process rewards) and B11 COPO (global advantage + loss blend)."""

import pytest
import torch

from policylab import registry
from policylab.algo.advantages.process_and_global import (
    answer_entropy_bits,
    copo_global_advantages,
    copo_local_weight,
    extract_answer,
    renorm_step_rewards,
    renorm_token_advantages,
)
from policylab.algo.objectives.policy_gradient import clipped_surrogate
from policylab.rollouts import PolicyOutputs
from policylab.testing import make_rollouts

ATOL = 1e-4


def make(rewards, group=None, lengths=None, completions=None):
    return make_rollouts(rewards, group=group, lengths=lengths or [2] * len(rewards), prompt_len=2,
                         completions=completions or [])


# ---------------------------------------------------------------------------------------------- B9 ReNorm


def test_renorm_t1_step_rewards():
    out = renorm_step_rewards(torch.tensor([[0.8, 0.4], [0.9, 0.1]]), torch.tensor([1.0, 0.0]))
    assert torch.allclose(out.float(), torch.tensor([[0.8, 0.4], [-0.1, -0.9]]))


def test_renorm_t2_failed_steps_never_outrank_successful_ones():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        process = torch.rand(6, 3, generator=gen)
        outcome = (torch.rand(6, generator=gen) > 0.5).float()
        values = renorm_step_rewards(process, outcome)
        if outcome.any() and (outcome == 0).any():
            assert values[outcome == 0].max() <= 0 <= values[outcome == 1].min()


def renorm_steps(batch, step_index, step_rewards, **params):
    """The multi-step ReNorm math on explicit step annotations (no stage provides them yet)."""
    r = batch.rewards
    return renorm_token_advantages(torch.as_tensor(step_rewards, dtype=torch.float32), (torch.nan_to_num(r) > 0.5).double(),
                                   torch.as_tensor(step_index), batch.completion_mask > 0, batch.group, torch.isnan(r), **params)


# row 0 success with steps [0,0,1,1]; row 1 failure with steps [0,-1(tool),1,1]
STEP_INDEX, STEP_REWARDS = [[0, 0, 1, 1], [0, -1, 1, 1]], [[0.8, 0.4], [0.9, 0.1]]


def test_renorm_t3_mean_centred_over_all_steps_of_the_group():
    adv = renorm_steps(make([1.0, 0.0], lengths=[4, 4]), STEP_INDEX, STEP_REWARDS, scale=False)
    expected = torch.tensor([[0.75, 0.75, 0.35, 0.35], [-0.15, 0.0, -0.95, -0.95]])
    assert torch.allclose(adv, expected, atol=ATOL)


def test_renorm_scaled_uses_unbiased_step_std():
    adv = renorm_steps(make([1.0, 0.0], lengths=[4, 4]), STEP_INDEX, STEP_REWARDS)
    values = torch.tensor([0.8, 0.4, -0.1, -0.9])
    z = (values - values.mean()) / (values.std() + 1e-6)
    assert torch.allclose(adv[0, [0, 2]], z[:2], atol=ATOL) and torch.allclose(adv[1, [0, 2]], z[2:], atol=ATOL)


def test_renorm_advantage_is_one_step_per_completion_so_grpo_on_the_outcome():
    adv = registry.build("advantage", "renorm")(make([1.0, 0.0, 0.0, 1.0], lengths=[2, 1, 2, 1]))
    grpo = torch.tensor([0.866024, -0.866024, -0.866024, 0.866024])
    assert torch.allclose(adv[:, 0], grpo, atol=ATOL) and adv[1, 1] == 0 and adv[3, 1] == 0


def test_renorm_edges():
    assert torch.equal(renorm_steps(make([1.0], lengths=[3]), [[0, 0, 0]], [[0.5]]), torch.zeros(1, 3))  # one step -> 0
    nan = float("nan")
    adv = renorm_steps(make([1.0, 0.0], lengths=[2, 2]), [[0, 1], [0, 1]], [[nan, 0.5], [0.5, nan]])
    assert torch.isfinite(adv).all()  # unscored steps count as p = o: r~ = [1, 0.5] and [-0.5, -1]
    assert adv[0, 0] > adv[0, 1] > 0 > adv[1, 0] > adv[1, 1]
    comp = registry.build("advantage", "renorm")
    assert torch.equal(comp(make([1.0, 1.0])), torch.zeros(2, 2))  # all equal
    assert torch.equal(comp(make([1.0, 0.0], lengths=[0, 0])), torch.zeros(2, 1))  # empty masks
    with pytest.raises(ValueError, match="step_rewards"):
        renorm_steps(make([1.0]), [[0, 0]], [[0.5], [0.5]])
    with pytest.raises(ValueError, match="step 3"):
        renorm_steps(make([1.0]), [[3, 3]], [[0.0, 0.0]])


# ---------------------------------------------------------------------------------------------- B11 COPO


def test_copo_t1_answer_entropy_and_soft_weight():
    entropy = answer_entropy_bits(["a", "a", "b", "c"], torch.zeros(4, dtype=torch.long))
    assert torch.allclose(entropy.float(), torch.full((4,), 1.5))
    w = copo_local_weight(entropy, torch.ones(4), torch.ones(4), mode="only-soft", sharpness=20.0, threshold=0.5)
    assert w[0].item() == pytest.approx(0.9999999979, abs=1e-7)  # float32


def test_copo_t3_global_advantage_and_reward_coefficient():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    group = torch.tensor([0] * 4 + [1] * 4)
    glob = copo_global_advantages(rewards, group, torch.zeros(8))
    assert torch.allclose(glob, torch.tensor([-0.707105] * 4 + [0.707105] * 4), atol=ATOL)
    # reward_coef: G=4 -> lambda_G = (1 - 1/4)/2 = 0.375; H = 1.5 -> c = 0.4375 on prompt 0
    entropy = torch.tensor([1.5] * 4 + [0.0] * 4)
    coef = copo_global_advantages(rewards, group, entropy, reward_coef=True)
    g = torch.tensor([0.5 * 0.4375, 1.0], dtype=torch.float64)
    z = ((g - g.mean()) / (g.std() + 1e-6)).float()
    assert torch.allclose(coef, z.repeat_interleave(4), atol=ATOL)


def test_copo_t2_consistent_group_is_trained_by_the_global_term_only():
    completions = ["4", "4", "4", "4", "7", "9", "7", "x"]
    batch = make([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0], group=[0] * 4 + [1] * 4, completions=completions)
    comp = registry.build("advantage", "copo")
    parts = comp.annotate(batch, None)
    assert set(parts) == {"copo_local_advantage", "copo_global_advantage", "copo_local_weight"}
    assert torch.equal(parts["copo_local_weight"][:4], torch.zeros(4))  # H = 0, A^loc = 0 -> w = 0
    adv = comp(batch.with_(extras=parts))
    assert torch.equal(adv, comp(batch))  # without the annotated parts it computes them itself
    assert torch.allclose(adv[:4], torch.full((4,), 0.707105), atol=ATOL)  # pure global: accuracies [1, 0.5]
    # group 1 answers {7,7,9,None}: H = 1.5 bits -> w ~ 1, so its advantage is its local GRPO advantage
    local = registry.build("advantage", "grpo")(batch)
    assert torch.allclose(adv[4:], local[4:], atol=1e-5)


def test_copo_modes():
    entropy = torch.tensor([1.5, 1.5, 0.0, 0.0], dtype=torch.float64)
    local = torch.tensor([0.5, 0.0, 0.3, -0.3])
    r = torch.tensor([1.0, 0.0, 1.0, 0.0])
    soft = torch.sigmoid(20 * (entropy - 0.5)).float()
    cases = {"soft-with-forced": soft * torch.tensor([1.0, 0, 1, 1]), "no-global": torch.ones(4),
             "only-global": torch.zeros(4), "only-soft": soft, "only-forced": torch.tensor([1.0, 0, 1, 1]),
             "soft-with-zero": soft * torch.tensor([1.0, 0, 1, 0])}
    for mode, expected in cases.items():
        got = copo_local_weight(entropy, local, r, mode=mode, sharpness=20.0, threshold=0.5)
        assert torch.allclose(got, expected), mode
    with pytest.raises(ValueError, match="mode"):
        copo_local_weight(entropy, local, r, mode="soft", sharpness=20.0, threshold=0.5)


def test_copo_answer_extraction():
    assert extract_answer("so the answer is 1,234.", "last_number") == "1234"
    assert extract_answer("x \\boxed{\\frac{1}{2}} y", "boxed") == "\\frac{1}{2}"
    assert extract_answer("no box", "boxed") is None
    assert extract_answer("  hi ", "text") == "hi"


def test_copo_edges():
    comp = registry.build("advantage", "copo")
    single_prompt = comp(make([1.0, 0.0], completions=["1", "2"]))
    assert torch.isfinite(single_prompt).all()  # one prompt: A^glob = 0, not NaN
    assert torch.equal(comp(make([1.0], completions=["1"])), comp(make([1.0], completions=["1"])))
    assert torch.isfinite(comp(make([1.0], completions=["1"]))).all()
    same = comp(make([1.0, 1.0, 0.0, 0.0], group=[0, 0, 1, 1], completions=["1", "1", "2", "2"]))
    assert torch.allclose(same, torch.tensor([0.707106, 0.707106, -0.707106, -0.707106]), atol=ATOL)
    failed = comp(make([1.0, float("nan"), 0.0, 1.0], group=[0, 0, 1, 1], completions=["1", "2", "3", "1"]))
    assert failed[1] == 0 and torch.isfinite(failed).all()
    with pytest.raises(ValueError, match="answer"):
        comp(make([1.0, 0.0]))  # no completions to extract answers from


def test_copo_objective_blends_two_clipped_surrogates():
    batch = make([1.0, 0.0, 1.0, 1.0], group=[0, 0, 1, 1], lengths=[2, 2, 2, 2], completions=["1", "2", "1", "1"])
    comp = registry.build("advantage", "copo", {"mode": "only-soft"})
    batch = batch.with_(extras=comp.annotate(batch, None))
    batch = batch.with_(advantages=comp(batch))
    logp = torch.log(torch.tensor([[0.5, 0.4], [0.3, 0.2], [0.6, 0.5], [0.4, 0.7]]))
    batch = batch.with_(old_logp=logp + torch.tensor([[0.5, -0.5], [0.4, -0.4], [0.3, -0.3], [-0.6, 0.6]]))
    out = PolicyOutputs(logp=logp.clone().requires_grad_())
    loss, metrics = registry.build("objective", "copo")(out, batch)
    ratio = torch.exp(logp - batch.old_logp)
    w = batch.extras["copo_local_weight"][:, None]
    local = batch.extras["copo_local_advantage"][:, None].expand(4, 2)
    glob = batch.extras["copo_global_advantage"][:, None].expand(4, 2)
    expected = (1 - w) * clipped_surrogate(ratio, glob, 0.2, 0.2, None)[0] + w * clipped_surrogate(ratio, local, 0.2, 0.2, None)[0]
    assert torch.allclose(loss, expected)
    blended, _, _ = clipped_surrogate(ratio, batch.seq_advantages(), 0.2, 0.2, None)
    assert not torch.allclose(loss, blended)  # off-policy the loss blend differs from the blended advantage
    assert "copo/global_clipfrac" in metrics


def test_copo_objective_on_policy_is_reinforce_with_the_blended_advantage():
    batch = make([1.0, 0.0, 1.0, 1.0], group=[0, 0, 1, 1], completions=["1", "2", "1", "1"])
    comp = registry.build("advantage", "copo", {"mode": "only-soft"})
    batch = batch.with_(extras=comp.annotate(batch, None))
    batch = batch.with_(advantages=comp(batch))
    logp = torch.log(torch.tensor([[0.5, 0.4], [0.3, 0.2], [0.6, 0.5], [0.4, 0.7]])).requires_grad_()
    loss, _ = registry.build("objective", "copo")(PolicyOutputs(logp=logp), batch)
    (loss * batch.completion_mask).sum().backward()
    assert torch.allclose(logp.grad, -batch.seq_advantages(), atol=1e-6)


def test_copo_objective_requires_the_advantage_parts():
    batch = make([1.0, 0.0], completions=["1", "2"]).with_(old_logp=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="copo_local_advantage"):
        registry.build("objective", "copo")(PolicyOutputs(logp=torch.zeros(2, 2)), batch)


# ---------------------------------------------------------------------------------------------- declarations


def test_recipes_chain_and_copo_objective_needs_the_copo_advantage():
    from policylab.config import load_recipe
    from policylab.train.components import build_components
    from policylab.train.stages import ChainError

    build_components(load_recipe("renorm"))
    parts = build_components(load_recipe("copo"))
    assert [(n.where, n.hook) for n in parts.plan.prepare] == [("algorithm.advantage", "annotate")]
    with pytest.raises(ChainError, match="copo_local_advantage"):
        build_components(load_recipe("copo", {"algorithm.advantage": {"name": "grpo"}}))
