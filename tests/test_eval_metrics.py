"""Property tests of data_agents_eval.md Part E (E1-E7) and of the arena's interval statistics."""

import math
from fractions import Fraction

import pytest
import torch

from policylab.eval import metrics as M
from policylab.eval import stats as S

# ------------------------------------------------------------------ E1 pass@k


def test_pass_at_k_spec_numbers():
    # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert M.pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert M.pass_at_k(4, 1, 4) == 1.0  # n - c < k
    assert M.pass_at_k(7, 0, 3) == 0.0
    assert M.pass_at_k(7, 7, 3) == 1.0


@pytest.mark.parametrize("n,c", [(1, 0), (1, 1), (5, 2), (10, 7), (16, 3)])
def test_pass_at_1_is_fraction_correct(n, c):
    assert M.pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_pass_at_k_non_decreasing_in_k():
    for n in range(1, 12):
        for c in range(n + 1):
            values = [M.pass_at_k(n, c, k) for k in range(1, n + 1)]
            assert all(b >= a - 1e-12 for a, b in zip(values, values[1:])), (n, c, values)


def test_product_form_equals_combinatorial_form_exactly():
    for n in range(1, 31):
        for c in range(n + 1):
            for k in range(1, n + 1):
                combinatorial = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert M.pass_at_k(n, c, k, exact=True) == combinatorial, (n, c, k)
                assert M.pass_at_k(n, c, k) == pytest.approx(float(combinatorial), abs=1e-12)


def test_pass_at_k_rejects_bad_input():
    with pytest.raises(ValueError, match="n >= k"):
        M.pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="num_correct"):
        M.pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="k >= 1"):
        M.pass_at_k(3, 1, 0)


def test_mean_pass_at_k_and_curve():
    # problems (n=5,c=2) and (n=5,c=0): pass@2 = (0.7 + 0)/2
    assert M.mean_pass_at_k([5, 5], [2, 0], 2) == pytest.approx(0.35)
    curve = M.pass_at_k_curve([4, 4], [1, 4], [1, 4])
    assert curve == {1: pytest.approx((0.25 + 1) / 2), 4: 1.0}
    assert M.default_ks(8) == [1, 2, 4, 8]
    assert M.default_ks(6) == [1, 2, 4, 6]
    assert M.default_ks(1) == [1]


# ------------------------------------------------------------------ E2 maj@k


def test_maj_at_k_spec_example():
    # answers [A (correct), B, B]
    clusters = M.cluster_answers(["A", "B", "B"])
    assert clusters == [0, 1, 1]
    correct = [True, False, False]
    assert M.maj_at_k(clusters, correct, 1) == pytest.approx(1 / 3)
    # subsets {A,B} x2 are ties worth 0.5 each, {B,B} is worth 0 -> (0.5+0.5+0)/3
    assert M.maj_at_k(clusters, correct, 2) == pytest.approx(1 / 3)
    assert M.maj_at_k(clusters, correct, 3) == 0.0


def test_maj_at_k_all_equal_and_correct_is_one():
    clusters = M.cluster_answers(["7"] * 5)
    for k in range(1, 6):
        assert M.maj_at_k(clusters, [True] * 5, k) == 1.0


def test_equivalent_answers_vote_together():
    clusters = M.cluster_answers(["1/2", "0.5", "3", None, ""])
    assert clusters[0] == clusters[1] != clusters[2]
    assert clusters[3] == clusters[4] == M.INVALID
    # with a two-vote cluster {1/2, 0.5} (correct) the 3-sample vote always picks it
    assert M.maj_at_k(clusters[:3], [True, True, False], 3) == 1.0


def test_invalid_cluster_can_win_but_is_never_correct():
    clusters = M.cluster_answers([None, None, "5"])
    # even if the caller flags the unparsable samples as correct, they earn nothing
    assert M.maj_at_k(clusters, [True, True, True], 3) == 0.0
    assert M.maj_at_k(clusters, [False, False, True], 1) == pytest.approx(1 / 3)


