"""The training forward: log-probs and entropies over completion positions only, computed in chunks.

Logits are never formed for prompt positions; the vocabulary projection runs chunk by chunk with a
hand-written backward that keeps at most one [tokens,V] fp32 tensor, and recomputes instead when that
would exceed its budget (vocab.py). Position ids follow the left padding as generate() built them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from policylab.rollouts import PolicyOutputs, Rollouts
from policylab.models.kv_cache import cache_kwargs
from policylab.models.vocab import token_logp_entropy


def trim(batch: Rollouts) -> Rollouts:
    """Drop all-padding columns: prompt columns padded in every row (left) and completion columns after
    the longest completion (right). Makes a micro-batch only as wide as its own rows need."""
    prompt_keep = batch.prompt_mask.sum(0) > 0
    first = int(prompt_keep.nonzero().min()) if prompt_keep.any() else batch.prompt_mask.shape[1] - 1
    # up to the last trained token, not the count of trained tokens: a multi-turn row has untrained
    # observation tokens between its actions
    width = int(completion_lengths(batch).max()) if batch.batch_size else 0
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


def completion_attention(batch: Rollouts) -> torch.Tensor:
    """[B,T] 1 on every real completion token: the trained ones and, for multi-turn rows, the observation
    tokens between actions (``extras['completion_attention_mask']``, written by the agent engine), which
    are context the actions attend to although they are not trained on."""
    real = batch.extras.get("completion_attention_mask")
    return batch.completion_mask if real is None else torch.maximum(real.to(batch.completion_mask.dtype),
                                                                     batch.completion_mask)


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
    prompt_hidden = base(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_pos,
                         **cache_kwargs(base, cache),
                         use_cache=True).last_hidden_state
    cache.batch_select_indices(inverse.to(device))
    completion_ids = batch.completion_ids.to(device)
    attention = torch.cat([batch.prompt_mask.to(device).long(), completion_attention(batch).to(device).long()], dim=1)
    start = batch.prompt_mask.to(device).long().sum(-1, keepdim=True)
    positions = start + torch.arange(completion_ids.shape[1], device=device)[None, :]
    completion_hidden = base(input_ids=completion_ids, attention_mask=attention, position_ids=positions,
                             **cache_kwargs(base, cache), use_cache=True).last_hidden_state
    # token t is predicted by the state before it: the prompt's last state for t=0, completion state t-1 after
    return torch.cat([prompt_hidden[inverse.to(device), -1:], completion_hidden[:, :-1]], dim=1)


def _unique_rows(group: torch.Tensor):
    values, inverse = torch.unique(group, return_inverse=True)
    first = torch.full((values.numel(),), group.numel(), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(group.numel()), reduce="amin")
    return values, first, inverse


# --- padding-free ("packed") forward -------------------------------------------------------------

@dataclass
class PackedLayout:
    """One micro-batch as a single padding-free sequence: each prompt once, then its rows' completions.

    ``input_ids``/``position_ids`` [1,N]; ``segment`` [N] (one id per prompt and per completion) and
    ``visible_prompt`` [N] (the prompt segment a token may also attend to) define the attention: causal
    inside a segment, plus the whole prompt for completion tokens. ``predictor`` [M] indexes the packed
    state that predicts completion token (``rows``[M], ``cols``[M]).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    visible_prompt: torch.Tensor
    predictor: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor

    def attention_mask(self, dtype: torch.dtype, device) -> torch.Tensor:
        """Additive [1,1,N,N] mask (0 = attend, dtype min = blocked), valid for eager and sdpa attention."""
        seg, see = self.segment.to(device), self.visible_prompt.to(device)
        index = torch.arange(seg.numel(), device=device)
        # a prompt always precedes its completions, so "causal" plus "same segment or my prompt" is exact
        allowed = (index[None, :] <= index[:, None]) & ((seg[None, :] == seg[:, None]) | (seg[None, :] == see[:, None]))
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[None, None]


def completion_lengths(batch: Rollouts) -> torch.Tensor:
    """Tokens each row's forward must cover: up to its last trained token (0 for a fully masked row)."""
    mask = batch.completion_mask > 0
    positions = torch.arange(1, mask.shape[1] + 1)
    return (mask.long() * positions).amax(-1) if mask.shape[1] else torch.zeros(mask.shape[0], dtype=torch.long)


