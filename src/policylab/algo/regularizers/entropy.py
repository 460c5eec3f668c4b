"""The policy's entropy as a loss term: the entropy bonus (fixed or adaptive coefficient) and SIREN's
selective entropy penalty (nucleus entropy on each response's peak-entropy tokens, anchored).

SIREN re-applies the policy's output layer to the training forward's hidden states; the registered
``siren`` component (policylab/annotate/output_layer.py) hands that layer over in its ``annotate`` hook and
uses :class:`SelectiveEntropyPenalty` below for the math.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from policylab.algo.objectives.policy_gradient import masked_mean
from policylab.algo.regularizers.scalar_penalty import check_aggregate, max_len_of, needs_max_len, spread_scalar
from policylab.registry import register
from policylab.rollouts import PolicyOutputs, Rollouts


def token_entropy_from_logits(logits: Tensor) -> Tensor:
    """H = logsumexp(z) - sum_v softmax(z)_v z_v."""
    logz = torch.logsumexp(logits, dim=-1)
    p = torch.softmax(logits, dim=-1)
    return logz - (p * logits).sum(-1)


@register("regularizer", "entropy", spec="arXiv:2505.22312 (adaptive entropy control); fixed bonus: verl entropy_coeff")
class EntropyBonus:
    """Entropy bonus: −c·H per token, H the training forward's token entropy (with grad).

    Adaptive (Skywork-OR1, arXiv:2505.22312; TRL ``use_adaptive_entropy``): after each optimizer step
    c <- clip(c + delta·(1 if H < target else −1), c_min, c_max), and the bonus applies only while the mean
    H <= target.
    """

    needs_entropy_grad = True

    def __init__(self, coef: float = 0.001, adaptive: bool = False, target: float = 0.2, delta: float = 0.005,
                 coef_min: float = 0.0, coef_max: float = 1.0):
        self.coef, self.adaptive, self.target, self.delta = coef, adaptive, target, delta
        self.coef_min, self.coef_max = coef_min, coef_max
        self._last_entropy: float | None = None

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        if out.entropy is None:
            raise ValueError("entropy regularizer needs PolicyOutputs.entropy")
        mask = batch.completion_mask
        mean_h = masked_mean(out.entropy.detach(), mask)
        self._last_entropy = float(mean_h)
        active = (not self.adaptive) or self._last_entropy <= self.target
        coef = self.coef if active else 0.0
        return -coef * out.entropy, {"entropy/coef": torch.tensor(coef)}

    def after_step(self, metrics: dict | float | None = None) -> None:
        """Adaptive update of the coefficient, once per step.

        ``metrics`` is the loop's step metrics; its "entropy" (the step's mean token entropy) is used when
        present, else the last seen mean. A bare number is taken as the mean entropy.
        """
        if isinstance(metrics, dict):
            metrics = metrics.get("entropy")
        h = self._last_entropy if metrics is None else float(metrics)
        if not self.adaptive or h is None:
            return
        direction = 1.0 if h < self.target else -1.0
        self.coef = min(self.coef_max, max(self.coef_min, self.coef + self.delta * direction))

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = state["coef"]


# -- SIREN (arXiv:2509.25133) --------------------------------------------------------------------------------


def top_p_entropy(logits: Tensor, top_p: float = 0.8, top_k: int = 10000) -> Tensor:
    """H^p: entropy of the renormalised nucleus.

    Among the top-k candidates sorted by probability, the nucleus is every token before the first index
    where the inclusive cumulative probability reaches p (empty if the top token alone reaches p -> 0).
    The nucleus choice is constant; gradients flow through the kept probabilities.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    top, _ = torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1)
    with torch.no_grad():
        keep = (torch.cumsum(top, dim=-1) < top_p).float()
    nucleus = top * keep
    q = nucleus / nucleus.sum(-1, keepdim=True).clamp(min=1e-12)
    return -(q * torch.log(q + 1e-12) * keep).sum(-1)


def peak_entropy_mask(entropy: Tensor, mask: Tensor, ratio: float = 0.8) -> Tensor:
    """m[i,t] = 1[H[i,t] > θ_i] (strict), θ_i = linear quantile ``ratio`` of row i's valid entropies."""
    out = torch.zeros_like(mask, dtype=torch.float32)
    for i in range(entropy.shape[0]):
        valid = mask[i] > 0
        if not bool(valid.any()):
            continue
        theta = torch.quantile(entropy[i][valid].detach().float(), ratio)
        out[i] = ((entropy[i].detach() > theta) & valid).float()
    return out