def test_maj_at_k_monte_carlo_is_seeded_and_close_to_exact():
    clusters = [0] * 6 + [1] * 4 + [2] * 2
    correct = [True] * 6 + [False] * 6
    exact = M.maj_at_k(clusters, correct, 5)
    a = M.maj_at_k(clusters, correct, 5, max_enumeration=10, monte_carlo_subsets=4000, seed=3)
    b = M.maj_at_k(clusters, correct, 5, max_enumeration=10, monte_carlo_subsets=4000, seed=3)
    assert a == b
    assert a == pytest.approx(exact, abs=0.03)


def test_maj_at_k_bad_k():
    with pytest.raises(ValueError, match="k <= n"):
        M.maj_at_k([0, 1], [True, False], 3)


# ------------------------------------------------------------------ E3 calibration


def test_confidence_auc_spec_number():
    scores = [0.9, 0.8, 0.85, 0.1]
    correct = [True, True, False, False]
    assert M.confidence_auc(scores, correct) == pytest.approx(0.75)


def test_confidence_auc_ties_and_single_class():
    assert M.confidence_auc([0.3] * 4, [True, False, True, False]) == 0.5
    assert M.confidence_auc([0.1, 0.2], [True, True]) is None
    assert M.confidence_auc([1.0, 0.0], [True, False]) == 1.0
    assert M.confidence_auc([0.0, 1.0], [True, False]) == 0.0


def test_per_question_auc_averages_mixed_questions_only():
    scores = [0.9, 0.1, 0.2, 0.8, 0.5, 0.6]
    correct = [True, False, True, False, True, True]
    groups = [0, 0, 1, 1, 2, 2]  # q0 AUC 1, q1 AUC 0, q2 all correct (skipped)
    assert M.per_question_auc(scores, correct, groups) == pytest.approx(0.5)
    assert M.per_question_auc([0.1, 0.2], [True, True], [0, 0]) is None


