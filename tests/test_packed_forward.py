"""The padding-free (packed) training forward: layout by hand, and the padded forward's numbers.

Performance issue, deliverable 2 ("padding-free update micro-batches"): the speed must not change
what is computed, so logp, entropy, hidden states and gradients are compared with the padded forward
in float64, with and without prompt sharing, for rows of different prompt and completion lengths.
"""

import pytest
import torch

from policylab import models
from policylab.rollouts import Rollouts
from policylab.models.forward import completion_lengths, pack, policy_forward, trim

PAD = 0


def _batch() -> Rollouts:
    """Two prompts (lengths 2 and 3, left padded) x 2 completions of lengths 3, 1 | 2, 0 (fully masked)."""
    return Rollouts(
        prompt_ids=torch.tensor([[PAD, 5, 6], [PAD, 5, 6], [7, 8, 9], [7, 8, 9]]),
        prompt_mask=torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]]),
        completion_ids=torch.tensor([[11, 12, 13], [14, PAD, PAD], [15, 16, PAD], [17, 18, PAD]]),
        completion_mask=torch.tensor([[1., 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]]),
        group=torch.tensor([0, 0, 1, 1]), truncated=torch.zeros(4, dtype=torch.bool),
    )


def test_pack_lays_out_each_prompt_once_and_only_real_tokens():
    layout = pack(_batch(), share_prompts=True)
    # prompt 0 | row 0 without its last token | row 1 (one token: nothing fed) | prompt 1 | row 2 minus last
    assert layout.input_ids.tolist() == [[5, 6, 11, 12, 7, 8, 9, 15]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    # row 0's tokens are predicted by the prompt's last state (index 1), then its own states 2, 3
    assert list(zip(layout.rows.tolist(), layout.cols.tolist(), layout.predictor.tolist())) == [
        (0, 0, 1), (0, 1, 2), (0, 2, 3), (1, 0, 1), (2, 0, 6), (2, 1, 7)]
    assert completion_lengths(_batch()).tolist() == [3, 1, 2, 0]


def test_pack_without_sharing_repeats_the_prompt_per_row():
    layout = pack(_batch(), share_prompts=False)
    assert layout.input_ids.tolist() == [[5, 6, 11, 12, 5, 6, 7, 8, 9, 15]]


def test_packed_attention_mask_is_causal_per_segment_plus_own_prompt():
    layout = pack(_batch(), share_prompts=True)
    allowed = (layout.attention_mask(torch.float32, "cpu")[0, 0] == 0).int()
    expected = torch.tensor([
        # 5  6 11 12  7  8  9 15
        [1, 0, 0, 0, 0, 0, 0, 0],  # prompt 0 is causal
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],  # row 0 sees prompt 0 and itself
        [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0],  # prompt 1 sees nothing of group 0
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],  # row 2 sees prompt 1 and itself
    ])
    assert torch.equal(allowed, expected)


def _sampled_batch(model, tok):
    from policylab.rollout.decode import PrunedDecodeEngine
    from policylab.interfaces import Sampling

    torch.manual_seed(0)
    rows = [{"prompt": "1 + 2="}, {"prompt": "13 + 14 + 15 + 16="}, {"prompt": "7="}]
    engine = PrunedDecodeEngine()
    engine.bind(model, tok)
    batch = trim(engine.generate(rows, Sampling(group_size=3, max_new_tokens=7)))
    # the random tiny model never samples EOS: end the rows at different lengths as EOS would have
    for row, length in enumerate([7, 3, 1, 5, 0, 2, 6, 4, 7]):
        batch.completion_mask[row, length:] = 0
    batch.completion_mask[4] = 0  # a fully masked row (e.g. an overlong-filtered one) is skipped, not mis-scored
    return batch


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("share", [False, True])
def test_packed_forward_equals_padded_forward_values_and_gradients(share, attention):
    model, tok = models.load("tiny")
    batch = _sampled_batch(model, tok)
    model = model.double()
    mask = batch.completion_mask.double()
    weights = torch.randn(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def run(packed):
        # reference: the padded forward under sdpa (transformers' eager path gives NaN on fully padded
        # float64 rows); the packed mask is additive, so eager attention must agree with it too
        model.config._attn_implementation = attention if packed else "sdpa"
        model.zero_grad()
        out = policy_forward(model, batch, share_prompts=share, packed=packed, with_hidden=True, temperature=0.7)
        # a loss that uses every output, so every gradient path is compared
        ((out.logp * weights * mask).sum() + (out.entropy * mask).sum() + (out.hidden.sum(-1) * mask).sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return out.logp * mask, out.entropy * mask, out.hidden * mask[..., None], grads

    padded, packed = run(False), run(True)
    # transformers' eager attention takes its softmax in float32, so only sdpa can be compared at float64 precision
    for a, b in zip(padded, packed):
        if attention == "sdpa":
            assert torch.allclose(a, b, atol=1e-10, rtol=1e-10), float((a - b).abs().max())
        else:
            assert (a - b).norm() <= 1e-6 * a.norm(), float((a - b).norm() / a.norm())


def test_packed_forward_of_an_all_masked_batch_still_has_a_graph():
    model, tok = models.load("tiny")
    batch = _sampled_batch(model, tok)
    batch.completion_mask.zero_()
    out = policy_forward(model, batch, packed=True)
    (out.logp * batch.completion_mask).sum().backward()  # an objective's zero loss must stay differentiable


def test_attention_without_block_masks_falls_back_to_the_padded_forward(monkeypatch):
    import policylab.models.forward as forward

    model, tok = models.load("tiny")
    batch = _sampled_batch(model, tok)
    model.config._attn_implementation = "flash_attention_2"  # no 4D mask support: must not be packed
    monkeypatch.setattr(forward, "_packed_forward", lambda *a, **k: pytest.fail("packed forward used"))
    assert not forward.takes_block_mask(model)
    model.config._attn_implementation = "sdpa"  # the padded path itself runs under sdpa here (no flash kernel on CPU)
    monkeypatch.setattr(forward, "takes_block_mask", lambda m: False)
    with torch.no_grad():
        routed, padded = forward.policy_forward(model, batch, packed=True), forward.policy_forward(model, batch, packed=False)
    assert torch.equal(routed.logp, padded.logp)  # the same computation, not just the same shape
