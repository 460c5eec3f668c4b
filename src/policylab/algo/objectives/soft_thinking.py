"""Soft / latent reasoning policies. Pure math only; nothing here is registered.

SofT-GRPO — implemented as functions, NOT as a recipe, because the rollout engine cannot run it:
during the thinking phase each step must feed the model a *soft* input embedding (a Gumbel-softmax mixture
of the top-k token embeddings) instead of a sampled token, and the training forward must feed the same
embeddings back. What is missing, precisely:
  1. a rollout engine that, per thinking step, takes the top-k/top-p renormalised probabilities, draws clamped
     Gumbel noise, stores (top-k ids, y values) per position, and feeds ``inputs_embeds`` = the mixture
     (:func:`soft_token_inputs`) instead of token ids until the thinking-end token, then samples discretely
     (transformers ``generate`` samples discrete ids only; this needs a custom decode loop or the patched SGLang);
  2. Rollouts fields for those per-position ids/y [B,T,k] and a soft/discrete flag [B,T] (extras would do);
  3. a training forward that builds ``inputs_embeds`` from the stored mixtures at soft positions and returns the
     current logits (or their top-k slice) there, so :func:`soft_token_logprob` can replace the sampled-token
     log-prob; PolicyOutputs carries only sampled-token log-probs today.
With those, the loss is the ordinary ``ppo_clip`` on the mixed log-probs (+ k3 KL, token-mean).

Latent-GRPO — outline only, no component: it needs a latent-chain reasoning model (a Latent-SFT
checkpoint whose thinking is a superposition of embeddings) and its latent rollout engine; for plain text LLMs
there is nothing to optimise. Its reusable pieces are an advantage mask for invalid latent samples and the
soft-position log-prob of SofT-GRPO (:func:`soft_token_logprob`).

DePO — outline only, no component: it interleaves text tokens with continuous *visual* latent states in
a multimodal model; the latent-position PPO term and the von Mises–Fisher KL have no counterpart in a text-only
model. The reusable pattern (separate clip ranges per token type) is a token-type mask on ``ppo_clip``.
"""

from __future__ import annotations

import torch
from torch import Tensor

GUMBEL_MIN, GUMBEL_MAX = -1.5, 3.0
PROB_EPS = 1e-6
VALID_LOG_Q = -3.0  # components with log q <= -3 are ignored in the soft log-prob


def clamped_gumbel(shape, generator: torch.Generator | None = None) -> Tensor:
    """g ~ Gumbel(0, 1), clamped to [-1.5, 3] as in the rollout sampler (SofT-GRPO)."""
    u = torch.rand(shape, generator=generator).clamp(1e-10, 1 - 1e-10)
    return (-torch.log(-torch.log(u))).clamp(GUMBEL_MIN, GUMBEL_MAX)


def soft_token_inputs(probs_topk: Tensor, gumbel: Tensor, *, noise_factor: float = 1.0,
                      gumbel_temperature: float = 0.1) -> tuple[Tensor, Tensor]:
    """Rollout side of SofT-GRPO: y_i = log(p_i + 1e-6) + noise_factor * g_i, mixture weights w = softmax(y / tau_g).

    ``probs_topk`` [..., k] are the renormalised top-k probabilities; returns (y [..., k], w [..., k]).
    """
    y = torch.log(probs_topk + PROB_EPS) + noise_factor * gumbel.clamp(GUMBEL_MIN, GUMBEL_MAX)
    return y, torch.softmax(y / gumbel_temperature, dim=-1)


def mix_embeddings(weights: Tensor, topk_ids: Tensor, embedding: Tensor) -> Tensor:
    """e = sum_i w_i * E[id_i]: the soft input embedding [..., H] from weights/ids [..., k] and E [V, H]."""
    return (weights[..., None] * embedding[topk_ids]).sum(-2)


def soft_token_logprob(logits: Tensor, topk_ids: Tensor, y: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Training side of SofT-GRPO: log-density of the stored perturbed values y under the current policy.

    q_i = softmax(logits / T)[id_i] renormalised over the k stored ids; lq_i = log(q_i + 1e-6);
    z_i = clip(y_i - lq_i, -1.5, 3); phi_i = -z_i - exp(-z_i) (Gumbel log-density, location lq_i);
    logp_soft = mean of phi_i over components with lq_i > -3 (0 if none). logits [..., V], ids/y [..., k].
    """
    probs = torch.softmax(logits / temperature, dim=-1).gather(-1, topk_ids)
    q = probs / probs.sum(-1, keepdim=True).clamp(min=1e-30)
    log_q = torch.log(q + PROB_EPS)
    z = (y - log_q).clamp(GUMBEL_MIN, GUMBEL_MAX)
    phi = -z - torch.exp(-z)
    valid = (log_q > VALID_LOG_Q).to(phi.dtype)
    return (phi * valid).sum(-1) / valid.sum(-1).clamp(min=1)


def mixed_logprobs(token_logp: Tensor, soft_logp: Tensor, is_soft: Tensor) -> Tensor:
    """Per-position log-prob fed to PPO-clip: the soft log-density at thinking positions, the usual token
    log-prob at discrete ones (SofT-GRPO)."""
    return torch.where(is_soft, soft_logp, token_logp)