def test_sequence_confidence_is_masked_mean_logp():
    logp = torch.tensor([[-1.0, -3.0, -100.0], [-0.5, -0.5, -0.5], [-9.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    assert M.sequence_confidence(logp, mask).tolist() == [-2.0, -0.5, 0.0]


def test_precision_coverage_curve():
    curve = M.precision_coverage([0.9, 0.5, 0.1, 0.5], [True, False, False, True])
    assert curve == [
        (0.9, 0.25, 1.0),
        (0.5, 0.75, pytest.approx(2 / 3)),
        (0.1, 1.0, 0.5),
    ]


# ------------------------------------------------------------------ E4 entropy


def test_token_entropy_uniform_and_one_hot():
    V = 50
    assert M.token_entropy(torch.zeros(3, V)).tolist() == pytest.approx([math.log(V)] * 3, abs=1e-6)
    one_hot = torch.full((V,), -1e4)
    one_hot[7] = 0.0
    assert float(M.token_entropy(one_hot)) == pytest.approx(0.0, abs=1e-6)


def test_token_entropy_upcasts_bf16():
    torch.manual_seed(0)
    logits = (torch.randn(4, 6, 1000) * 3).to(torch.bfloat16)
    reference = torch.distributions.Categorical(logits=logits.double()).entropy()
    assert torch.allclose(M.token_entropy(logits).double(), reference, atol=1e-4)


def test_token_entropy_temperature():
    logits = torch.tensor([2.0, 0.0])
    # at temperature 2 the logits become [1, 0]
    p = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    assert float(M.token_entropy(logits, temperature=2.0)) == pytest.approx(float(-(p * p.log()).sum()), abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        M.token_entropy(logits, temperature=0)


def test_entropy_stats_ignores_padding_and_observations():
    entropy = torch.tensor([[1.0, 3.0, 99.0, 99.0], [2.0, 99.0, 4.0, 99.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]])  # 99s are padding / observation tokens
    stats = M.entropy_stats(entropy, mask, top_fraction=0.25)
    assert stats["token_mean"] == pytest.approx(2.5)  # (1+3+2+4)/4
    assert stats["seq_mean"] == pytest.approx(2.5)  # (2 + 3)/2
    assert stats["p50"] == pytest.approx(2.5)
    assert stats["top_mean"] == pytest.approx(4.0)  # top 25% of 4 tokens = the single 4.0
    assert stats["p10"] == pytest.approx(1.3)  # linear interpolation of [1,2,3,4] at 0.1
    changed = entropy.clone()
    changed[~mask.bool()] = -5.0
    assert M.entropy_stats(changed, mask, top_fraction=0.25) == stats


def test_entropy_stats_seq_mean_differs_from_token_mean():
    entropy = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    stats = M.entropy_stats(entropy, mask)
    assert stats["token_mean"] == pytest.approx(9 / 5)
    assert stats["seq_mean"] == pytest.approx(3.0)


def test_entropy_stats_empty_mask_no_nan():
    stats = M.entropy_stats(torch.ones(2, 3), torch.zeros(2, 3))
    assert all(v == 0.0 for v in stats.values())


# ------------------------------------------------------------------ E5 effective rank


def test_effective_rank_identity_rank_one_and_scale():
    torch.manual_seed(1)
    assert M.effective_rank(torch.eye(4)) == pytest.approx(4.0)
    u, v = torch.randn(6, 1), torch.randn(1, 5)
    assert M.effective_rank(u @ v) == pytest.approx(1.0, abs=1e-6)
    z = torch.randn(7, 5)
    assert M.effective_rank(3.7 * z) == pytest.approx(M.effective_rank(z))
    assert M.effective_rank(z) <= 5 + 1e-9
    assert M.effective_rank(torch.randn(3, 9)) <= 3 + 1e-9
    assert M.effective_rank(torch.zeros(3, 4)) == 0.0


def test_effective_rank_two_unequal_singular_values():
    # singular values 3 and 1 -> p = (3/4, 1/4)
    z = torch.diag(torch.tensor([3.0, 1.0]))
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert M.effective_rank(z) == pytest.approx(expected)


def test_effective_rank_center_option():
    z = torch.ones(4, 3)  # equal rows: rank 1; centred -> the zero matrix
    assert M.effective_rank(z) == pytest.approx(1.0)
    assert M.effective_rank(z, center=True) == 0.0


def test_erv_constant_er_is_zero_and_linear_growth():
    rank_one = torch.ones(10, 4) * torch.arange(1, 5)
    dyn = M.effective_rank_dynamics(rank_one, stride=2)
    assert dyn["er"] == pytest.approx(1.0) and dyn["erv"] == pytest.approx(0.0) and dyn["era"] == pytest.approx(0.0)
    # prefixes of I_6 with stride 1 have ER 1,2,...,6: first differences all 1, second all 0
    dyn = M.effective_rank_dynamics(torch.eye(6), stride=1)
    assert dyn == {"er": pytest.approx(6.0), "erv": pytest.approx(1.0), "era": pytest.approx(0.0)}


def _er_from_singular_values(sigmas):
    total = sum(sigmas)
    return math.exp(-sum(s / total * math.log(s / total) for s in sigmas))


def test_erv_is_mean_of_ema_of_first_differences():
    # rows e0, e0, e1, e2: prefix singular values [1], [sqrt2], [sqrt2, 1], [sqrt2, 1, 1]
    w = torch.zeros(4, 4)
    w[0, 0] = w[1, 0] = w[2, 1] = w[3, 2] = 1.0
    er = [1.0, 1.0, _er_from_singular_values([2**0.5, 1]), _er_from_singular_values([2**0.5, 1, 1])]
    d = [er[1] - er[0], er[2] - er[1], er[3] - er[2]]
    ema = [d[0], 0.5 * d[0] + 0.5 * d[1]]
    ema.append(0.5 * ema[1] + 0.5 * d[2])
    dyn = M.effective_rank_dynamics(w, stride=1, ema_decay=0.5)
    assert dyn["er"] == pytest.approx(er[3])
    assert dyn["erv"] == pytest.approx(sum(ema) / 3)
    assert dyn["era"] == pytest.approx(((d[1] - d[0]) + (d[2] - d[1])) / 2)
    # stride 2 keeps prefixes 2 and 4 only
    dyn = M.effective_rank_dynamics(w, stride=2)
    assert dyn["erv"] == pytest.approx(er[3] - er[1]) and dyn["era"] == 0.0


def test_hidden_rank_stats_splits_by_correctness_and_uses_mask():
    hidden = torch.zeros(2, 4, 4)
    hidden[0] = torch.eye(4)
    hidden[1, :2] = torch.eye(4)[:2]
    hidden[1, 2:] = 100.0  # padding: must not enter the second response
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    stats = M.hidden_rank_stats(hidden, mask, [True, False], stride=64)
    assert stats["er"] == pytest.approx(3.0)
    assert stats["er_correct"] == pytest.approx(4.0)
    assert stats["er_incorrect"] == pytest.approx(2.0)
    assert "er_correct" not in M.hidden_rank_stats(hidden, mask)


# ------------------------------------------------------------------ E6 length


def test_length_stats_from_mask():
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0, 0],  # 3 tokens incl. EOS
            [1, 1, 0, 0, 1, 1],  # 4 policy tokens around a 2-token observation
            [1, 1, 1, 1, 1, 1],  # hit the limit
        ]
    )
    stats = M.length_stats(mask, truncated=torch.tensor([False, False, True]), correct=[True, True, False])
    assert stats["mean"] == pytest.approx(13 / 3)
    assert stats["median"] == 4.0
    assert stats["max"] == 6.0
    assert stats["p95"] == pytest.approx(4 + 0.9 * 2)  # linear interpolation between 4 and 6
    assert stats["clip_ratio"] == pytest.approx(1 / 3)
    assert stats["mean_correct"] == pytest.approx(3.5)
    assert stats["mean_incorrect"] == pytest.approx(6.0)


def test_length_stats_single_class_and_empty():
    stats = M.length_stats(torch.ones(2, 3), correct=[False, False])
    assert "mean_correct" not in stats and stats["mean_incorrect"] == 3.0
    assert M.length_stats(torch.ones(0, 3))["mean"] == 0.0


# ------------------------------------------------------------------ E7 tools


def test_tool_productivity_spec_example():
    stats = M.tool_use_stats([2, 0, 1, 3], [True, True, True, False])
    assert stats["tool_productivity"] == pytest.approx(0.5)  # 3 correct / 6 calls
    assert stats["calls_per_question"] == pytest.approx(1.5)
    assert stats["calls_per_correct"] == pytest.approx(1.0)
    assert stats["tool_use_fraction"] == pytest.approx(0.75)


def test_tool_use_optional_fields_and_no_calls():
    stats = M.tool_use_stats(
        [2, 0], [True, False], first_call_position=[10, None], tool_errors=[1, 0], turns=[3, 1]
    )
    assert stats["first_call_position"] == 10 and stats["tool_error_rate"] == 0.5 and stats["turns"] == 2
    assert "tool_productivity" not in M.tool_use_stats([0, 0], [True, False])
    with pytest.raises(ValueError, match="call counts"):
        M.tool_use_stats([1], [True, False])


# ------------------------------------------------------------------ intervals


@pytest.mark.parametrize(
    "df,expected",  # two-sided 95% critical values from standard t tables
    [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)],
)
def test_t_quantile_table_values(df, expected):
    assert S.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert S.t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)


