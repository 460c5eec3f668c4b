"""DPO, KTO, CoPG, TRPA, the online pair construction, the offline pair tasks and their batch transform."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from policylab import registry
from policylab.algo.objectives.preference import (
    copg_pair_losses,
    dpo_pair_losses,
    kto_losses,
    labelled_pairs,
    mismatched_partners,
    preference_levels,
    preference_pairs,
    trpa_pair_losses,
)
from policylab.config import load_recipe
from policylab.interfaces import declared
from policylab.rollouts import Normaliser, PolicyOutputs
from policylab.tasks.files import DatasetError
from policylab.tasks.pairs import has_pair_rows, pair_rollouts
from policylab.testing import make_rollouts
from policylab.train.components import build_components


def make_batch(rewards, lengths, group, *, seed=0, ref_shift=0.0):
    width = max(lengths)
    b = len(rewards)
    gen = torch.Generator().manual_seed(seed)
    logp = torch.log(torch.rand(b, width, generator=gen) * 0.8 + 0.1)
    batch = make_rollouts(
        rewards, lengths=lengths, group=group, prompt_len=2,
        completion_ids=torch.arange(b * width).reshape(b, width) % 40 + 2, old_logp=logp.clone(),
        ref_logp=logp.clone() + ref_shift, prompts=[f"p{g}" for g in group], completions=[f"c{i}" for i in range(b)],
        rows=[{"prompt": f"p{g}"} for g in group],
    )
    return batch, logp


def annotated(component, batch, ctx):
    """The batch after ``component.annotate``, checking that it returns exactly its declared fields."""
    fields = component.annotate(batch, ctx)
    assert set(fields) == set(declared(component, "provides"))
    out = batch.with_(extras={**batch.extras, **fields})
    out.validate(type(component).__name__)
    return out


def total_of(loss, mask):
    return registry.build("aggregate", "seq-mean-token-sum")(loss * mask, mask, Normaliser.of(mask, 8))


class FakeTokenizer:
    pad_token_id, eos_token_id = 0, 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (ord(c) % 40) for c in text]}


# ---------------------------------------------------------------------------------------------------
# DPO


def test_dpo_spec_numbers():
    loss, margin = dpo_pair_losses(torch.tensor(1.0), torch.tensor(-1.0), torch.tensor(0.0), torch.tensor(0.0), beta=0.1)
    assert loss.item() == pytest.approx(0.598139, abs=1e-6) and margin.item() == pytest.approx(2.0)
    same, _ = dpo_pair_losses(torch.tensor(-3.0), torch.tensor(-5.0), torch.tensor(-3.0), torch.tensor(-5.0), beta=0.1)
    assert same.item() == pytest.approx(math.log(2), abs=1e-7)
    swapped, _ = dpo_pair_losses(torch.tensor(-1.0), torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0), beta=0.1)
    assert swapped.item() > loss.item()


def test_dpo_objective_on_labelled_pairs_gives_the_mean_pair_loss_and_its_gradient():
    batch, logp = make_batch([1.0, 0.0, 1.0, 0.0], [2, 3, 1, 2], [0, 0, 1, 1])
    batch.extras["pref_label"] = torch.tensor([1, -1, 1, -1])
    leaf = logp.clone().requires_grad_(True)
    loss, metrics = registry.build("objective", "dpo", {"beta": 0.1})(PolicyOutputs(leaf), batch)
    total = total_of(loss, batch.completion_mask)
    total.backward()
    assert total.item() == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    m = batch.completion_mask
    expected = torch.tensor([-1.0, 1.0, -1.0, 1.0])[:, None] * 0.1 * 0.5 / 2 * m  # -(1/P) beta sigmoid(0) per chosen token
    assert torch.allclose(leaf.grad, expected, atol=1e-7)
    assert metrics["dpo/pairs"].item() == 2


def test_dpo_sft_term_adds_the_chosen_token_mean_nll():
    batch, logp = make_batch([1.0, 0.0], [2, 3], [0, 0])
    batch.extras["pref_label"] = torch.tensor([1, -1])
    base, _ = registry.build("objective", "dpo")(PolicyOutputs(logp), batch)
    with_sft, _ = registry.build("objective", "dpo", {"sft_weight": 0.5})(PolicyOutputs(logp), batch)
    m = batch.completion_mask
    nll_chosen = -(logp[0, :2]).mean()
    assert (total_of(with_sft, m) - total_of(base, m)).item() == pytest.approx(0.5 * nll_chosen.item(), abs=1e-6)


def test_online_pairs_best_worst_all_and_correct_incorrect():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0, float("nan"), 1.0, 1.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    lengths = torch.tensor([3, 5, 7, 2, 4, 4, 3, 3])
    best_worst = preference_pairs(rewards, group, mode="best_worst", lengths=lengths)
    assert best_worst.tolist() == [[2, 1]]  # longest correct vs the worst; group 1 has one usable row; group 2 ties
    all_pairs = {tuple(p) for p in preference_pairs(rewards, group, mode="all").tolist()}
    assert all_pairs == {(0, 1), (0, 3), (2, 1), (2, 3), (3, 1)}
    ci = {tuple(p) for p in preference_pairs(rewards, group, mode="correct_incorrect").tolist()}
    assert ci == {(0, 1), (0, 3), (2, 1), (2, 3)}
    assert labelled_pairs(torch.tensor([1, -1, -1, 0]), torch.tensor([0, 0, 1, 1])).tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="pair mode"):
        preference_pairs(rewards, group, mode="random")


def test_dpo_online_pairs_skip_equal_reward_prompts():
    batch, logp = make_batch([1.0, 1.0, 1.0, 0.0], [2, 3, 1, 2], [0, 0, 1, 1])
    leaf = logp.clone().requires_grad_(True)
    loss, _ = registry.build("objective", "dpo")(PolicyOutputs(leaf), batch)
    total_of(loss, batch.completion_mask).backward()
    assert torch.all(leaf.grad[:2] == 0) and leaf.grad[2:].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# KTO


def test_kto_spec_numbers_and_detached_reference_point():
    z0 = torch.tensor(0.5, requires_grad=True)
    r = torch.tensor([1.0, -1.0], requires_grad=True)
    loss = kto_losses(r, torch.tensor([True, False]), z0, beta=0.1)
    assert torch.allclose(loss, torch.tensor([0.487503, 0.462570]), atol=1e-6)
    loss.sum().backward()
    assert z0.grad is None and r.grad.abs().sum() > 0


def test_kto_all_desirable_batch_still_trains():
    batch, logp = make_batch([1.0, 1.0, 1.0], [2, 3, 1], [0, 0, 0], ref_shift=-0.2)
    leaf = logp.clone().requires_grad_(True)
    loss, _ = registry.build("objective", "kto", {"reference_point": "zero"})(PolicyOutputs(leaf), batch)
    total_of(loss, batch.completion_mask).backward()
    assert torch.all(leaf.grad[batch.completion_mask > 0] < 0)  # raise every desirable completion


def test_kto_mismatched_partners_skip_rows_of_the_same_prompt():
    assert mismatched_partners(torch.tensor([0, 0, 1, 1])).tolist() == [2, 2, 0, 0]
    assert mismatched_partners(torch.tensor([5, 5, 5])).tolist() == [-1, -1, -1]


def test_kto_annotation_estimates_z0_from_mismatched_completions():
    batch, _ = make_batch([1.0, 0.0, 1.0, 0.0], [2, 3, 1, 2], [0, 0, 1, 1])
    reference = object()

    def score(rollouts, model=None, with_hidden=False):  # policy 0.1/token above the reference
        value = -0.2 if model is reference else -0.1
        return PolicyOutputs(logp=value * rollouts.completion_mask)

    ctx = SimpleNamespace(score=score, policy=None, reference=reference, tokenizer=None)
    kto = registry.build("objective", "kto")
    assert kto.needs_reference_model
    out = annotated(kto, batch, ctx)
    # partners [2,2,0,0] have lengths [1,1,2,2]: mean(0.1 * length) = 0.15
    assert out.extras["kto_z0"].item() == pytest.approx(0.15, abs=1e-6)
    loss, metrics = kto(PolicyOutputs(batch.old_logp.clone()), out)
    assert metrics["kto/kl"].item() == pytest.approx(0.15, abs=1e-6)


def test_kto_after_its_annotation_is_exact_under_any_micro_batching():
    batch, logp = make_batch([1.0, 0.0, float("nan"), 1.0, 0.0, 1.0], [2, 3, 1, 2, 3, 1], [0, 0, 1, 1, 2, 2], ref_shift=-0.1)
    # reference point 0 keeps this about the labelled-fraction normaliser: rows [0, 3] alone have no NaN row, so a
    # micro-batch-local normaliser (1 instead of 6/5) would break the sum
    kto = registry.build("objective", "kto", {"reference_point": "zero"})
    assert declared(kto, "provides") == ("kto_row_scale",) and not kto.needs_reference_model
    prepared = annotated(kto, batch, None)
    assert prepared.extras["kto_row_scale"].item() == pytest.approx(6 / 5)  # one NaN reward: 5 labelled of 6 rows
    m = prepared.completion_mask
    norm = Normaliser.of(m, 8)
    aggregate = registry.build("aggregate", "seq-mean-token-sum")
    leaf = logp.clone().requires_grad_(True)
    full, _ = kto(PolicyOutputs(leaf), prepared)
    total = aggregate(full * m, m, norm)
    for rows in ([0, 3], [1, 2, 4, 5]):
        index = torch.tensor(rows)
        sub = prepared.select(index)
        part, _ = kto(PolicyOutputs(leaf[index]), sub)
        total = total - aggregate(part * sub.completion_mask, sub.completion_mask, norm)
    assert abs(total.item()) < 1e-6


# ---------------------------------------------------------------------------------------------------
# CoPG


def test_copg_spec_numbers_and_symmetry():
    lr_y = torch.tensor(0.2, requires_grad=True)
    lr_other = torch.tensor(-0.1, requires_grad=True)
    loss = copg_pair_losses(torch.tensor(1.0), torch.tensor(0.0), lr_y, lr_other, beta=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(0.9409, abs=1e-6)
    assert lr_y.grad.item() == pytest.approx(-0.194, abs=1e-6) and lr_other.grad.item() == pytest.approx(0.194, abs=1e-6)
    back = copg_pair_losses(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(-0.1), torch.tensor(0.2), beta=0.1)
    assert back.item() == pytest.approx(loss.item())


def test_copg_objective_gradient_reaches_every_token_of_the_sequence():
    batch, logp = make_batch([1.0, 0.0], [2, 3], [0, 0])
    # sequence log-ratios 0.2 and -0.1 spread over the tokens
    batch.ref_logp = logp.clone()
    batch.ref_logp[0, :2] -= 0.1
    batch.ref_logp[1, :3] += 0.1 / 3
    leaf = logp.clone().requires_grad_(True)
    loss, _ = registry.build("objective", "copg", {"beta": 0.1})(PolicyOutputs(leaf), batch)
    total = total_of(loss, batch.completion_mask)
    total.backward()
    assert total.item() == pytest.approx(0.9409, abs=1e-5)
    assert torch.allclose(leaf.grad[0, :2], torch.full((2,), -0.194), atol=1e-5)
    assert torch.allclose(leaf.grad[1, :3], torch.full((3,), 0.194), atol=1e-5)


def test_copg_fixed_point_has_zero_loss_and_gradient():
    batch, logp = make_batch([1.0, 0.0, 0.5], [2, 3, 1], [0, 0, 0])
    beta, c = 0.1, 0.7
    batch.ref_logp = logp.clone()
    for i, reward in enumerate([1.0, 0.0, 0.5]):  # log-ratio_i = R_i/beta + c, put on the first token
        batch.ref_logp[i, 0] -= reward / beta + c
    leaf = logp.clone().requires_grad_(True)
    loss, _ = registry.build("objective", "copg", {"beta": beta})(PolicyOutputs(leaf), batch)
    total = total_of(loss, batch.completion_mask)
    total.backward()
    assert total.item() == pytest.approx(0.0, abs=1e-8)
    assert leaf.grad.abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------------
# TRPA


def test_trpa_spec_numbers():
    high = trpa_pair_losses(torch.tensor(0.1), torch.tensor(-0.1), torch.tensor(1), beta=0.1, anisotropy=2.5)
    low = trpa_pair_losses(torch.tensor(0.1), torch.tensor(-0.1), torch.tensor(2), beta=0.1, anisotropy=2.5)
    assert high.item() == pytest.approx(0.668460, abs=1e-6)
    assert low.item() == pytest.approx(0.683197, abs=1e-6)
    swapped = trpa_pair_losses(torch.tensor(-0.1), torch.tensor(0.1), torch.tensor(1), beta=0.1, anisotropy=2.5)
    assert swapped.item() > high.item()


def test_trpa_levels_from_rewards_and_format():
    batch, _ = make_batch([1.0, 0.0, float("nan"), 0.0], [1, 1, 1, 1], [0, 0, 0, 0])
    batch.reward_components = {"format": torch.tensor([1.0, 1.0, 1.0, 0.0])}
    assert preference_levels(batch).tolist() == [1, 2, 3, 4]
    batch.reward_components = {}
    assert preference_levels(batch).tolist() == [1, 2, 3, 2]  # no format component: every wrong row is level 2


def test_trpa_equal_level_prompt_adds_no_pair_and_uses_no_fallback_when_pairs_exist():
    # group 0: level 1 vs level 2 ; group 1: all level 1 (no pair there)
    batch, logp = make_batch([1.0, 0.0, 1.0, 1.0], [2, 2, 1, 3], [0, 0, 1, 1])
    batch.ref_logp = logp.clone()
    batch.ref_logp[0, :2] -= 0.1  # l_0 = +0.1
    batch.ref_logp[1, :2] += 0.1  # l_1 = -0.1
    loss, metrics = registry.build("objective", "trpa", {"tr_kl_coef": 0.0})(PolicyOutputs(logp.clone()), batch)
    assert total_of(loss, batch.completion_mask).item() == pytest.approx(0.668460, abs=1e-6)
    assert metrics["trpa/pairs"].item() == 1


def test_trpa_fallback_and_trust_region():
    batch, logp = make_batch([1.0, 1.0], [2, 2], [0, 0])
    batch.ref_logp = logp.clone()
    batch.ref_logp[0, :2] -= 0.3  # l_0 = 0.3, level 1: fallback -log sigmoid(+0.3); l_1 = 0
    loss, _ = registry.build("objective", "trpa", {"tr_kl_coef": 0.0})(PolicyOutputs(logp.clone()), batch)
    expected = (-torch.nn.functional.logsigmoid(torch.tensor(0.3)) + math.log(2)) / 2
    assert total_of(loss, batch.completion_mask).item() == pytest.approx(expected.item(), abs=1e-6)
    # trust region: k3(logp, old) mean times the coefficient
    batch.old_logp = logp - 0.2
    with_tr, metrics = registry.build("objective", "trpa", {"tr_kl_coef": 1.0})(PolicyOutputs(logp.clone()), batch)
    k3 = math.exp(-0.2) - 1 + 0.2
    assert metrics["trpa/tr_kl_loss"].item() == pytest.approx(k3, abs=1e-6)


# ---------------------------------------------------------------------------------------------------
# offline pairs: tasks and conversion


def test_pairs_task_loads_and_rejects_bad_rows(tmp_path):
    good = tmp_path / "pairs.jsonl"
    good.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) for i in range(10)))
    task = registry.build("task", "pairs", {"path": str(good)})()
    assert len(task.train) + len(task.eval) == 10 and has_pair_rows(task.train)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "yes"}) + "\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:1.*rejected"):
        registry.build("task", "pairs", {"path": str(bad)})()
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n")
    with pytest.raises(DatasetError, match="identical"):
        registry.build("task", "pairs", {"path": str(same)})()


def test_arithmetic_pairs_rows_have_a_correct_chosen_and_a_wrong_rejected():
    task = registry.build("task", "arithmetic_pairs", {"train_size": 20, "eval_size": 5})()
    for row in task.train:
        assert row["chosen"] == row["answer"] == str(eval(row["expression"]))
        assert row["rejected"] != row["chosen"]


def test_pair_rollouts_turn_each_prompt_into_chosen_and_rejected_rows():
    rows = [{"prompt": "What?", "chosen": "ab", "rejected": "xyz"}, {"prompt": "Who?", "chosen": "c", "rejected": "de"}]
    generated = make_rollouts(
        [0.0, 0.0, 0.0], lengths=[2, 2, 2], group=[4, 9, 9], prompt_ids=torch.tensor([[0, 5, 6], [7, 8, 9], [7, 8, 9]]),
        prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1.0]]), prompts=["What?", "Who?", "Who?"],
        completions=["", "", ""], rows=[rows[0], rows[1], rows[1]], extras={"max_new_tokens": 4},
    )
    out = pair_rollouts(generated, FakeTokenizer())
    assert out.batch_size == 4 and out.group.tolist() == [0, 0, 1, 1]
    assert out.extras["pref_label"].tolist() == [1, -1, 1, -1] and out.rewards.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert out.completion_mask.sum(-1).tolist() == [3, 4, 2, 3]  # text + EOS
    assert out.completion_ids[1, 3].item() == FakeTokenizer.eos_token_id
    assert out.prompt_ids[0].tolist() == [0, 5, 6] and out.prompt_mask[0].tolist() == [0, 1, 1]
    assert out.completions == ["ab", "xyz", "c", "de"] and out.extras["max_new_tokens"] == 4


def generated_pair_batch():
    rows = [{"prompt": "What?", "chosen": "ab", "rejected": "xyz"}]
    return make_rollouts([0.0], lengths=[2], prompt_ids=torch.tensor([[5, 6]]), prompts=["What?"], completions=["12"],
                         rows=rows, extras={"max_new_tokens": 4})


def test_offline_pairs_transform_converts_pair_rows_and_labels_generated_rows_zero():
    transform = registry.build("batch_transform", "offline_pairs")
    assert declared(transform, "provides") == ("pref_label",)
    ctx = SimpleNamespace(tokenizer=FakeTokenizer())
    out = transform.transform(generated_pair_batch(), ctx)
    assert out.batch_size == 2 and out.extras["pref_label"].tolist() == [1, -1] and out.ref_logp is None
    out.validate("offline_pairs")
    online, _ = make_batch([1.0, 0.0], [2, 3], [0, 0])
    same = transform.transform(online, ctx)
    assert same.batch_size == 2 and same.extras["pref_label"].tolist() == [0, 0]
    assert torch.equal(same.completion_ids, online.completion_ids)
    # rows labelled 0 are online rows: DPO takes its pairs from the rewards, as without the field
    logp = online.old_logp
    with_zero, _ = registry.build("objective", "dpo")(PolicyOutputs(logp), same)
    without, _ = registry.build("objective", "dpo")(PolicyOutputs(logp), online)
    assert torch.equal(with_zero, without)


@pytest.mark.parametrize("name", ["dpo", "kto", "copg", "trpa"])
def test_recipes_chain_with_the_pair_transform_and_the_reference_scorer(name):
    parts = build_components(load_recipe(name))
    provided = {p for n in parts.plan.prepare for p in n.provides}
    assert {"pref_label", "ref_logp"} <= provided and parts.plan.needs_reference_model
    assert load_recipe(name).algorithm.aggregate.name in parts.update.objective.aggregates
    assert not hasattr(parts.update.objective, "prepare")
    if name == "kto":  # its annotation reads the offline labels, so it runs after the pair transform
        order = [n.provides for n in parts.plan.prepare]
        assert order.index(("pref_label",)) < order.index(("kto_z0", "kto_row_scale"))
