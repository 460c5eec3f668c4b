"""Log-probs and entropies of sampled tokens through the vocabulary projection, with a hand-written
backward.

The projection to the vocabulary is the widest tensor of the update ([tokens, V] fp32, V = 49152 for
SmolLM2). Autograd through logsumexp/gather/exp keeps several such tensors per token, and
activation checkpointing of the chunk (the earlier approach) pays the projection's forward twice.
``VocabLogpEntropy`` keeps one [tokens, V] tensor (the tempered logits) and forms the gradient
directly:

    z = (h W^T + b) / T,  logp_y = z_y - logsumexp(z),  H = -sum_v p_v log p_v
    d logp_y / d z_v = 1[v = y] - p_v            d H / d z_v = -p_v (log p_v + H)

When the logits of the whole call (all chunks of a micro-batch) would exceed ``save_budget_bytes``,
each chunk saves only its hidden states and recomputes its logits in backward (the checkpointing
behaviour), so memory stays bounded for long sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _tempered_logits(hidden, weight, bias, temperature: float) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias)
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits  # softmax at >= fp32
    return logits.div_(temperature) if temperature != 1.0 else logits


class VocabLogpEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, save_logits: bool):
        logits = _tempered_logits(hidden, weight, bias, temperature)
        log_z = torch.logsumexp(logits, dim=-1)
        logp = logits.gather(-1, targets[..., None]).squeeze(-1) - log_z
        entropy = log_z - (torch.exp(logits - log_z[..., None]) * logits).sum(-1)  # reuses log_z: no second softmax
        ctx.set_materialize_grads(False)
        ctx.temperature, ctx.save_logits = temperature, save_logits
        ctx.save_for_backward(hidden, weight, bias, targets, logits if save_logits else None, log_z, entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, logits, log_z, entropy = ctx.saved_tensors
        if logits is None:
            with torch.no_grad():
                logits = _tempered_logits(hidden, weight, bias, ctx.temperature)
        log_probs = logits - log_z[..., None]
        probs = log_probs.exp()
        grad = probs * -grad_logp[..., None].to(probs.dtype) if grad_logp is not None else torch.zeros_like(probs)
        if grad_entropy is not None:
            grad.sub_(log_probs.add_(entropy[..., None]).mul_(probs).mul_(grad_entropy[..., None].to(probs.dtype)))
        if grad_logp is not None:
            grad.scatter_add_(-1, targets[..., None], grad_logp[..., None].to(probs.dtype))
        if ctx.temperature != 1.0:
            grad = grad / ctx.temperature
        grad = grad.to(weight.dtype)
        flat_grad, flat_hidden = grad.reshape(-1, grad.shape[-1]), hidden.reshape(-1, hidden.shape[-1])
        grad_hidden = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = flat_grad.T @ flat_hidden if ctx.needs_input_grad[1] else None
        grad_bias = flat_grad.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None, None


def token_logp_entropy(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor, *, temperature: float = 1.0,
                       chunk: int = 128, save_budget_bytes: int = 1 << 30) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp [B,T], entropy [B,T]) of ``targets`` from hidden states [B,T,H] that predict them, chunk by chunk."""
    weight, bias = lm_head.weight, lm_head.bias
    save_logits = hidden.shape[0] * hidden.shape[1] * weight.shape[0] * 4 <= save_budget_bytes
    logps, entropies = [], []
    for start in range(0, targets.shape[1], chunk):
        h, y = hidden[:, start:start + chunk], targets[:, start:start + chunk]
        lp, ent = VocabLogpEntropy.apply(h, weight, bias, y, temperature, save_logits)
        logps.append(lp)
        entropies.append(ent)
    return torch.cat(logps, dim=1), torch.cat(entropies, dim=1)
