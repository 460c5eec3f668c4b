"""DAPO parts: soft overlong punishment (objectives.md §1.3), the zero-variance group filter and multi-round
dynamic sampling (data_agents_eval.md A1; policylab.sampling.filters and policylab.sampling.dynamic).
"""

from __future__ import annotations

import pytest
import torch

from policylab import fields as F
from policylab import registry
from policylab.rewards.overlong import soft_overlong_penalty
from policylab.testing import make_rollouts

NAN = float("nan")


def make(rewards, group, lengths=None, width=None, **fields):
    lengths = [1] * len(rewards) if lengths is None else lengths
    width = width or max(lengths)
    return make_rollouts(rewards, group=group, lengths=lengths, width=width, truncated=[n == width for n in lengths], **fields)


# ---------------------------------------------------------------------------------------------------
# soft overlong punishment


def test_soft_overlong_spec_numbers():
    lengths = torch.tensor([16000, 16384, 18000, 20480])
    penalty = soft_overlong_penalty(lengths, max_len=20480, cache_len=4096)
    assert torch.allclose(penalty, torch.tensor([0.0, 0.0, -0.394531, -1.0]), atol=1e-6)


def test_soft_overlong_is_linear_in_the_buffer_and_scales_with_the_factor():
    lengths = torch.tensor([0, 15, 16, 17, 18, 20])
    penalty = soft_overlong_penalty(lengths, max_len=20, cache_len=4, penalty_factor=0.5)
    assert torch.allclose(penalty, torch.tensor([0.0, 0.0, 0.0, -0.125, -0.25, -0.5]))


def shaping(rollouts, **params):
    return registry.build("reward_shaping", "soft_overlong", params)(rollouts)


def test_soft_overlong_component_with_explicit_lengths():
    r = make([1.0, 1.0, 0.0], [0, 0, 0], lengths=[16000, 18000, 20480])
    delta, metrics = shaping(r, max_len=20480, cache_len=4096)
    assert torch.allclose(delta, torch.tensor([0.0, -0.394531, -1.0]), atol=1e-6)
    assert metrics["overlong/penalised_frac"] == pytest.approx(2 / 3)
    assert metrics["overlong/penalty_mean"] == pytest.approx((-0.394531 - 1.0) / 3, abs=1e-6)


def test_soft_overlong_component_defaults_to_the_run_length_and_a_20_percent_buffer():
    # max_new_tokens 20 -> cache 4 -> no penalty up to 16 tokens, -1 at 20 (DAPO's 4096 of 20480)
    r = make([1.0, 1.0, 1.0, 1.0], [0, 0, 1, 1], lengths=[10, 16, 18, 20], width=20, extras={"max_new_tokens": 20})
    delta, _ = shaping(r)
    assert torch.allclose(delta, torch.tensor([0.0, 0.0, -0.5, -1.0]))


def test_soft_overlong_without_a_length_is_a_clear_error():
    with pytest.raises(ValueError, match="max_len"):
        shaping(make([1.0], [0], lengths=[3]))


# ---------------------------------------------------------------------------------------------------
# zero-variance group filter


def keep(rollouts, **params):
    return registry.build("group_filter", "zero_variance", params)(rollouts).tolist()


def test_A1_all_correct_and_all_wrong_groups_are_dropped():
    r = make([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0], [0] * 4 + [1] * 4 + [2] * 4)
    assert keep(r) == [False, False, True]


def test_A1_a_group_of_one_is_always_kept():
    assert keep(make([1.0, 0.0, 1.0, 1.0], [0, 1, 2, 2])) == [True, True, False]


def test_filter_answers_in_sorted_group_id_order_for_non_contiguous_groups():
    # ids 9 (informative) and 2 (all wrong), interleaved: the answer is indexed like torch.unique -> [2, 9]
    r = make([1.0, 0.0, 0.0, 0.0], [9, 2, 9, 2])
    assert torch.unique(r.group).tolist() == [2, 9]
    assert keep(r) == [False, True]


def test_acc_metric_vs_score_metric():
    # partial credit: both "correct" by accuracy (reward > 0) but different scores
    r = make([0.5, 0.7, 0.5, 0.5], [0, 0, 1, 1])
    assert keep(r, metric="acc") == [False, False]
    assert keep(r, metric="score") == [True, False]


def test_dapo_plus_minus_one_rewards():
    r = make([1.0, -1.0, -1.0, -1.0, -1.0, -1.0], [0, 0, 0, 1, 1, 1])
    assert keep(r) == [True, False]


def test_acc_metric_prefers_the_accuracy_component():
    r = make([0.3, 0.3], [0, 0], reward_components={"accuracy": torch.tensor([1.0, 0.0])})
    assert keep(r, metric="acc") == [True]
    assert keep(r, metric="score") == [False]


