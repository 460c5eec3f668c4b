"""Edge cases shared by every advantage in policylab.algo.advantages_seed (advantages_rewards.md §0):
all-equal rewards, G = 1, empty masks and failed (NaN) rewards never produce NaN, and failed rows get 0."""

import pytest
import torch

from policylab import registry
from policylab.rollouts import Rollouts

NAN = float("nan")

# name -> (params, does an all-equal group give exactly 0?)
COMPONENTS = {
    "gae": ({}, False),  # the critic's values still give token advantages
    "remax": ({}, False),  # the greedy baseline is another response
    "mc_grpo": ({}, True),
    "bnpo": ({}, True),
    "riskpo": ({"bundle_size": 2}, True),
    "a_grae": ({}, True),
    "dgpo": ({}, True),
    "progrpo": ({}, False),  # all-correct groups still get the confidence shift (published form)
    "adora": ({}, True),
    "tmn_reweight": ({"default_task": "t"}, True),
    "renorm": ({}, True),
    "capo_calibration": ({}, True),
    "copo": ({}, True),
}


def test_every_seed_advantage_is_covered():
    seed = {name for name, entry in registry.entries("advantage").items()
            if entry.target.__module__.startswith("policylab.algo.advantages_seed")}
    assert seed == set(COMPONENTS)


def make(rewards, group, lengths):
    b = len(rewards)
    width = max(max(lengths), 1)
    mask = torch.zeros(b, width)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(b, width, generator=gen) * 2
    return Rollouts(
        prompt_ids=torch.tensor([[0, 3, 4]] * b), prompt_mask=torch.tensor([[0.0, 1.0, 1.0]] * b),
        completion_ids=torch.randint(1, 20, (b, width), generator=gen), completion_mask=mask,
        group=torch.tensor(group), truncated=torch.zeros(b, dtype=torch.bool),
        prompts=[f"p{g}" for g in group], completions=[str(int(r)) if r == r else "?" for r in rewards],
        rows=[{"answer": "1"} for _ in rewards], rewards=torch.tensor(rewards, dtype=torch.float32),
        old_logp=logp, ref_logp=logp - 0.1 * torch.rand(b, width, generator=gen),
        extras={"value/values": 0.5 * torch.ones(b, width) * mask},
    )


class Ctx:
    extras: dict = {}

    def generate(self, rows, **overrides):
        out = make([0.0] * len(rows), list(range(len(rows))), [1] * len(rows))
        return out.with_(rewards=torch.full((len(rows),), 0.5))

    def score(self, rollouts, model=None, with_hidden=False):
        from policylab.rollouts import PolicyOutputs
        return PolicyOutputs(logp=-0.1 * rollouts.completion_ids.float())


def run(name, batch):
    params, _ = COMPONENTS[name]
    comp = registry.build("advantage", name, params)
    if hasattr(comp, "prepare"):
        batch = comp.prepare(batch, Ctx())
    return comp(batch), batch


CASES = {
    "all_equal": ([1.0, 1.0, 1.0, 1.0], [0, 0, 0, 0], [2, 3, 1, 2]),
    "all_zero_two_groups": ([0.0, 0.0, 0.0, 0.0], [0, 0, 1, 1], [2, 3, 1, 2]),
    "singletons": ([1.0, 0.0, 1.0], [0, 1, 2], [2, 2, 2]),
    "empty_masks": ([1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1], [0, 0, 0, 0]),
    "failed_reward": ([1.0, NAN, 0.0, 1.0, 0.0, 0.0], [0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 2, 2]),
    "all_failed_group": ([NAN, NAN, 1.0, 0.0], [0, 0, 1, 1], [2, 2, 2, 2]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_no_nan(name, case):
    rewards, group, lengths = CASES[case]
    adv, batch = run(name, make(rewards, group, lengths))
    assert adv.shape[0] == batch.batch_size and torch.isfinite(adv).all()
    if adv.dim() == 2:
        assert adv.shape == batch.completion_mask.shape
    failed = torch.isnan(batch.rewards)
    assert (adv[failed] == 0).all()


@pytest.mark.parametrize("name", sorted(n for n, (_, zero) in COMPONENTS.items() if zero))
def test_all_equal_group_gives_zero(name):
    adv, _ = run(name, make(*CASES["all_equal"]))
    assert (adv == 0).all()