def test_mean_ci_by_hand():
    # values 1,2,3: mean 2, sd 1, half-width t(0.975,2) / sqrt(3)
    ci = S.mean_ci([1.0, 2.0, 3.0])
    assert ci.mean == 2.0 and ci.n == 3
    assert ci.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert S.mean_ci([5.0]).half_width is None
    assert S.mean_ci([]) is None
    assert S.mean_ci([1.0, float("nan"), 3.0]).mean == 2.0


def test_difference_ci_paired_and_welch():
    # paired: differences 1, 2, 3 -> same interval as mean_ci([1,2,3])
    ci, how = S.difference_ci({0: 2.0, 1: 4.0, 2: 6.0}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert how == "paired" and ci.mean == 2.0
    assert ci.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    # disjoint seeds: Welch with equal variances and sizes -> df = 2(n-1) = 4
    ci, how = S.difference_ci({0: 1.0, 1: 3.0, 2: 5.0}, {7: 0.0, 8: 2.0, 9: 4.0})
    assert how == "welch" and ci.mean == pytest.approx(1.0)
    se = math.sqrt(4 / 3 + 4 / 3)
    assert ci.half_width == pytest.approx(2.776445 * se, rel=1e-5)
    ci, how = S.difference_ci({0: 1.0}, {0: 0.5})
    assert how == "paired" and ci.mean == 0.5 and ci.half_width is None
    ci, how = S.difference_ci({0: 1.0, 1: 2.0}, {1: 0.5})
    assert how == "welch" and ci.mean == 1.0 and ci.half_width is None


def test_bootstrap_ci_brackets_mean_and_is_seeded():
    values = [0, 1] * 50
    lo, hi = S.bootstrap_ci(values, seed=1)
    assert lo < 0.5 < hi and (lo, hi) == S.bootstrap_ci(values, seed=1)
    assert 0.35 < lo and hi < 0.65
    assert S.bootstrap_ci([0.3] * 10) == (pytest.approx(0.3), pytest.approx(0.3))


# ------------------------------------------------------------------ evaluate() on the tiny model


@pytest.fixture(scope="module")
def tiny():
    from policylab import models
    from policylab.tasks.arithmetic import arithmetic

    model, tokenizer = models.load("tiny", seed=0)
    rows = arithmetic(low=0, high=9, train_size=10, eval_size=3, seed=5).eval
    return model, tokenizer, rows


class Recorder:
    """A reward that is a fixed function of the completion text, remembering every call."""

    def __init__(self, rule=lambda text: 1.0 if len(text) % 2 == 0 else 0.0):
        self.rule = rule
        self.calls = []

    def __call__(self, prompt, completion, row):
        self.calls.append((prompt, completion, row))
        return self.rule(completion)


def test_evaluate_groups_verdicts_by_prompt(tiny):
    from policylab.eval.evaluate import evaluate

    model, tokenizer, rows = tiny
    reward = Recorder()
    out = evaluate(model, tokenizer, rows, reward, k=4, max_new_tokens=5, er_stride=2, bootstrap_resamples=50)
    sampled, greedy = reward.calls[:12], reward.calls[12:]
    assert len(greedy) == 3 and [r for _, _, r in greedy] == rows
    per_prompt = {}
    for _, completion, row in sampled:
        per_prompt.setdefault(row["prompt"], []).append(reward.rule(completion) > 0.5)
    assert sorted(per_prompt) == sorted(r["prompt"] for r in rows) and all(len(v) == 4 for v in per_prompt.values())
    counts = [sum(v) for v in per_prompt.values()]
    assert out["accuracy"] == pytest.approx(sum(counts) / 12) == pytest.approx(out["pass@1"])
    for j in (1, 2, 4):
        by_hand = sum(1 - math.comb(4 - c, j) / math.comb(4, j) for c in counts) / 3
        assert out[f"pass@{j}"] == pytest.approx(by_hand)
        lo, hi = out[f"pass@{j}_ci"]
        assert lo <= out[f"pass@{j}"] <= hi
    assert out["greedy_accuracy"] == pytest.approx(sum(reward.rule(c) > 0.5 for _, c, _ in greedy) / 3)
    assert (out["k"], out["num_prompts"], out["num_samples"], out["max_new_tokens"]) == (4, 3, 12, 5)
    assert 0 < out["length/mean"] <= out["length/max"] <= 5
    assert 0 <= out["entropy/p10"] <= out["entropy/p50"] <= out["entropy/p90"] <= math.log(len(tokenizer)) + 1e-4
    assert out["er"] >= 1.0 - 1e-6


def test_evaluate_majority_uses_answers_and_invalid_cluster(tiny):
    from policylab.eval.evaluate import evaluate

    model, tokenizer, rows = tiny
    always = Recorder(lambda text: 1.0)
    same = evaluate(model, tokenizer, rows, always, k=3, max_new_tokens=3, answer_fn=lambda c, r: "42",
                    greedy=False, er_stride=0, bootstrap_resamples=0)
    assert same["maj@1"] == same["maj@3"] == same["pass@3"] == 1.0
    assert "greedy_accuracy" not in same and "er" not in same
    # nothing extractable: every vote goes to the invalid cluster, which is never correct
    none = evaluate(model, tokenizer, rows, always, k=3, max_new_tokens=3, answer_fn=lambda c, r: None,
                    greedy=False, er_stride=0, bootstrap_resamples=0)
    assert none["maj@3"] == 0.0 and none["pass@3"] == 1.0


def test_evaluate_failed_rewards_are_incorrect(tiny):
    from policylab.eval.evaluate import evaluate

    model, tokenizer, rows = tiny

    def broken(prompt, completion, row):
        if row is rows[0]:
            raise RuntimeError("verifier crashed")
        return None if row is rows[1] else 1.0

    out = evaluate(model, tokenizer, rows, broken, k=2, max_new_tokens=3, greedy=False, er_stride=0,
                   bootstrap_resamples=0)
    assert out["reward/failed"] == pytest.approx(2 / 3)
    assert out["accuracy"] == pytest.approx(1 / 3) and out["reward/mean"] == 1.0


def test_evaluate_is_seeded_and_keeps_the_global_rng(tiny):
    from policylab.eval.evaluate import evaluate

    model, tokenizer, rows = tiny
    state = torch.get_rng_state()
    kwargs = dict(k=2, max_new_tokens=4, greedy=False, er_stride=0, bootstrap_resamples=0, keep_samples=6)
    a = evaluate(model, tokenizer, rows, Recorder(), seed=7, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    b = evaluate(model, tokenizer, rows, Recorder(), seed=7, **kwargs)
    assert a == b
    c = evaluate(model, tokenizer, rows, Recorder(), seed=8, **kwargs)
    assert [s["completion"] for s in a["samples"]] != [s["completion"] for s in c["samples"]]


def test_score_completions_agrees_with_sampling_and_a_plain_forward(tiny):
    """Teacher-forced log-probs equal the engine's behaviour log-probs (same model, temperature 1), the
    entropy equals the full-vocabulary entropy of a plain forward, and the hidden states are those of the
    response tokens themselves (not shifted by one)."""
    from policylab.eval.evaluate import score_completions
    from policylab.interfaces import Sampling
    from policylab.rollout.hf import HFEngine

    model, tokenizer, rows = tiny
    torch.manual_seed(0)
    engine = HFEngine()
    engine.bind(model, tokenizer)
    rollouts = engine.generate(rows, Sampling(group_size=2, max_new_tokens=5))
    scores = score_completions(model, rollouts, temperature=1.0, batch_size=4)
    mask = rollouts.completion_mask.bool()
    assert torch.allclose(scores["logp"][mask], rollouts.behavior_logp[mask], atol=1e-4)
    ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], 1)
    attention = torch.cat([rollouts.prompt_mask, rollouts.completion_mask.long()], 1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attention, position_ids=positions, output_hidden_states=True)
    P, T = rollouts.prompt_ids.shape[1], rollouts.completion_ids.shape[1]
    entropy = M.token_entropy(full.logits[:, P - 1 : P - 1 + T])
    assert torch.allclose(scores["entropy"][mask], entropy[mask], atol=1e-4)
    hidden = full.hidden_states[-1][:, P : P + T]
    assert torch.allclose(scores["hidden"][mask], hidden[mask], atol=1e-4)
    hot = score_completions(model, rollouts, temperature=2.0, batch_size=4)
    assert torch.allclose(hot["logp"], scores["logp"])  # confidence stays at temperature 1 (E3)
    assert torch.allclose(hot["entropy"][mask], M.token_entropy(full.logits[:, P - 1 : P - 1 + T], 2.0)[mask], atol=1e-4)


