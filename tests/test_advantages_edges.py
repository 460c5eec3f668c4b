"""Edge cases shared by the advantages of advantages_rewards.md A6-A7 and B1-B11 (§0): all-equal rewards, G = 1,
empty masks and failed (NaN) rewards never produce NaN, and failed rows get 0. Each runs its own annotate or
transform pass first, as the loop does."""

import pytest
import torch

from policylab import registry
from policylab.algo.advantages.gae import CRITIC_VALUES
from policylab.rollouts import PolicyOutputs
from policylab.testing import make_rollouts

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


MODULES = ("policylab.algo.advantages.robust", "policylab.algo.advantages.difficulty", "policylab.algo.advantages.confidence",
           "policylab.algo.advantages.process_and_global", "policylab.algo.advantages.gae",
           "policylab.annotate.greedy_baseline", "policylab.annotate.prompt_confidence")


def test_every_advantage_of_these_modules_is_covered():
    covered = {name for name, entry in registry.entries("advantage").items() if entry.target.__module__ in MODULES}
    assert covered == set(COMPONENTS)


def make(rewards, group, lengths):
    b = len(rewards)
    width = max(max(lengths), 1)
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(b, width, generator=gen) * 2
    batch = make_rollouts(
        rewards, group=group, lengths=lengths, width=width, prompt_ids=[[0, 3, 4]] * b, prompt_mask=[[0.0, 1.0, 1.0]] * b,
        completion_ids=torch.randint(1, 20, (b, width), generator=gen),
        prompts=[f"p{g}" for g in group], completions=[str(int(r)) if r == r else "?" for r in rewards],
        rows=[{"answer": "1"} for _ in rewards], behavior_logp=logp, ref_logp=logp - 0.1 * torch.rand(b, width, generator=gen))
    return batch.with_(extras={CRITIC_VALUES: 0.5 * torch.ones(b, width) * batch.completion_mask})


class Ctx:
    """generate: greedy completions scored 0.5; score: log-prob of a token = -0.1 * its id."""

    def generate(self, rows, **overrides):
        out = make([0.0] * len(rows), list(range(len(rows))), [1] * len(rows))
        return out.with_(rewards=torch.full((len(rows),), 0.5))

    def score(self, rollouts, model=None, with_hidden=False):
        return PolicyOutputs(logp=-0.1 * rollouts.completion_ids.float())


def run(name, batch):
    params, _ = COMPONENTS[name]
    comp = registry.build("advantage", name, params)
    if hasattr(comp, "transform"):
        batch = comp.transform(batch, Ctx())
    elif hasattr(comp, "annotate"):
        batch = batch.with_(extras={**batch.extras, **comp.annotate(batch, Ctx())})
    batch.validate(name)
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
