"""Hand-computed numbers of the advantage estimators the anchors ship and policylab lacked (issue 15 §10): GPG, MaxRL,
OPO, the Optimal Token Baseline (and its tool-integrated form) with its ``sum_pi_squared`` annotator, verl's
grpo_passk, Pass@k Training and GDPO. Each is checked against its anchor's documented formula (verl core_algos,
prime-rl docs/algorithms.md, TRL's GDPO docs); the shared invariances are in test_component_properties.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from policylab import registry
from policylab.testing import make_rollouts


def adv(name, batch, **params):
    return registry.build("advantage", name, params)(batch)


def close(x, expected, tol=1e-5):
    return torch.allclose(torch.as_tensor(x).float(), torch.as_tensor(expected, dtype=torch.float32), atol=tol, rtol=tol)


# -- GPG ------------------------------------------------------------------------------------------------------


def test_gpg_scales_centred_rewards_by_the_share_of_informative_completions():
    # group 0 [1,0,1,0] centred +-0.5; group 1 all correct -> 0. B = 8, B_eff = 4: alpha = 2
    batch = make_rollouts([1, 0, 1, 0, 1, 1, 1, 1], group=[0, 0, 0, 0, 1, 1, 1, 1])
    assert close(adv("gpg", batch), [1, -1, 1, -1, 0, 0, 0, 0])
    # F_norm = group std (unbiased, sqrt(1/3)): 0.5 / 0.57735 * 2 = 1.73205
    assert close(adv("gpg", batch, scale="group"), [1.7320508, -1.7320508] * 2 + [0] * 4)
    # nothing informative: alpha = 1, all zero; a failed reward counts in B but not in B_eff
    assert close(adv("gpg", make_rollouts([1, 1], group=[0, 0])), [0, 0])
    assert close(adv("gpg", make_rollouts([1, 0, float("nan")], group=[0, 0, 0])), [0.75, -0.75, 0])  # 0.5 * 3/2


# -- MaxRL (prime-rl: "reward minus group mean, divided by group mean when positive") ------------------------


def test_maxrl_divides_by_the_group_pass_rate():
    batch = make_rollouts([1, 0, 0, 0, 1, 1, 0, 0, 0, 0], group=[0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    # p = 0.25 -> (1 - .25)/.25 = 3, -1; p = 0.5 -> 1, -1; p = 0 -> 0
    assert close(adv("maxrl", batch), [3, -1, -1, -1, 1, 1, -1, -1, 0, 0])
    # a non-positive mean is not divided by: [-1, 0] mean -0.5 -> [-0.5, 0.5]
    assert close(adv("maxrl", make_rollouts([-1, 0], group=[0, 0])), [-0.5, 0.5])
    # the 1/p weighting is what distinguishes it from Dr. GRPO (same numerator)
    assert close(adv("dr_grpo", batch)[:4], [0.75, -0.25, -0.25, -0.25])


# -- OPO (verl: baseline = sum(len_i * score_i) / sum(len_i) per group) -----------------------------------


def test_opo_uses_the_length_weighted_baseline():
    batch = make_rollouts([1, 0, 5], group=[0, 0, 1], lengths=[2, 4, 3])
    # b = (2*1 + 4*0) / 6 = 1/3 (GRPO's mean would be 1/2); a singleton keeps its reward (b = 0)
    assert close(adv("opo", batch), [2 / 3, -1 / 3, 5])
    # a failed reward is left out of b and gets 0
    batch = make_rollouts([1, float("nan"), 0], group=[0, 0, 0], lengths=[2, 3, 4])
    assert close(adv("opo", batch), [2 / 3, 0, -1 / 3])
    # equal lengths: the plain group mean (Dr. GRPO)
    batch = make_rollouts([1, 0, 0, 1], group=[0, 0, 0, 0], lengths=[3, 3, 3, 3])
    assert close(adv("opo", batch), adv("dr_grpo", batch))


# -- Optimal Token Baseline (verl: B_t = sum G_t W_t / sum W_t, W_t = cumsum(1 - 2 pi + sum pi^2)) ----------


def otb_batch(rewards, pis, sum_sq, lengths, group, width=None, mask=None):
    width = width or max(lengths)
    pad = [(p + [0.5] * width)[:width] for p in pis]
    sq = [(s + [0.0] * width)[:width] for s in sum_sq]
    batch = make_rollouts(rewards, group=group, lengths=lengths, width=width,
                          behavior_logp=torch.log(torch.tensor(pad)), extras={"sum_pi_squared": torch.tensor(sq)})
    if mask is not None:
        batch.completion_mask = torch.tensor(mask, dtype=torch.float32)
    return batch


def test_optimal_token_baseline_by_hand():
    # row 0: pi = [.5, .5], sum pi^2 = [.5, .5] -> w = .5 each, W = [.5, 1]; row 1: pi = .9, sum pi^2 = .82 -> W = .02
    batch = otb_batch([1, 0], [[0.5, 0.5], [0.9]], [[0.5, 0.5], [0.82]], [2, 1], [0, 0])
    # B_0 = (1 * .5 + 0 * .02) / .52 = 0.961538: the high-energy path dominates the baseline
    # position 1: only row 0 is alive -> zero tail (its baseline 0, A = its return)
    a = adv("optimal_token_baseline", batch)
    assert a.shape == (2, 2)
    assert close(a, [[1 - 0.9615385, 1.0], [-0.9615385, 0.0]])
    a = adv("optimal_token_baseline", batch, zero_tail=False)
    assert close(a, [[1 - 0.9615385, 0.0], [-0.9615385, 0.0]])


def test_optimal_token_baseline_reduces_to_the_group_mean_on_equal_paths():
    # same pi and sum pi^2 everywhere and equal lengths: W equal across rows, B_t = the group mean (Dr. GRPO)
    batch = otb_batch([1, 0, 0, 1, 1, 1], [[0.3, 0.6]] * 6, [[0.4, 0.5]] * 6, [2] * 6, [0, 0, 0, 0, 1, 1])
    expected = adv("dr_grpo", batch)[:, None].expand(6, 2)
    assert close(adv("optimal_token_baseline", batch), expected)
    assert close(adv("tir_optimal_token_baseline", batch), expected)


def test_tir_optimal_token_baseline_aligns_trained_tokens_across_tool_gaps():
    # row 0 has a tool token (mask 0) at position 1; equal path weights. TIR: compact positions [0, 1] in both rows,
    # so B = the group mean at each: A = r - 0.5. Plain OTB at absolute position 2 sees row 0 alone (zero tail off).
    mask = [[1, 0, 1], [1, 1, 0]]
    batch = otb_batch([1, 0], [[0.5] * 3, [0.5] * 3], [[0.5] * 3, [0.5] * 3], [3, 3], [0, 0], mask=mask)
    assert close(adv("tir_optimal_token_baseline", batch, zero_tail=False), [[0.5, 0, 0.5], [-0.5, -0.5, 0]])
    assert close(adv("optimal_token_baseline", batch, zero_tail=False), [[0.5, 0, 0.0], [-0.5, 0.0, 0]])


def test_optimal_token_baseline_names_its_missing_field():
    batch = make_rollouts([1, 0], group=[0, 0], lengths=[1, 1], behavior_logp=torch.full((2, 1), -0.5))
    with pytest.raises(ValueError, match="sum_pi_squared"):
        adv("optimal_token_baseline", batch)


def test_sum_pi_squared_annotator_is_a_collision_probability():
    # sum_v pi^2 = exp(-H_2) with H_2 (Renyi-2) <= Shannon H: sum pi^2 >= exp(-H), where H comes from the loop's
    # scorer (a separate code path); also sum pi^2 >= pi(sampled)^2, <= 1, and 0 on padding
    from policylab import models
    from policylab.testing import make_context

    tok = models.tiny_tokenizer()
    policy = models.tiny_model(tok, hidden_size=8, intermediate_size=16).eval()
    ctx = make_context(policy, tok)
    batch = make_rollouts([1, 0, 1], group=[0, 0, 0], lengths=[4, 2, 3], width=5, vocab=len(tok), prompt_len=3)
    values = registry.build("annotator", "sum_pi_squared").annotate(batch, ctx)["sum_pi_squared"]
    scored = ctx.score(batch)
    mask = batch.completion_mask > 0
    assert values.shape == batch.completion_mask.shape and torch.all(values[~mask] == 0)
    assert torch.all(values[mask] <= 1 + 1e-6)
    assert torch.all(values[mask] >= torch.exp(-scored.entropy[mask]) - 1e-5)
    assert torch.all(values[mask] >= torch.exp(scored.logp[mask]) ** 2 - 1e-6)


# -- grpo_passk (verl: only the best response gets r_max - r_second_max, / std when normalising) -------------


def test_grpo_passk_credits_only_the_best_response():
    batch = make_rollouts([0.2, 0.9, 0.5, 0.4, 1, 1, 0, 0], group=[0, 0, 0, 0, 1, 1, 1, 1])
    # margin 0.4, group std (unbiased) 0.294392 -> 1.358732; the tied group gets nothing
    assert close(adv("grpo_passk", batch), [0, 1.3587324, 0, 0, 0, 0, 0, 0])
    assert close(adv("grpo_passk", batch, scale="none"), [0, 0.4, 0, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="at least 2 completions"):
        adv("grpo_passk", make_rollouts([1, 0, 1], group=[0, 0, 1]))


# -- Pass@k Training (arXiv:2508.10751 analytical advantages) -----------------------------------------------


def test_passk_training_by_hand():
    batch = make_rollouts([1, 0, 0, 0], group=[0, 0, 0, 0])
    # N = 4, 1 correct, k = 2: R = 1 - C(3,2)/C(4,2) = 0.5, sigma = 0.5; A+ = 1, A- = (0.5 - C(2,1)/C(3,1)) / 0.5
    assert close(adv("passk_training", batch, k=2), [1, -1 / 3, -1 / 3, -1 / 3])
    # k = 1 is GRPO with the population std: (1 - .25)/sqrt(.1875), -.25/sqrt(.1875)
    assert close(adv("passk_training", batch, k=1), [1.7320508, -0.5773503, -0.5773503, -0.5773503])
    # k = N: a group with any correct answer has pass@k = 1 -> sigma 0 -> no signal
    assert close(adv("passk_training", batch, k=4), [0, 0, 0, 0])
    with pytest.raises(ValueError, match="k=5 exceeds"):
        adv("passk_training", batch, k=5)


# -- GDPO (TRL docs: A_n group-normalised per reward, A = sum w_n A_n, then batch-normalised) ----------------


def gdpo_batch(a, b, group):
    total = [x + y for x, y in zip(a, b)]
    return make_rollouts(total, group=group, reward_components={"correct": a, "format": b, "accuracy": a})


def test_gdpo_keeps_reward_combinations_apart_that_grpo_collapses():
    # group 0: both rewards [0, 1] -> sum [0, 2]; group 1: only the first [0, 1] -> sum [0, 1]. GRPO gives both
    # groups +-0.7071; GDPO: [-1.4142, 1.4142, -0.7071, 0.7071] before, / batch std 1.29099 after
    batch = gdpo_batch([0, 1, 0, 1], [0, 1, 0, 0], [0, 0, 1, 1])
    assert close(adv("grpo", batch), [-0.7071068, 0.7071068, -0.7071068, 0.7071068])
    assert close(adv("gdpo", batch), [-1.0954451, 1.0954451, -0.5477226, 0.5477226])
    # weights scale a reward's share before the batch normalisation
    weighted = adv("gdpo", batch, weights={"format": 0.0})
    assert close(weighted, [-0.8660254, 0.8660254, -0.8660254, 0.8660254])


def test_gdpo_with_one_reward_is_grpo_then_batch_whitening():
    batch = make_rollouts([1, 0, 0, 1, 1, 0], group=[0, 0, 0, 1, 1, 1], reward_components={"correct": [1, 0, 0, 1, 1, 0]})
    g = adv("grpo", batch).double()
    assert close(adv("gdpo", batch), ((g - g.mean()) / (g.std() + 1e-6)).tolist())


def test_gdpo_names_a_missing_reward_and_a_stray_weight():
    batch = gdpo_batch([0, 1], [0, 1], [0, 0])
    with pytest.raises(KeyError, match="length"):
        adv("gdpo", batch, rewards=["correct", "length"])
    with pytest.raises(KeyError, match="accuracy"):
        adv("gdpo", batch, weights={"accuracy": 1.0})
