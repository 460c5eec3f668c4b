"""Loss aggregation modes (objectives.md §0 "Loss aggregation", §1.2 Dr. GRPO; advantages_rewards.md §0, A2 T2)."""

from __future__ import annotations

import pytest
import torch

from policylab import registry
from policylab.rollouts import Normaliser


def agg(name, loss, mask, max_len, **params):
    return float(registry.build("aggregate", name, params)(loss * mask, mask, Normaliser.of(mask, max_len)))


def spec_example():
    """Two sequences with per-token losses [1,3] and [0,0,0,4], T_max = 4 (objectives.md §0)."""
    loss = torch.tensor([[1.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    return loss, mask


@pytest.mark.parametrize(
    "name, params, expected",
    [
        ("token-mean", {}, 8 / 6),
        ("seq-mean-token-mean", {}, 1.5),
        ("seq-mean-token-sum", {}, 4.0),
        ("seq-mean-token-sum-norm", {"norm_constant": "max_len"}, 2.0),  # verl: C = T_max
        ("seq-mean-token-sum-norm", {"norm_constant": "batch_x_max_len"}, 1.0),  # TRL dr_grpo: C = B * T_max
        ("seq-mean-token-sum-norm", {}, 1.0),  # library default = TRL's
    ],
)
def test_spec_numeric_example(name, params, expected):
    loss, mask = spec_example()
    assert agg(name, loss, mask, 4, **params) == pytest.approx(expected, abs=1e-5)
    assert round(agg("token-mean", loss, mask, 4), 5) == 1.33333


def test_padding_values_under_the_mask_are_ignored():
    loss, mask = spec_example()
    noisy = loss + 100.0 * (1 - mask)  # garbage on padding positions
    for name in registry.names("aggregate"):
        assert agg(name, noisy, mask, 4) == pytest.approx(agg(name, loss, mask, 4))


def test_dr_grpo_advantages_spec_A2_T2():
    """l = 1 on every valid token, lengths 2 and 4, T_norm = 8 -> (2+4)/(2*8) = 0.375; seq-mean-token-mean 1.0."""
    mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1]])
    loss = torch.ones(2, 4)
    assert agg("seq-mean-token-sum-norm", loss, mask, 8, norm_constant="batch_x_max_len") == pytest.approx(0.375)
    assert agg("seq-mean-token-mean", loss, mask, 8) == pytest.approx(1.0)


def duplicate_tokens_of_row(loss, mask, row):
    """Every trained token of ``row`` appears twice (same per-token loss); other rows unchanged."""
    width = 2 * loss.shape[1]
    new_loss = torch.zeros(loss.shape[0], width)
    new_mask = torch.zeros(loss.shape[0], width)
    for i in range(loss.shape[0]):
        n = int(mask[i].sum())
        values = loss[i, :n].repeat_interleave(2) if i == row else loss[i, :n]
        new_loss[i, : values.numel()] = values
        new_mask[i, : values.numel()] = 1.0
    return new_loss, new_mask


@pytest.mark.parametrize("norm_constant", ["batch_x_max_len", "max_len"])
def test_dr_grpo_length_linearity(norm_constant):
    """§1.2: doubling a response's tokens doubles its contribution under Dr.GRPO, not under seq-mean-token-mean."""
    loss = torch.tensor([[0.5, -1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])  # row 1 has zero loss: the total is row 0's contribution
    long_loss, long_mask = duplicate_tokens_of_row(loss, mask, 0)
    max_len = 16  # constant, covers the longer batch
    before = agg("seq-mean-token-sum-norm", loss, mask, max_len, norm_constant=norm_constant)
    after = agg("seq-mean-token-sum-norm", long_loss, long_mask, max_len, norm_constant=norm_constant)
    assert before != 0
    assert after == pytest.approx(2 * before)
    assert agg("seq-mean-token-mean", long_loss, long_mask, max_len) == pytest.approx(
        agg("seq-mean-token-mean", loss, mask, max_len)
    )


def test_dr_grpo_normaliser_is_constant():
    """§1.2: an unrelated (zero-loss) sequence growing longer does not change the Dr.GRPO loss; token-mean does change."""
    loss = torch.tensor([[1.0, 3.0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    short = torch.tensor([[1.0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    longer = torch.tensor([[1.0, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    for norm_constant in ("batch_x_max_len", "max_len"):
        a = agg("seq-mean-token-sum-norm", loss, short, 8, norm_constant=norm_constant)
        b = agg("seq-mean-token-sum-norm", loss, longer, 8, norm_constant=norm_constant)
        assert a == pytest.approx(b)
    assert agg("seq-mean-token-sum-norm", loss, short, 8) == pytest.approx(4 / (2 * 8))
    assert agg("token-mean", loss, short, 8) != pytest.approx(agg("token-mean", loss, longer, 8))


def test_fully_masked_sequences_do_not_count_as_sequences():
    loss = torch.tensor([[1.0, 3.0], [5.0, 5.0], [2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    assert agg("seq-mean-token-mean", loss, mask, 2) == pytest.approx((2.0 + 2.0) / 2)
    assert agg("seq-mean-token-sum", loss, mask, 2) == pytest.approx((4.0 + 2.0) / 2)
    assert agg("token-mean", loss, mask, 2) == pytest.approx(6.0 / 3)


def test_empty_mask_gives_zero_not_nan():
    loss = torch.ones(2, 3)
    mask = torch.zeros(2, 3)
    for name in registry.names("aggregate"):
        value = agg(name, loss, mask, 3)
        assert value == 0.0, f"{name} on an all-masked batch gave {value}"


@pytest.mark.parametrize("name", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_micro_batches_with_the_global_normaliser_sum_to_the_full_loss(name):
    gen = torch.Generator().manual_seed(0)
    loss = torch.randn(5, 4, generator=gen)
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]])
    fn = registry.build("aggregate", name)
    norm = Normaliser.of(mask, 6)
    full = fn(loss * mask, mask, norm)
    parts = [[0, 3], [1], [2, 4]]
    summed = sum(fn(loss[p] * mask[p], mask[p], norm) for p in parts)
    assert float(summed) == pytest.approx(float(full), abs=1e-6)
    # the local normaliser (TRL 'bnpo') is partition dependent: the global one is needed for token-mean
    if name == "token-mean":
        local = sum(fn(loss[p] * mask[p], mask[p], Normaliser.of(mask[p], 6)) for p in parts)
        assert float(local) != pytest.approx(float(full), abs=1e-6)


def test_normaliser_counts():
    mask = torch.tensor([[1.0, 1, 0], [0, 0, 0], [1, 1, 1]])
    norm = Normaliser.of(mask, 7)
    assert (norm.num_tokens, norm.num_seqs, norm.batch_size, norm.max_len) == (5.0, 2.0, 3.0, 7.0)
    empty = Normaliser.of(torch.zeros(2, 3), 3)
    assert empty.num_tokens >= 1 and empty.num_seqs >= 1  # never a division by zero


def test_unknown_norm_constant_is_a_clear_error():
    loss, mask = spec_example()
    with pytest.raises(ValueError, match="norm_constant"):
        agg("seq-mean-token-sum-norm", loss, mask, 4, norm_constant="batch_max")
