"""The speed work must not change what is computed: the dapo recipe's loss on a fixed batch equals the
formula of objectives.md §1.3, written out here independently of the library's helpers."""

import torch

from policylab.config import load_recipe
from policylab.rollouts import Normaliser, PolicyOutputs
from policylab.testing import make_rollouts
from policylab.train.components import build_components


def test_dapo_recipe_loss_equals_the_section_1_3_formula():
    torch.manual_seed(0)
    parts = build_components(load_recipe("dapo"))
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])  # two groups of three
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.float32)
    batch = make_rollouts(rewards.tolist(), group=group.tolist(), lengths=mask.sum(-1).long().tolist(), width=4,
                          prompt_len=2)
    assert torch.equal(batch.completion_mask, mask)
    batch.old_logp = -torch.rand(6, 4) - 0.5
    logp = (batch.old_logp + 0.4 * torch.randn(6, 4)).requires_grad_()
    batch.advantages = parts.advantage(batch)

    # §1.3: A = GRPO advantage (unbiased std, eps 1e-6); token-mean of max(-A rho, -A clip(rho, 1-0.2, 1+0.28))
    adv = torch.empty(6)
    for g in (0, 1):
        r = rewards[group == g]
        adv[group == g] = (r - r.mean()) / (r.std() + 1e-6)
    rho = torch.exp(logp - batch.old_logp)
    a = adv[:, None]
    per_token = torch.maximum(-a * rho, -a * rho.clamp(0.8, 1.28))
    expected = (per_token * mask).sum() / mask.sum()

    loss_tok, _ = parts.update.objective(PolicyOutputs(logp=logp), batch)
    got = parts.update.aggregate(loss_tok, mask, Normaliser.of(mask, 4))
    assert torch.allclose(batch.advantages, adv, atol=1e-6)
    assert torch.allclose(got, expected, atol=1e-6)
    assert (rho.detach() > 1.28).any() and (rho.detach() < 0.8).any(), "the batch must exercise both clip bounds"
