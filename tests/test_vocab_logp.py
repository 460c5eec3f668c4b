"""The hand-written backward of the vocabulary log-prob/entropy (models/vocab.py) against autograd."""

import pytest
import torch
import torch.nn.functional as F

from policylab.models.vocab import VocabLogpEntropy, token_logp_entropy


def _reference(hidden, weight, bias, targets, temperature):
    logits = F.linear(hidden, weight, bias) / temperature
    log_probs = torch.log_softmax(logits, -1)
    return log_probs.gather(-1, targets[..., None]).squeeze(-1), -(log_probs.exp() * log_probs).sum(-1)


def _inputs(bias: bool):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    targets = torch.randint(0, 11, (2, 5), generator=g)
    return hidden, weight, b, targets


@pytest.mark.parametrize("save_logits", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_equal_autograd(save_logits, bias, temperature):
    hidden, weight, b, targets = _inputs(bias)
    g = torch.Generator().manual_seed(1)
    w_logp, w_ent = torch.randn(2, 5, dtype=torch.float64, generator=g), torch.randn(2, 5, dtype=torch.float64, generator=g)
    params = [hidden, weight] + ([b] if bias else [])

    def grads(fn):
        logp, ent = fn(hidden, weight, b, targets, temperature)
        out = torch.autograd.grad((logp * w_logp).sum() + (ent * w_ent).sum(), params)
        return logp.detach(), ent.detach(), out

    mine = grads(lambda *a: VocabLogpEntropy.apply(*a, save_logits))
    ref = grads(_reference)
    assert torch.allclose(mine[0], ref[0]) and torch.allclose(mine[1], ref[1])
    for a, r in zip(mine[2], ref[2]):
        assert torch.allclose(a, r, atol=1e-12)


def test_gradcheck_logp_only_and_entropy_only():
    hidden, weight, b, targets = _inputs(True)
    # each output alone: the other arrives as None in backward, which must not be read as zero-by-accident
    assert torch.autograd.gradcheck(lambda h, w, bb: VocabLogpEntropy.apply(h, w, bb, targets, 0.9, True)[0], (hidden, weight, b))
    assert torch.autograd.gradcheck(lambda h, w, bb: VocabLogpEntropy.apply(h, w, bb, targets, 0.9, False)[1], (hidden, weight, b))


def test_chunking_and_budget_do_not_change_results():
    hidden, weight, b, targets = _inputs(False)
    head = torch.nn.Linear(8, 11, bias=False, dtype=torch.float64)
    head.weight = torch.nn.Parameter(weight.detach().clone())
    results = []
    for chunk, budget in [(128, 1 << 30), (2, 1 << 30), (3, 0)]:
        head.zero_grad()
        h = hidden.detach().clone().requires_grad_()
        logp, ent = token_logp_entropy(h, head, targets, temperature=0.8, chunk=chunk, save_budget_bytes=budget)
        (logp.sum() + 0.3 * ent.sum()).backward()
        results.append((logp.detach(), ent.detach(), h.grad, head.weight.grad.clone()))
    for other in results[1:]:
        for a, r in zip(results[0], other):
            assert torch.allclose(a, r, atol=1e-12)