def selected_entropy(entropy: Tensor, selected: Tensor) -> Tensor:
    """mean over responses with ≥ 1 selected token of their mean selected entropy (rows with none excluded)."""
    counts = selected.sum(-1)
    rows = counts > 0
    if not bool(rows.any()):
        return entropy.sum() * 0.0
    per_row = (entropy * selected).sum(-1) / counts.clamp(min=1)
    return per_row[rows].mean()


class SelectiveEntropyPenalty:
    """SIREN (arXiv:2509.25133): c·(H_sel − H_anchor)², H_sel = the mean over responses of the mean top-p
    (nucleus) entropy H^p on each response's peak-entropy tokens (H^p above the row's ``mask_ratio``
    quantile).

    Logits are the output layer (``bind_output_layer``) applied to the training forward's hidden states
    (``needs_hidden``), divided by the training temperature, in checkpointed chunks so no [B,T,V] tensor is
    kept for backward; gradients reach the hidden states and the output layer. H_anchor = H_sel of the
    first call (the initial policy), then fixed; set ``anchor`` to pin it. The scalar is spread over the
    tokens for the recipe's ``aggregate`` (:mod:`policylab.algo.regularizers.scalar_penalty`).
    """

    needs_hidden = True

    def __init__(self, coef: float = 0.005, top_p: float = 0.8, top_k: int = 10000, mask_ratio: float = 0.8,
                 anchor: float | None = None, chunk: int = 64, aggregate: str = "token-mean"):
        self.coef, self.top_p, self.top_k, self.mask_ratio, self.chunk = coef, top_p, top_k, mask_ratio, chunk
        self.anchor = anchor
        self.aggregate = check_aggregate(aggregate, "siren")
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self.temperature = 1.0

    def requires(self) -> tuple[str, ...]:
        return ("max_new_tokens",) if needs_max_len(self.aggregate) else ()

    def bind_output_layer(self, weight: Tensor, bias: Tensor | None = None, temperature: float = 1.0) -> None:
        """The policy's output layer (logits = h W^T + b) and the temperature the training forward divides by."""
        self.weight, self.bias, self.temperature = weight, bias, temperature if temperature > 0 else 1.0

    def entropies(self, hidden: Tensor) -> Tensor:
        def chunk_entropy(h, w, b):
            logits = torch.nn.functional.linear(h, w, b).float() / self.temperature
            return top_p_entropy(logits, self.top_p, self.top_k)

        parts = []
        for start in range(0, hidden.shape[1], self.chunk):
            h = hidden[:, start : start + self.chunk]
            if torch.is_grad_enabled() and h.requires_grad:
                parts.append(checkpoint(chunk_entropy, h, self.weight, self.bias, use_reentrant=False))
            else:
                parts.append(chunk_entropy(h, self.weight, self.bias))
        return torch.cat(parts, dim=1)

    def __call__(self, out: PolicyOutputs, batch: Rollouts) -> tuple[Tensor, dict]:
        if out.hidden is None:
            raise ValueError("siren needs PolicyOutputs.hidden (it declares needs_hidden = True)")
        if self.weight is None:
            raise ValueError("siren needs the policy's output layer: its annotate(rollouts, ctx) must run first")
        mask = batch.completion_mask.to(out.hidden.device)
        h_p = self.entropies(out.hidden)
        selected = peak_entropy_mask(h_p, mask, self.mask_ratio)
        h_sel = selected_entropy(h_p, selected)
        if self.anchor is None:
            self.anchor = float(h_sel.detach())
        penalty = self.coef * (h_sel - self.anchor) ** 2
        metrics = {"siren/entropy_loss": h_sel.detach(), "siren/mse_entropy_loss": penalty.detach(),
                   "siren/entropy_anchor": torch.tensor(self.anchor),
                   "siren/selected_frac": selected.sum() / mask.sum().clamp(min=1)}
        if out.entropy is not None:
            metrics["siren/full_entropy"] = masked_mean(out.entropy.detach(), mask)
        return spread_scalar(penalty, mask, self.aggregate, max_len_of(batch, self.aggregate)), metrics

    def state_dict(self) -> dict:
        return {"anchor": self.anchor}

    def load_state_dict(self, state: dict) -> None:
        self.anchor = state["anchor"]
