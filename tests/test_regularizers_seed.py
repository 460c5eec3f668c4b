"""SIREN (advantages_rewards.md E3), DPH-RL (E4), FG-ExPO AKL (E5), PAPO (E6): the math in
policylab.algo.regularizers, the registered components (and their annotate hooks) in policylab.annotate."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from policylab import registry
from policylab.algo.aggregate import seq_mean_token_mean, seq_mean_token_sum, seq_mean_token_sum_norm, token_mean
from policylab.algo.regularizers.divergence import AccuracyConditionedKL, akl_beta, alpha_f, forward_kl_f, js_f
from policylab.algo.regularizers.entropy import (
    SelectiveEntropyPenalty,
    peak_entropy_mask,
    selected_entropy,
    top_p_entropy,
)
from policylab.algo.regularizers.scalar_penalty import spread_scalar
from policylab.annotate.perception import PAPORegularizer
from policylab.annotate.rehearsal import DPHRehearsal
from policylab.config import load_recipe
from policylab.interfaces import declared
from policylab.rollouts import Normaliser, PolicyOutputs
from policylab.train.components import build_components
from test_advantages_probe_common import CharTokenizer, annotated, completion_forward, make_ctx, make_rollouts, tiny_model

LN = math.log


# -- scalar spreading ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,fn", [("token-mean", token_mean), ("seq-mean-token-mean", seq_mean_token_mean),
                                     ("seq-mean-token-sum", seq_mean_token_sum),
                                     ("seq-mean-token-sum-norm", seq_mean_token_sum_norm)])
def test_spread_scalar_aggregates_to_the_scalar_across_micro_batches(name, fn):
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    norm = Normaliser.of(mask, max_len=5)
    total = sum(fn(spread_scalar(torch.tensor(0.3), mask[rows], name, 5.0), mask[rows], norm) for rows in (slice(0, 1), slice(1, 4)))
    assert float(total) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="aggregate"):
        spread_scalar(torch.tensor(1.0), mask, "median")


# -- SIREN ----------------------------------------------------------------------------------------------


def test_siren_t1_and_t3_top_p_entropy():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1], [0.9, 0.05, 0.05, 1e-9]]))
    h = top_p_entropy(logits, top_p=0.8)
    assert float(h[0]) == pytest.approx(0.636514, abs=1e-5)
    assert float(h[1]) == 0.0


def test_siren_t2_peak_mask_and_penalty():
    h = torch.tensor([[0.1, 0.5, 0.9, 0.3, 0.7]])
    m = peak_entropy_mask(h, torch.ones(1, 5), 0.8)
    assert m.tolist() == [[0, 0, 1, 0, 0]]
    h_sel = selected_entropy(h, m)
    assert float(h_sel) == pytest.approx(0.9)
    assert 0.005 * (float(h_sel) - 0.5) ** 2 == pytest.approx(0.0008)


def test_siren_rows_without_selected_tokens_are_excluded():
    h = torch.tensor([[0.4, 0.4, 0.4], [0.1, 0.9, 0.2]])
    m = peak_entropy_mask(h, torch.ones(2, 3), 0.8)
    assert m[0].sum() == 0 and float(selected_entropy(h, m)) == pytest.approx(0.9)
    assert float(selected_entropy(h, torch.zeros(2, 3))) == 0.0


def test_siren_regularizer_gradient_anchor_and_resume():
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 12, bias=False)
    siren = SelectiveEntropyPenalty(coef=1.0, top_p=0.95, mask_ratio=0.5, chunk=2)
    siren.bind_output_layer(head.weight)
    r = make_rollouts(["p"] * 2, ["abc", "ab"], [0, 0], rewards=[1.0, 0.0])
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    loss, metrics = siren(PolicyOutputs(logp=torch.zeros(2, 3), hidden=hidden), r)
    assert siren.anchor == pytest.approx(float(metrics["siren/entropy_loss"]))
    assert float(loss.detach().abs().sum()) == 0.0  # first call: H_sel == anchor
    hidden2 = (hidden.detach() * 3).requires_grad_()
    loss2, m2 = siren(PolicyOutputs(logp=torch.zeros(2, 3), hidden=hidden2), r)
    (loss2 * r.completion_mask).sum().backward()
    assert float(m2["siren/mse_entropy_loss"]) > 0 and hidden2.grad.abs().sum() > 0
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0  # the output layer learns too
    resumed = SelectiveEntropyPenalty(coef=1.0)
    resumed.load_state_dict(copy.deepcopy(siren.state_dict()))
    assert resumed.anchor == siren.anchor
    with pytest.raises(ValueError, match="annotate"):
        SelectiveEntropyPenalty()(PolicyOutputs(logp=torch.zeros(2, 3), hidden=hidden), r)


def test_siren_annotate_binds_the_output_layer_and_temperature():
    model = tiny_model()
    ctx = make_ctx(model)
    ctx.temperature = 0.7
    siren = registry.build("regularizer", "siren", {})
    r = make_rollouts(["p"], ["ab"], [0], rewards=[1.0])
    assert annotated(siren, r, ctx).extras == r.extras  # provides nothing
    assert siren.weight is model.get_output_embeddings().weight and siren.temperature == 0.7


def test_siren_spreads_for_the_recipe_aggregation_with_the_loop_max_len():
    siren = registry.build("regularizer", "siren", {"coef": 1.0, "anchor": 0.0, "aggregate": "seq-mean-token-sum-norm"})
    assert declared(siren, "requires") == ("max_new_tokens",)
    siren.bind_output_layer(torch.randn(12, 4))
    r = make_rollouts(["p"] * 2, ["abc", "ab"], [0, 0], rewards=[1.0, 0.0])
    out = PolicyOutputs(logp=torch.zeros(2, 3), hidden=torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="max_new_tokens"):
        siren(out, r)
    r.extras["max_new_tokens"] = 5
    loss, metrics = siren(out, r)
    total = seq_mean_token_sum_norm(loss, r.completion_mask, Normaliser.of(r.completion_mask, max_len=5))
    assert float(total) == pytest.approx(float(metrics["siren/mse_entropy_loss"]), rel=1e-5)
    with pytest.raises(ValueError, match="aggregate"):
        registry.build("regularizer", "siren", {"aggregate": "median"})


# -- DPH-RL ---------------------------------------------------------------------------------------------


def test_dph_t1_divergence_values():
    lp, lp0 = torch.tensor(LN(0.25)), torch.tensor(LN(0.5))
    assert float(forward_kl_f(lp, lp0)) == pytest.approx(0.193147, abs=1e-6)
    assert float(js_f(lp, lp0)) == pytest.approx(0.084950, abs=1e-6)


@pytest.mark.parametrize("f", [forward_kl_f, js_f, lambda a, b: alpha_f(a, b, 0.2)])
def test_dph_t2_zero_at_u_one_with_zero_gradient(f):
    lp = torch.tensor(-0.7, requires_grad=True)
    value = f(lp, torch.tensor(-0.7))
    value.backward()
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-7) and float(lp.grad) == pytest.approx(0.0, abs=1e-6)


def test_dph_t3_forward_kl_gradient_is_mass_covering():
    lp = torch.tensor(LN(0.25), requires_grad=True)
    forward_kl_f(lp, torch.tensor(LN(0.5))).backward()
    assert float(lp.grad) == pytest.approx(-0.5)


def test_dph_rehearsal_collects_pi0_samples_and_penalises_drift():
    model = tiny_model()
    ctx = make_ctx(model)
    r = make_rollouts(["Q: 1+1?"] * 2 + ["Q: 5+5?"] * 2, ["2", "2", "10", "9"], [0, 0, 1, 1], rewards=[1.0, 1.0, 1.0, 0.0])
    r.behavior_logp = completion_forward(model, r.prompt_ids, r.prompt_mask, r.completion_ids)["logp"] * r.completion_mask
    dph = DPHRehearsal(solved_k=2, rehearsal_batch_size=2)
    assert set(declared(dph, "requires")) == {"rewards", "behavior_logp"}
    annotated(dph, r, ctx)
    assert len(dph.buffer) == 1 and dph.buffer[0]["completion"] == CharTokenizer().encode("2")  # group 1 not solved
    out = PolicyOutputs(logp=torch.zeros(4, 2, requires_grad=True))
    loss, metrics = dph(out, r)
    assert float(metrics["dph/rehearsal_divergence"]) == pytest.approx(0.0, abs=1e-6)  # π_θ = π0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, metrics = dph(out, r)
    assert float(metrics["dph/rehearsal_divergence"]) > 0
    (loss * r.completion_mask).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    annotated(dph, r, ctx)  # collect_steps = 1: no more collection
    assert len(dph.buffer) == 1
    resumed = DPHRehearsal()
    resumed.load_state_dict(copy.deepcopy(dph.state_dict()))
    assert resumed.buffer == dph.buffer and resumed.steps_seen == 2


def test_dph_empty_buffer_and_bad_params():
    dph = DPHRehearsal()
    r = make_rollouts(["p"], ["a"], [0], rewards=[0.0])
    loss, _ = dph(PolicyOutputs(logp=torch.zeros(1, 1)), r)
    assert loss.abs().sum() == 0
    with pytest.raises(ValueError, match="divergence"):
        DPHRehearsal(divergence="reverse_kl")
    with pytest.raises(ValueError, match="alpha"):
        DPHRehearsal(divergence="alpha", alpha=1.5)
    with pytest.raises(ValueError, match="behavior_logp"):
        dph.annotate(r, make_ctx(tiny_model()))


# -- FG-ExPO AKL ----------------------------------------------------------------------------------------


def test_akl_t1_t2_beta_schedule():
    assert akl_beta(0.5, beta_min=0.0, beta_max=0.002) == pytest.approx(0.001)
    values = [akl_beta(a) for a in torch.linspace(0, 1, 11).tolist()]
    assert all(b > a for a, b in zip(values, values[1:])) and 0.0 <= values[0] and values[-1] <= 0.002


def test_akl_regularizer_uses_the_whole_batch_accuracy():
    reg = AccuracyConditionedKL(beta_max=0.002)
    assert set(declared(reg, "requires")) == {"rewards", "akl_batch_accuracy", "ref_logp"}
    assert "ref_logp" not in declared(AccuracyConditionedKL(beta_max=0.0), "requires")
    r = make_rollouts(["p"] * 4, ["a"] * 4, [0] * 4, rewards=[1.0, 1.0, 0.0, 0.0])
    r.ref_logp = torch.full((4, 1), -1.0)
    r = annotated(reg, r, make_ctx(None))
    assert r.extras["akl_batch_accuracy"] == 0.5
    micro = r.select([0])  # a micro-batch of one correct row still uses the batch's accuracy
    loss, metrics = reg(PolicyOutputs(logp=torch.full((1, 1), -0.5)), micro)
    k3 = math.exp(-0.5) - 1 + 0.5
    assert float(metrics["akl/beta"]) == pytest.approx(0.001)
    torch.testing.assert_close(loss, torch.full((1, 1), 0.001 * k3))
    with pytest.raises(ValueError, match="beta_max"):
        AccuracyConditionedKL(beta_min=1.0, beta_max=0.5)


def test_akl_without_its_annotation_or_reference_is_a_clear_error():
    reg = AccuracyConditionedKL()
    r = make_rollouts(["p"], ["a"], [0], rewards=[1.0])
    with pytest.raises(ValueError, match="akl_batch_accuracy"):
        reg(PolicyOutputs(logp=torch.zeros(1, 1)), r)
    r = annotated(reg, r, make_ctx(None))
    with pytest.raises(ValueError, match="ref_logp"):
        reg(PolicyOutputs(logp=torch.zeros(1, 1)), r)


# -- PAPO -----------------------------------------------------------------------------------------------


def _papo_batch(lp, aug):
    r = make_rollouts(["p"], ["a"], [0], rewards=[1.0])
    r.extras["papo_aug_logp"] = torch.tensor([[aug]])
    return r, PolicyOutputs(logp=torch.tensor([[lp]], requires_grad=True))


def test_papo_t1_perception_term():
    r, out = _papo_batch(-1.0, -2.0)
    loss, metrics = PAPORegularizer(gamma=0.02)(out, r)
    assert float(metrics["papo/kl_prcp"]) == pytest.approx(0.367879, abs=1e-6)
    assert float(loss.detach()) == pytest.approx(-0.007358, abs=1e-6)


def test_papo_t2_equal_inputs_give_zero():
    r, out = _papo_batch(-1.3, -1.3)
    loss, _ = PAPORegularizer(gamma=0.02)(out, r)
    assert float(loss.detach()) == 0.0


def test_papo_t3_larger_gap_lowers_the_loss():
    losses = [float(PAPORegularizer(gamma=0.02)(*reversed(_papo_batch(-1.0, aug)))[0].detach()) for aug in (-1.1, -1.5, -2.5)]
    assert losses[0] > losses[1] > losses[2]


def test_papo_double_entropy_clip_schedule_and_annotate():
    r, out = _papo_batch(-1.0, -2.0)
    loss, _ = PAPORegularizer(gamma=0.0, eta_aug=0.03, eta_ori=0.03)(out, r)
    assert float(loss.detach()) == pytest.approx(0.03 * 1.0 + 0.03 * 2.0)
    loss, _ = PAPORegularizer(gamma=1.0, kl_clip=0.2)(out, r)
    assert float(loss.detach()) == pytest.approx(-0.2)
    papo = PAPORegularizer(gamma=0.02, gamma_end=0.0, annealing_ratio=0.5, total_steps=20)
    papo.steps = 5
    assert papo.gamma == pytest.approx(0.01) and PAPORegularizer(gamma=0.02).gamma == 0.02
    with pytest.raises(ValueError, match="total_steps"):
        PAPORegularizer(gamma_end=0.0).gamma  # no horizon yet
    from_run = PAPORegularizer(gamma=0.02, gamma_end=0.0, annealing_ratio=0.5)
    from_run.annotate(make_rollouts(["Q"], ["4"], [0], rewards=[1.0]),
                      dataclasses.replace(make_ctx(tiny_model()), total_steps=20))
    from_run.steps = 5
    assert from_run.total_steps == 20 and from_run.gamma == pytest.approx(0.01)  # the run's train.steps
    ctx = make_ctx(tiny_model())
    batch = make_rollouts(["Q: 12 + 30?"] * 2, ["42", "4"], [0, 0], rewards=[1.0, 0.0])
    assert annotated(PAPORegularizer(), batch, ctx).extras["papo_aug_logp"].shape == (2, 2)
    entropy_only = PAPORegularizer(gamma=0.0, eta_ori=0.06)  # VPPO's entropy penalty: no corrupted pass
    assert declared(entropy_only, "provides") == () and "papo_aug_logp" not in annotated(entropy_only, batch, ctx).extras
    with pytest.raises(ValueError, match="annotate"):
        PAPORegularizer()(PolicyOutputs(logp=torch.zeros(2, 2)), batch)


def test_papo_resume_gives_the_same_schedule_and_corruption():
    ctx = make_ctx(tiny_model())
    batch = make_rollouts(["Q: 12 + 30?"] * 2, ["42", "4"], [0, 0], rewards=[1.0, 0.0])
    first = PAPORegularizer(gamma=0.02, gamma_end=0.0, total_steps=10, seed=1)
    first.annotate(batch, ctx)
    first.after_step({})
    state = copy.deepcopy(first.state_dict())
    a = first.annotate(batch, ctx)
    second = PAPORegularizer(gamma=0.02, gamma_end=0.0, total_steps=10, seed=7)
    second.load_state_dict(state)
    b = second.annotate(batch, ctx)
    assert second.gamma == first.gamma == pytest.approx(0.018)
    torch.testing.assert_close(b["papo_aug_logp"], a["papo_aug_logp"])


# -- the recipes chain ----------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["siren", "dph_rl", "fg_expo", "papo", "vppo"])
def test_recipes_of_the_seed_regularizers_chain(recipe):
    parts = build_components(load_recipe(recipe))
    names = [n.where for n in parts.plan.prepare]
    assert any(w.startswith("algorithm.regularizers") for w in names), names  # their annotate hooks run