def test_failed_rewards_do_not_make_a_group_look_informative():
    """NaN rewards are excluded (foundation contract): [1, 1, NaN] has zero advantage everywhere, so it is
    dropped; [1, 0, NaN] is informative."""
    r = make([1.0, 1.0, NAN, 1.0, 0.0, NAN, NAN], [0, 0, 0, 1, 1, 1, 2])
    assert keep(r) == [False, True, True]  # group 2: a single trajectory is always kept
    assert keep(r, metric="score") == [False, True, True]


def test_unknown_metric_is_a_clear_error():
    with pytest.raises(ValueError, match="seq_final"):
        keep(make([1.0, 0.0], [0, 0]), metric="seq_final")


# ---- data_agents_eval.md A1: multi-round dynamic sampling (written by the lead with the loop refactor) ----
from policylab.sampling.dynamic import NotEnoughInformativeGroups, collect_informative_groups  # noqa: E402
from policylab.sampling.filters import keep_nonzero_variance  # noqa: E402


def _round(rewards_per_group, offset, extras=None):
    g = len(rewards_per_group[0])
    group = (torch.arange(len(rewards_per_group)).repeat_interleave(g) + offset).tolist()
    return make_rollouts([x for grp in rewards_per_group for x in grp], group=group, lengths=[2] * len(group),
                         extras=extras)


def test_a1_two_rounds_fill_exactly_b_groups_in_order():
    rounds = [[[1, 1, 1, 1], [1, 0, 0, 0]], [[0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]]]
    batch, stats = collect_informative_groups(lambda i: _round(rounds[i], 10 * i), keep_nonzero_variance, 2, 10)
    assert batch.batch_size == 8  # exactly B*G trajectories
    assert torch.unique(batch.group).tolist() == [1, 10]  # the first informative groups, in order
    assert stats["groups/gen_rounds"] == 2


def test_a1_exhausted_rounds_raise_instead_of_training_on_nothing():
    with pytest.raises(NotEnoughInformativeGroups, match="0 of 2 prompt groups"):
        collect_informative_groups(lambda i: _round([[0, 0, 0, 0], [0, 0, 0, 0]], 10 * i), keep_nonzero_variance, 2, 1)


F.declare_field("test_dapo_row_tag", per_row=True, shape="[B]", dtype="float", owner="tests/test_dapo_parts.py",
                doc="row index within its generation round * 10 + round index")
F.declare_field("test_dapo_batch_tag", per_row=False, shape="scalar", owner="tests/test_dapo_parts.py",
                doc="one value for the whole batch")


def _tagged_round(rewards_per_group, r, *, row_tag=True):
    b = sum(len(grp) for grp in rewards_per_group)
    extras = {"test_dapo_batch_tag": 7}
    if row_tag:
        extras["test_dapo_row_tag"] = torch.arange(b, dtype=torch.float32) * 10 + r
    batch = _round(rewards_per_group, 10 * r, extras)
    return batch.with_(rows=[{"round": r, "row": i} for i in range(b)])


def test_a1_merged_rounds_keep_every_row_with_its_own_extras():
    """The old merge kept the first round's extras for the merged batch: round 0's kept rows' values (and its
    row count) for rows of every round. Each kept row must carry its own round's, own row's value."""
    rounds = [[[1, 1, 1, 1], [1, 0, 0, 0]], [[0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]]]
    batch, _ = collect_informative_groups(lambda r: _tagged_round(rounds[r], r), keep_nonzero_variance, 3, 10)
    assert torch.unique(batch.group).tolist() == [1, 10, 12] and batch.batch_size == 12
    batch.validate("dynamic sampling")
    expected = [row["row"] * 10 + row["round"] for row in batch.rows]
    assert batch.extras["test_dapo_row_tag"].tolist() == expected
    assert expected == [40, 50, 60, 70, 1, 11, 21, 31, 81, 91, 101, 111]  # rows 4-7 of round 0, 0-3 and 8-11 of round 1
    assert batch.extras["test_dapo_batch_tag"] == 7  # equal per-batch values survive


def test_a1_a_round_missing_a_per_row_field_is_an_error():
    rounds = [[[1, 1, 1, 1], [1, 0, 0, 0]], [[0, 1, 0, 0], [1, 1, 0, 0]]]
    with pytest.raises(F.FieldError, match="test_dapo_row_tag"):
        collect_informative_groups(lambda r: _tagged_round(rounds[r], r, row_tag=r == 0), keep_nonzero_variance, 3, 10)


def test_zero_variance_filter_declarations_and_dapo_recipe_chain():
    from policylab.config import load_recipe
    from policylab.interfaces import declared
    from policylab.train.components import build_components

    assert declared(registry.build("group_filter", "zero_variance"), "requires") == ("rewards", "reward_components")
    assert build_components(load_recipe("dapo")).group_filter is not None