def pack(batch: Rollouts, share_prompts: bool) -> PackedLayout:
    """Lay a micro-batch out as one sequence; rows with nothing to train are left out entirely."""
    lengths = completion_lengths(batch).tolist()
    if share_prompts:
        _, first, inverse = _unique_rows(batch.group)
        owners = first[inverse]  # the row whose prompt each row attends to
    else:
        owners = torch.arange(batch.batch_size)
    ids, pos, seg, see, predictor, rows, cols = [], [], [], [], [], [], []
    cursor, segment = 0, 0
    for owner in torch.unique(owners).tolist():
        members = [r for r in (owners == owner).nonzero().flatten().tolist() if lengths[r] > 0]
        if not members:
            continue
        prompt = batch.prompt_ids[owner][batch.prompt_mask[owner] > 0]
        p = prompt.numel()
        ids.append(prompt)
        pos.append(torch.arange(p))
        seg.append(torch.full((p,), segment))
        see.append(torch.full((p,), segment))
        prompt_segment, prompt_last = segment, cursor + p - 1
        cursor, segment = cursor + p, segment + 1
        for r in members:
            n = lengths[r] - 1  # the last token is only predicted, never fed
            ids.append(batch.completion_ids[r, :n])
            pos.append(p + torch.arange(n))
            seg.append(torch.full((n,), segment))
            see.append(torch.full((n,), prompt_segment))
            # token 0 is predicted by the prompt's last state, token t by the completion's state t-1
            predictor.append(torch.cat([torch.tensor([prompt_last]), cursor + torch.arange(n)]))
            rows.append(torch.full((n + 1,), r))
            cols.append(torch.arange(n + 1))
            cursor, segment = cursor + n, segment + 1
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)  # noqa: E731
    return PackedLayout(input_ids=cat(ids)[None].long(), position_ids=cat(pos)[None], segment=cat(seg), visible_prompt=cat(see),
                        predictor=cat(predictor), rows=cat(rows), cols=cat(cols))


def takes_block_mask(model) -> bool:
    """Whether the model's attention applies a custom 4D additive mask (sdpa and eager do; flash-attention
    kernels take only padding masks), which the packed layout needs. Others use the padded forward."""
    return getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") in ("sdpa", "eager")


def policy_forward(model, batch: Rollouts, *, temperature: float = 1.0, chunk: int = 128, with_hidden: bool = False,
                   share_prompts: bool = False, packed: bool = True) -> PolicyOutputs:
    """Run the causal LM over prompt+completion and score the completion tokens.

    ``packed`` (default): the micro-batch runs as one padding-free sequence (see ``pack``), so no
    compute goes to padding. ``share_prompts``: each distinct prompt (group) runs once and all its rows
    attend to it. Both give the padded forward's values and gradients up to float rounding (tested).
    """
    device = next(model.parameters()).device
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    lm_head = model.get_output_embeddings()
    if packed and takes_block_mask(model) and bool((batch.completion_mask > 0).any()):
        return _packed_forward(base, lm_head, batch, device, temperature=temperature, chunk=chunk, with_hidden=with_hidden,
                               share_prompts=share_prompts)
    completion_hidden = shared_prompt_hidden(base, batch, device) if share_prompts else None
    if completion_hidden is None:
        prompt_len = batch.prompt_ids.shape[1]
        input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1).to(device)
        attention = torch.cat([batch.prompt_mask.to(batch.completion_mask.dtype),
                               completion_attention(batch).to(batch.completion_mask.dtype)], dim=1).to(device)
        position_ids = (attention.long().cumsum(-1) - 1).clamp(min=0)
        hidden = base(input_ids=input_ids, attention_mask=attention.long(), position_ids=position_ids, use_cache=False).last_hidden_state
        # the hidden state at position p predicts token p+1: completion token t is predicted at prompt_len-1+t
        completion_hidden = hidden[:, prompt_len - 1: prompt_len - 1 + batch.completion_ids.shape[1]]
    logp, entropy = token_logp_entropy(completion_hidden, lm_head, batch.completion_ids.to(device),
                                    temperature=temperature, chunk=chunk)
    return PolicyOutputs(logp=logp, entropy=entropy, hidden=completion_hidden if with_hidden else None)


def _packed_forward(base, lm_head, batch: Rollouts, device, *, temperature: float, chunk: int, with_hidden: bool,
                    share_prompts: bool) -> PolicyOutputs:
    layout = pack(batch, share_prompts)
    dtype = lm_head.weight.dtype
    hidden = base(input_ids=layout.input_ids.to(device), position_ids=layout.position_ids.to(device),
                  attention_mask=layout.attention_mask(dtype, device), use_cache=False).last_hidden_state[0]
    predicting = hidden[layout.predictor.to(device)]  # [M,H], one state per trained completion token
    rows, cols = layout.rows.to(device), layout.cols.to(device)
    targets = batch.completion_ids.to(device)[rows, cols]
    logp_flat, entropy_flat = token_logp_entropy(predicting[None], lm_head, targets[None], temperature=temperature,
                                              chunk=chunk)
    shape = batch.completion_ids.shape
    logp = torch.zeros(shape, dtype=logp_flat.dtype, device=device).index_put((rows, cols), logp_flat[0])
    entropy = torch.zeros(shape, dtype=entropy_flat.dtype, device=device).index_put((rows, cols), entropy_flat[0])
    full_hidden = None
    if with_hidden:
        full_hidden = torch.zeros(*shape, hidden.shape[-1], dtype=hidden.dtype, device=device).index_put((rows, cols), predicting)
    return PolicyOutputs(logp=logp, entropy=entropy, hidden=full_hidden)
