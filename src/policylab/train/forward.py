"""The training forward: log-probs and entropies over completion positions only, computed in chunks.

Logits are never formed for prompt positions, and the vocabulary projection runs chunk by chunk
under activation checkpointing, so no [B,T,V] fp32 tensor is ever held (design: update step).
Position ids follow the left padding exactly as generate() built them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from policylab.rollouts import PolicyOutputs, Rollouts


def _logp_entropy_chunk(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor, temperature: float):
    logits = F.linear(hidden, weight, bias).float()
    if temperature != 1.0:
        logits = logits / temperature
    log_z = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[..., None]).squeeze(-1) - log_z
    probs = torch.exp(logits - log_z[..., None])
    entropy = log_z - (probs * logits).sum(-1)
    return logp, entropy


def completion_logp(
    hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor, *, temperature: float = 1.0,
    chunk: int = 128, checkpoint_chunks: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp [B,T], entropy [B,T]) of ``targets`` from hidden states [B,T,H] that predict them."""
    logps, entropies = [], []
    for start in range(0, targets.shape[1], chunk):
        h, y = hidden[:, start:start + chunk], targets[:, start:start + chunk]
        if checkpoint_chunks and torch.is_grad_enabled():
            lp, ent = checkpoint(_logp_entropy_chunk, h, lm_head.weight, lm_head.bias, y, temperature, use_reentrant=False)
        else:
            lp, ent = _logp_entropy_chunk(h, lm_head.weight, lm_head.bias, y, temperature)
        logps.append(lp)
        entropies.append(ent)
    return torch.cat(logps, dim=1), torch.cat(entropies, dim=1)


def trim(batch: Rollouts) -> Rollouts:
    """Drop all-padding columns: prompt columns padded in every row (left) and completion columns after
    the longest completion (right). Makes a micro-batch only as wide as its own rows need."""
    prompt_keep = batch.prompt_mask.sum(0) > 0
    first = int(prompt_keep.nonzero().min()) if prompt_keep.any() else batch.prompt_mask.shape[1] - 1
    width = int(batch.completion_mask.sum(-1).max()) if batch.batch_size else 0
    width = max(width, 1)
    changes = {"prompt_ids": batch.prompt_ids[:, first:], "prompt_mask": batch.prompt_mask[:, first:]}
    for name in ("completion_ids", "completion_mask", "behavior_logp", "old_logp", "ref_logp", "entropy"):
        value = getattr(batch, name)
        if value is not None:
            changes[name] = value[:, :width]
    if batch.advantages is not None and batch.advantages.dim() == 2:
        changes["advantages"] = batch.advantages[:, :width]
    full = batch.completion_ids.shape[1]
    changes["extras"] = {k: (v[:, :width] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[:2] == (batch.batch_size, full)
                             else v) for k, v in batch.extras.items()}
    return batch.with_(**changes)


def shared_prompt_hidden(base, batch: Rollouts, device) -> torch.Tensor | None:
    """Completion-predicting hidden states [B,T,H], running each distinct prompt once (prefix sharing).

    The G completions of a prompt share its prefix: its keys/values are computed once, indexed out to
    every row (a differentiable gather, so gradients from all G completions flow back into one prompt
    pass) and the completions run on top of that cache. Returns None when no prompt repeats.
    """
    _, first, inverse = _unique_rows(batch.group)
    if first.numel() == batch.batch_size:
        return None
    from transformers import DynamicCache

    prompt_ids, prompt_mask = batch.prompt_ids[first].to(device), batch.prompt_mask[first].to(device).long()
    cache = DynamicCache()
    prompt_pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    prompt_hidden = base(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_pos, past_key_values=cache,
                         use_cache=True).last_hidden_state
    cache.batch_select_indices(inverse.to(device))
    completion_ids = batch.completion_ids.to(device)
    attention = torch.cat([batch.prompt_mask.to(device).long(), batch.completion_mask.to(device).long()], dim=1)
    start = batch.prompt_mask.to(device).long().sum(-1, keepdim=True)
    positions = start + torch.arange(completion_ids.shape[1], device=device)[None, :]
    completion_hidden = base(input_ids=completion_ids, attention_mask=attention, position_ids=positions,
                             past_key_values=cache, use_cache=True).last_hidden_state
    # token t is predicted by the state before it: the prompt's last state for t=0, completion state t-1 after
    return torch.cat([prompt_hidden[inverse.to(device), -1:], completion_hidden[:, :-1]], dim=1)


def _unique_rows(group: torch.Tensor):
    values, inverse = torch.unique(group, return_inverse=True)
    first = torch.full((values.numel(),), group.numel(), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(group.numel()), reduce="amin")
    return values, first, inverse


def policy_forward(model, batch: Rollouts, *, temperature: float = 1.0, chunk: int = 128, with_hidden: bool = False,
                   checkpoint_chunks: bool = True, share_prompts: bool = False) -> PolicyOutputs:
    """Run the causal LM over prompt+completion and score the completion tokens.

    ``share_prompts``: run each distinct prompt (group) once and reuse its keys/values for all its rows
    (same values and gradients up to float rounding; see shared_prompt_hidden).
    """
    device = next(model.parameters()).device
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    completion_hidden = shared_prompt_hidden(base, batch, device) if share_prompts else None
    if completion_hidden is None:
        prompt_len = batch.prompt_ids.shape[1]
        input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1).to(device)
        attention = torch.cat([batch.prompt_mask.to(batch.completion_mask.dtype), batch.completion_mask], dim=1).to(device)
        position_ids = (attention.long().cumsum(-1) - 1).clamp(min=0)
        hidden = base(input_ids=input_ids, attention_mask=attention.long(), position_ids=position_ids, use_cache=False).last_hidden_state
        # the hidden state at position p predicts token p+1: completion token t is predicted at prompt_len-1+t
        completion_hidden = hidden[:, prompt_len - 1: prompt_len - 1 + batch.completion_ids.shape[1]]
    logp, entropy = completion_logp(completion_hidden, model.get_output_embeddings(), batch.completion_ids.to(device),
                                    temperature=temperature, chunk=chunk, checkpoint_chunks=checkpoint_chunks)
    return PolicyOutputs(logp=logp, entropy=entropy, hidden=completion_hidden if with_hidden else None)