def test_evaluate_rejects_bad_settings(tiny):
    from policylab.eval.evaluate import evaluate

    model, tokenizer, rows = tiny
    with pytest.raises(ValueError, match="at least one held-out row"):
        evaluate(model, tokenizer, [], Recorder())
    with pytest.raises(ValueError, match="k >= 1"):
        evaluate(model, tokenizer, rows, Recorder(), k=0)
    with pytest.raises(ValueError, match=r"ks must lie in \[1, k=2\]"):
        evaluate(model, tokenizer, rows, Recorder(), k=2, ks=[1, 4])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        evaluate(model, tokenizer, rows, Recorder(), temperature=0.0)


def test_main_eval_cli(tmp_path, capsys):
    import json

    from policylab.eval.evaluate import main_eval

    out = tmp_path / "eval.json"
    code = main_eval(["--model", "tiny", "-k", "2", "-n", "2", "--max-new-tokens", "3", "--er-stride", "0",
                      "--set", "task.low=0", "--set", "task.high=9", "--set", "task.train_size=10",
                      "--set", "task.eval_size=2", "--task", "arithmetic", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["k"] == 2 and result["num_prompts"] == 2 and "pass@2" in result and "greedy_accuracy" in result
    assert main_eval([]) == 2
    assert "name a run directory or a model" in capsys.readouterr().err
