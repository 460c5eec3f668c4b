"""CAPO-curvature (arXiv:2510.00819): predict, per token, the second-order change of the objective and the
KL its last-layer update would cause, and mask the tokens that would leave a local trust region.

Token weights (a 0/1 mask multiplied into any base objective's per-token loss), because the method leaves
the base loss untouched and only removes tokens. The registered ``capo_curvature`` component
(policylab/annotate/output_layer.py) hands the policy's output layer to :class:`CapoCurvature` below in its
``annotate`` hook.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.rollouts import PolicyOutputs, Rollouts


def capo_token_gradients(hidden: Tensor, probs: Tensor, action_onehot: Tensor, adv: Tensor) -> Tensor:
    """G = A * (v outer h), v = e_a - pi: the last-layer gradient of A*log pi(a) over the top-k rows [N,k,H]."""
    v = action_onehot - probs
    return adv[:, None, None] * v[:, :, None] * hidden[:, None, :]


def adam_direction(grad: Tensor, m_rows: Tensor, v_rows: Tensor, step: int, beta1: float, beta2: float, eps: float) -> Tensor:
    """Prospective Adam direction from stored per-row moments: m' = b1*m + (1-b1)*G, v' = b2*v + (1-b2)*G^2,
    D = (m'/(1-b1^(t+1))) / (sqrt(v'/(1-b2^(t+1))) + eps). The stored moments are not changed."""
    m_next = beta1 * m_rows + (1 - beta1) * grad
    v_next = beta2 * v_rows + (1 - beta2) * grad**2
    t = step + 1
    return (m_next / (1 - beta1**t)) / ((v_next / (1 - beta2**t)).sqrt() + eps)


def capo_predictions(grad: Tensor, direction: Tensor, hidden: Tensor, probs: Tensor, action_onehot: Tensor,
                     adv: Tensor, lr: float) -> tuple[Tensor, Tensor]:
    """Predicted objective change and KL of one token's update, each [N].

    u = D h (predicted logit change per unit lr), F = diag(pi) - pi pi^T:
    dJ = lr*<G,D> + 0.5*lr^2*A*((v.u)^2 - u^T F u);  KL = 0.5*lr^2*(v.u)^2.
    """
    v = action_onehot - probs
    u = (direction * hidden[:, None, :]).sum(-1)  # [N,k]
    v_dot_u = (v * u).sum(-1)
    u_fisher_u = (probs * u**2).sum(-1) - (probs * u).sum(-1) ** 2
    first_order = (grad * direction).sum((-1, -2))
    delta_j = lr * first_order + 0.5 * lr**2 * adv * (v_dot_u**2 - u_fisher_u)
    kl = 0.5 * lr**2 * v_dot_u**2
    return delta_j, kl


def capo_keep_mask(delta_j: Tensor, kl: Tensor, tau_hessian: float, tau_fisher: float, symmetric: bool = True) -> Tensor:
    """Keep iff -tau_H < dJ < tau_H (non-symmetric: 0 <= dJ < tau_H) and KL < tau_F."""
    hessian_ok = (delta_j.abs() < tau_hessian) if symmetric else ((delta_j >= 0) & (delta_j < tau_hessian))
    return hessian_ok & (kl < tau_fisher)


class CapoCurvature:
    """CAPO-curvature token mask (arXiv:2510.00819, token level, exact from the released code): keep a
    token iff the predicted change of the objective of its last-layer update, dJ = lr·<G,D> +
    ½·lr²·A·((v·u)² − uᵀFu), lies within ±tau_hessian (non-symmetric: [0, tau_hessian)) and its predicted
    KL ½·lr²·(v·u)² is below tau_fisher (G = A·(e_a − π)⊗h, D = the optimizer model's direction, u = D h).

    Needs the final hidden states (``needs_hidden``) and the output layer (``bind_output_layer``, with the
    temperature the training forward divides by); per valid token it forms the top-k truncated softmax
    of h W^T, the token's last-layer gradient G, the direction D (``optimizer_model``: "adam" with
    per-vocabulary-row moments, or "sgd": D = G) and both predictions. ``after_step`` updates the optimizer
    model with the kept tokens' gradients, averaged per vocabulary row, and t += 1. ``lr`` must be set to the
    recipe optimizer's lr (the stage context does not carry it; the first call raises without it); an
    ``lr`` in the step metrics given to ``after_step`` (the scheduler's) replaces it. Pair with the seq-mean-token-mean aggregation (the
    paper's per-sequence token mean). Sentence- and batch-level variants are not implemented.
    """

    needs_hidden = True

    def __init__(self, tau_hessian: float = 0.01, tau_fisher: float = 1e-4, symmetric: bool = True,
                 optimizer_model: str = "adam", lr: float | None = None, top_k: int = 50, adam_beta1: float = 0.9,
                 adam_beta2: float = 0.999, adam_eps: float = 1e-8, chunk_tokens: int = 64):
        if optimizer_model not in ("adam", "sgd"):
            raise ValueError(f"capo_curvature optimizer_model must be 'adam' or 'sgd', got {optimizer_model!r}")
        if top_k < 1 or chunk_tokens < 1:
            raise ValueError("capo_curvature top_k and chunk_tokens must be >= 1")
        if lr is not None and lr <= 0:
            raise ValueError(f"capo_curvature needs lr > 0, got {lr}")
        self.tau_hessian, self.tau_fisher, self.symmetric = tau_hessian, tau_fisher, symmetric
        self.optimizer_model, self.lr, self.top_k, self.chunk = optimizer_model, lr, top_k, chunk_tokens
        self.betas, self.adam_eps = (adam_beta1, adam_beta2), adam_eps
        self.output_weight: Tensor | None = None
        self.output_bias: Tensor | None = None
        self.temperature = 1.0  # the training forward divides logits by the sampling temperature
        self.m: Tensor | None = None  # [V,H] first moments of the optimizer model
        self.v: Tensor | None = None  # [V,H] second moments
        self.step = 0
        self._grad_sum: Tensor | None = None
        self._grad_count: Tensor | None = None

    # -- hooks -------------------------------------------------------------------------------------
    def bind_output_layer(self, weight: Tensor, bias: Tensor | None = None, temperature: float = 1.0) -> None:
        """The policy's output layer (logits = h W^T + b) and the temperature the training forward divides by."""
        self.output_weight, self.output_bias = weight, bias
        self.temperature = float(temperature) if temperature > 0 else 1.0

    def after_step(self, metrics: dict | None = None) -> None:
        if metrics and "lr" in metrics:
            self.lr = float(metrics["lr"])
        if self.optimizer_model != "adam" or self._grad_sum is None:
            return
        touched = self._grad_count > 0
        mean_grad = self._grad_sum[touched] / self._grad_count[touched][:, None]
        b1, b2 = self.betas
        self.m[touched] = b1 * self.m[touched] + (1 - b1) * mean_grad
        self.v[touched] = b2 * self.v[touched] + (1 - b2) * mean_grad**2
        self.step += 1
        self._grad_sum, self._grad_count = None, None

    def state_dict(self) -> dict:
        return {"m": self.m, "v": self.v, "step": self.step, "lr": self.lr}

    def load_state_dict(self, state: dict) -> None:
        self.m, self.v, self.step, self.lr = state["m"], state["v"], int(state["step"]), state["lr"]

    # -- the mask ----------------------------------------------------------------------------------
    def _top_k(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k logits (h W^T + b) / temperature and their ids."""
        if self.output_weight is None:
            raise ValueError("capo_curvature needs the output embedding: its annotate(rollouts, ctx) must run first")
        logits = hidden @ self.output_weight.detach().float().T
        if self.output_bias is not None:
            logits = logits + self.output_bias.detach().float()
        logits = logits / self.temperature
        k = min(self.top_k, logits.shape[-1])
        return logits.topk(k, dim=-1)

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        if out.hidden is None:
            raise ValueError("capo_curvature needs PolicyOutputs.hidden (needs_hidden = True)")
        if self.lr is None:
            raise ValueError("capo_curvature needs lr: set it to the recipe optimizer's lr (token weights cannot read the optimizer)")
        mask = batch.completion_mask
        adv_tok = batch.seq_advantages()
        valid = (mask > 0).nonzero(as_tuple=True)
        keep = torch.zeros_like(mask, dtype=torch.bool)
        delta_j_all, kl_all = [], []
        with torch.no_grad():
            hidden_all = out.hidden.detach().float()[valid]
            for start in range(0, hidden_all.shape[0], self.chunk):
                rows = (valid[0][start:start + self.chunk], valid[1][start:start + self.chunk])
                hidden = hidden_all[start:start + self.chunk]
                top_logits, top_ids = self._top_k(hidden)
                probs = torch.softmax(top_logits, dim=-1)
                onehot = (top_ids == batch.completion_ids[rows][:, None]).float()
                adv = adv_tok[rows].float()
                grad = capo_token_gradients(hidden, probs, onehot, adv)
                direction = grad if self.optimizer_model == "sgd" else self._adam_direction(grad, top_ids)
                delta_j, kl = capo_predictions(grad, direction, hidden, probs, onehot, adv, self.lr)
                kept = capo_keep_mask(delta_j, kl, self.tau_hessian, self.tau_fisher, self.symmetric)
                keep[rows] = kept
                delta_j_all.append(delta_j)
                kl_all.append(kl)
                if self.optimizer_model == "adam":
                    self._accumulate(grad[kept], top_ids[kept])
        n_valid = mask.sum().clamp(min=1)
        delta_j = torch.cat(delta_j_all) if delta_j_all else torch.zeros(1)
        kl = torch.cat(kl_all) if kl_all else torch.zeros(1)
        hess_masked = ~capo_keep_mask(delta_j, torch.zeros_like(kl), self.tau_hessian, float("inf"), self.symmetric)
        metrics = {
            "capo/masked": 1 - keep.float().sum() / n_valid,
            "capo/masked_hessian": hess_masked.float().sum() / n_valid,
            "capo/masked_fisher": (kl >= self.tau_fisher).float().sum() / n_valid,
            "capo/delta_j_abs": delta_j.abs().mean(),
            "capo/kl": kl.mean(),
        }
        return keep.to(out.logp.dtype), metrics

    def _adam_direction(self, grad: Tensor, ids: Tensor) -> Tensor:
        self._ensure_state(grad.shape[-1], grad.device)
        return adam_direction(grad, self.m[ids], self.v[ids], self.step, *self.betas, self.adam_eps)

    def _ensure_state(self, hidden_size: int, device) -> None:
        if self.m is not None and self.m.device != torch.device(device):  # e.g. restored from a CPU checkpoint
            self.m, self.v = self.m.to(device), self.v.to(device)
        if self.m is None:
            vocab = self.output_weight.shape[0] if self.output_weight is not None else None
            if vocab is None:
                raise ValueError("capo_curvature's adam optimizer model needs the vocabulary size (run its annotate first)")
            self.m = torch.zeros(vocab, hidden_size, device=device)
            self.v = torch.zeros(vocab, hidden_size, device=device)

    def _accumulate(self, grad: Tensor, ids: Tensor) -> None:
        if self._grad_sum is None:
            self._grad_sum = torch.zeros_like(self.m)
            self._grad_count = torch.zeros(self.m.shape[0], device=self.m.device)
        flat_ids = ids.reshape(-1)
        self._grad_sum.index_add_(0, flat_ids, grad.reshape(-1, grad.shape[-1]))
        self._grad_count.index_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=self._grad_count.dtype))

