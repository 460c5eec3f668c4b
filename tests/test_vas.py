"""MMR1 Variance-Aware Sampling (advantages_rewards.md D4; data_agents_eval.md A2)."""

from __future__ import annotations

import copy

import pytest
import torch

from policylab.testing import make_rollouts
from policylab.sampling.vas import (
    DIVERSITY,
    VarianceAwareSampler,
    distinct_n,
    edit_distance,
    outcome_variance_score,
    self_bleu_diversity,
)


def test_vas_t1_outcome_variance():
    assert [outcome_variance_score(p) for p in (0.0, 0.5, 1.0, 0.25)] == [0.0, 0.25, 0.0, 0.1875]


def test_vas_t2_weighted_and_uniform_counts():
    s = VarianceAwareSampler(mixture_ratio=0.5)
    s.bind(20, seed=0)
    s.update({"index": list(range(20)), "pass_rate": [0.5] * 10 + [1.0] * 10})
    s.refresh()
    batch = s.next_batch(8)
    assert len(batch) == 8 and s.last_sources.count("weighted") == 4 and s.last_sources.count("uniform") == 4
    s = VarianceAwareSampler(mixture_ratio=0.25)
    s.bind(20)
    s.next_batch(10)
    assert s.last_sources.count("weighted") == 2 and s.last_sources.count("uniform") == 8
    s = VarianceAwareSampler(mixture_ratio=0.5)
    s.bind(20)
    s.next_batch(10)
    assert s.last_sources.count("weighted") == 5


def test_vas_zero_weight_prompt_never_drawn_by_weighted_part():
    s = VarianceAwareSampler(mixture_ratio=1.0)
    s.bind(4, seed=1)
    s.update({"index": [0, 1, 2, 3], "pass_rate": [1.0, 0.5, 0.25, 0.5]})
    s.refresh()
    assert s.weights[0] == 0.0
    draws = s.next_batch(10_000)
    assert 0 not in draws and {1, 2, 3} <= set(draws)
    mixed = VarianceAwareSampler(mixture_ratio=0.5)
    mixed.bind(4, seed=1)
    mixed.load_state_dict({**copy.deepcopy(s.state_dict()), "position": 0})
    assert 0 in mixed.next_batch(40)  # still reachable through the uniform part


def test_vas_t3_distinct_3_and_diversity_sign():
    assert distinct_n([[1, 2, 3, 4], [1, 2, 3, 5]], 3) == 0.75
    same = [[1, 2, 3, 4, 5]] * 3
    different = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [5, 3, 1, 4, 2]]
    for name, fn in DIVERSITY.items():
        assert fn(same) < fn(different), name
    assert edit_distance([1, 2, 3], [1, 3]) == 1
    assert self_bleu_diversity([[1, 2]]) == 0.0 and distinct_n([[1]], 3) == 0.0


def _rollouts(group, correct, completions):
    return make_rollouts(correct, group=group, lengths=[len(c) for c in completions], prompt_len=2,
                         completion_ids=completions, reward_components={"accuracy": correct})


def test_vas_annotate_maps_groups_to_indices_and_after_step_refreshes_and_resumes():
    s = VarianceAwareSampler(update_freq=1, metrics=("learnability", "distinct_n"), weights=(1.0, 0.0))
    s.bind(6, seed=3)
    picked = s.next_batch(2)
    r = _rollouts([0, 0, 1, 1], [1.0, 0.0, 1.0, 1.0], [[1, 2, 3], [4, 5, 6], [1, 2, 3], [1, 2, 3]])
    assert s.annotate(r, None) == {}  # an internal-state refresh: it provides no field
    s.after_step({})
    assert s.pass_rate == {picked[0]: 0.5, picked[1]: 1.0}
    assert s.diversity[picked[1]]["distinct_n"] == pytest.approx(0.5)  # two identical trigrams
    assert s.weights[picked[1]] == 0.0 and s.pending == []
    twin = VarianceAwareSampler()
    twin.load_state_dict(copy.deepcopy(s.state_dict()))
    twin.metrics, twin.metric_weights = s.metrics, s.metric_weights
    assert twin.next_batch(7) == s.next_batch(7)


def test_vas_bad_parameters():
    for kw in (dict(mixture_ratio=1.5), dict(metrics=("learnability",), weights=(1.0, 2.0)), dict(metrics=("rouge",), weights=(1.0,)),
               dict(update_freq=0)):
        with pytest.raises(ValueError):
            VarianceAwareSampler(**kw)
    with pytest.raises(ValueError, match="bind"):
        VarianceAwareSampler().next_batch(2)
    with pytest.raises(ValueError, match="index"):
        VarianceAwareSampler().update({"pass_rate": [1.0]})


def test_vas_refreshes_every_update_freq_steps_from_the_loops_pass_rates_alone():
    s = VarianceAwareSampler(update_freq=2)
    s.bind(4, seed=0)
    indices = s.next_batch(2)
    s.update({"index": indices, "pass_rate": [0.5, 1.0], "step": 0})  # what the loop reports per generation round
    s.after_step({})
    assert s.weights == [0.0] * 4 and s.pending == []  # step 1 of 2: no refresh yet
    s.after_step({})
    assert s.weights[indices[0]] == pytest.approx(1.0) and s.weights[indices[1]] == 0.0


def test_vas_declarations_and_recipe_chain():
    from policylab.config import load_recipe
    from policylab.interfaces import declared
    from policylab.train.components import build_components

    s = VarianceAwareSampler()
    assert declared(s, "provides") == () and not hasattr(s, "prepare")
    build_components(load_recipe("vas"))
