"""SDPO (§4.1) and SRPO (§4.2): teacher contexts, the sampled-token distillation loss, routing, weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from policylab import registry
from policylab.algo.advantages.group_baselines import grpo_advantage
from policylab.algo.objectives.distillation import entropy_weights, sdpo_token_losses, teacher_demonstrations
from policylab.annotate.teacher import reprompt_text
from policylab.config import load_recipe
from policylab.interfaces import declared
from policylab.rollouts import Normaliser, PolicyOutputs
from policylab.testing import make_rollouts
from policylab.train.components import build_components


class FakeTokenizer:
    pad_token_id, eos_token_id = 0, 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (ord(c) % 40) for c in text]}


def make_batch(rewards, lengths, group, seed=0):
    width = max(lengths)
    b = len(rewards)
    gen = torch.Generator().manual_seed(seed)
    logp = torch.log(torch.rand(b, width, generator=gen) * 0.8 + 0.1)
    batch = make_rollouts(
        rewards, lengths=lengths, group=group, prompt_ids=torch.full((b, 3), 7), completion_ids=torch.full((b, width), 9),
        prompts=[f"<user>Q{g}</user>" for g in group], completions=[f"answer {i}" for i in range(b)],
        rows=[{"prompt": f"Q{g}"} for g in group],
    )
    batch.advantages = grpo_advantage(batch)
    return batch, logp


def fake_ctx(entropy_by_row=None):
    """A StageContext whose ``score`` gives log-probs that depend on the (re)prompt length."""
    seen = {}

    def score(rollouts, model=None, with_hidden=False):
        seen["batch"], seen["model"] = rollouts, model
        mask = rollouts.completion_mask
        logp = -0.01 * rollouts.prompt_mask.sum(-1, keepdim=True) * mask  # depends on the (re)prompt length
        ent = torch.ones_like(mask) if entropy_by_row is None else entropy_by_row[: mask.shape[0], : mask.shape[1]]
        return PolicyOutputs(logp=logp, entropy=ent * mask)

    ctx = SimpleNamespace(policy=torch.nn.Linear(2, 2), tokenizer=FakeTokenizer(), reference=None, score=score, step=0)
    return ctx, seen


def annotated(component, batch, ctx):
    """The batch after ``component.annotate``, checking that it returns exactly its declared fields."""
    fields = component.annotate(batch, ctx)
    assert set(fields) == set(declared(component, "provides"))
    out = batch.with_(extras={**batch.extras, **fields})
    out.validate(type(component).__name__)
    return out


@pytest.mark.parametrize("name", ["sdpo", "srpo"])
def test_recipe_chains_and_the_teacher_pass_is_an_annotation(name):
    parts = build_components(load_recipe(name))
    assert [n.where for n in parts.plan.prepare] == ["algorithm.objective"]
    assert parts.plan.prepare[0].hook == "annotate" and not parts.plan.needs_reference_model  # ema teacher
    aggregates = getattr(parts.update.objective, "aggregates", None)  # srpo's route scales assume token-mean
    assert aggregates is None or load_recipe(name).algorithm.aggregate.name in aggregates
    assert registry.build("objective", name, {"teacher": "reference"}).needs_reference_model


def test_teacher_demonstrations_pick_a_successful_sibling():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1])
    everyone = torch.ones(6, dtype=torch.bool)
    assert teacher_demonstrations(rewards, group, everyone).tolist() == [3, 0, 0, 0, -1, -1]
    assert teacher_demonstrations(rewards, group, everyone, exclude_self=False).tolist() == [0, 0, 0, 0, -1, -1]
    only_failed = rewards < 1
    assert teacher_demonstrations(rewards, group, only_failed).tolist() == [-1, 0, 0, -1, -1, -1]


def test_reprompt_keeps_the_engine_formatting():
    text = reprompt_text("<user>What is 2+2?</user><assistant>", "What is 2+2?", "4", "{prompt} | seen: {solution} | again")
    assert text == "<user>What is 2+2? | seen: 4 | again</user><assistant>"
    assert reprompt_text("raw", "", "4", "{prompt}+{solution}") == "+4"


def test_sampled_token_loss_gradient_is_the_log_ratio_to_the_teacher_with_is_clip():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    teacher = torch.tensor([[-1.5, -1.0]])
    sdpo_token_losses(logp, teacher, logp.detach()).sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.5, -1.0]]))
    logp.grad = None
    old = logp.detach() - torch.log(torch.tensor([[3.0, 1.5]]))  # ratios 3 (clipped to 2) and 1.5
    sdpo_token_losses(logp, teacher, old, is_clip=2.0).sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.5 * 2.0, -1.0 * 1.5]]), atol=1e-6)


def test_sdpo_teacher_pass_scores_reprompts_under_an_ema_teacher_and_distils_only_rows_with_a_teacher():
    batch, logp = make_batch([1.0, 0.0, 1.0, 0.0, 0.0], [2, 3, 1, 2, 2], [0, 0, 0, 1, 1])
    sdpo = registry.build("objective", "sdpo")
    ctx, seen = fake_ctx()
    out = annotated(sdpo, batch, ctx)
    assert out.extras["distill_mask"].tolist() == [True, True, True, False, False]
    teacher_batch = seen["batch"]
    assert teacher_batch.batch_size == 3 and teacher_batch.prompt_mask.sum(-1).min() > 3  # longer reprompts
    assert seen["model"] is sdpo.teacher.model and seen["model"] is not ctx.policy
    leaf = logp.clone().requires_grad_(True)
    loss, metrics = sdpo(PolicyOutputs(leaf), out)
    (loss * out.completion_mask).sum().backward()
    expected = (logp - out.extras["teacher_logp"]) * out.completion_mask
    expected[3:] = 0
    assert torch.allclose(leaf.grad, expected, atol=1e-6)
    assert metrics["sdpo/distilled_frac"].item() == pytest.approx(0.6)
    # EMA: the teacher moves 5% of the way to the student after a step
    with torch.no_grad():
        ctx.policy.weight.add_(1.0)
    before = sdpo.teacher.model.weight.clone()
    sdpo.after_step({})
    assert torch.allclose(sdpo.teacher.model.weight, before + 0.05 * (ctx.policy.weight - before))


def test_sdpo_refuses_logit_modes_it_cannot_compute():
    with pytest.raises(ValueError, match="full vocabulary"):
        registry.build("objective", "sdpo", {"loss_mode": "full_logits"})


def test_entropy_weights_monotone_mean_one_and_uniform_at_high_temperature():
    entropy = torch.tensor([[0.1, 0.5, 2.0], [1.0, 3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    w = entropy_weights(entropy, mask, temperature=1.0)
    valid = w[mask > 0]
    assert valid.mean().item() == pytest.approx(1.0)
    order = torch.argsort(entropy[mask > 0])
    assert torch.all(valid[order][1:] <= valid[order][:-1])  # higher entropy never weighs more
    assert w[1, 2] == 0
    flat = entropy_weights(entropy, mask, temperature=1e9)
    assert torch.allclose(flat[mask > 0], torch.ones(5), atol=1e-6)


def test_srpo_routes_correct_rows_to_grpo_and_failed_rows_to_distillation():
    batch, logp = make_batch([1.0, 0.0, 0.0, 1.0, 0.0, 0.0], [2, 3, 1, 2, 3, 2], [0, 0, 0, 0, 1, 1])
    srpo = registry.build("objective", "srpo")
    ctx, _ = fake_ctx()
    out = annotated(srpo, batch, ctx)
    assert out.extras["srpo_route"].tolist() == [0, 1, 1, 0, 0, 0]  # group 1 failed without teacher -> GRPO

    def grads(prepared):
        leaf = logp.clone().requires_grad_(True)
        loss, _ = srpo(PolicyOutputs(leaf), prepared)
        m = prepared.completion_mask
        registry.build("aggregate", "token-mean")(loss * m, m, Normaliser.of(m, 8)).backward()
        return leaf.grad

    g = grads(out)
    other_teacher = out.with_(extras={**out.extras, "teacher_logp": out.extras["teacher_logp"] - 1.0})
    g_teacher = grads(other_teacher)
    grpo_rows = torch.tensor([0, 3, 4, 5])
    assert torch.equal(g[grpo_rows], g_teacher[grpo_rows])  # correct rows never see the teacher
    assert not torch.equal(g[1:3], g_teacher[1:3])
    other_adv = out.with_(advantages=out.advantages * 3 + 1)
    g_adv = grads(other_adv)
    assert torch.equal(g[1:3], g_adv[1:3])  # distilled rows never see the advantage
    # the two routes are token-means over their own tokens: check the distilled part's gradient scale
    n_distill = out.completion_mask[1:3].sum()
    w = out.extras["srpo_weight"]
    expected = w[1:3] * (logp[1:3] - out.extras["teacher_logp"][1:3]) * out.completion_mask[1:3] / n_distill
    assert torch.allclose(g[1:3], expected, atol=1e-6)


def test_srpo_all_correct_batch_is_exactly_grpo():
    batch, logp = make_batch([1.0, 1.0, 0.0, 1.0], [2, 3, 1, 2], [0, 0, 1, 1])
    batch.rewards = torch.tensor([1.0, 1.0, 1.0, 1.0])
    batch.advantages = torch.tensor([0.3, -0.3, 0.5, -0.5])
    srpo = registry.build("objective", "srpo")
    out = annotated(srpo, batch, fake_ctx()[0])
    loss, _ = srpo(PolicyOutputs(logp), out)
    reference, _ = registry.build("objective", "ppo_clip", {"eps_low": 0.2, "eps_high": 0.28})(PolicyOutputs(logp), out)
    assert torch.allclose(loss, reference * out.completion_mask)
    assert out.extras["srpo_scale"].tolist() == [1.0, 1.0, 1.0, 1.0]
