"""Hand-made (prompt, completion) token lists as Rollouts, scored with the loop's forward (``ctx.score``).

Probes score exactly the tokens they choose (a rollout's prefix plus an answer template plus the gold
answer, an expert trajectory after the prompt, ...). They lay those token lists out as a Rollouts
(prompts left padded, completions right padded, one group per pair so no prompt sharing) and call
``ctx.score``, so every probe pass is the loop's one optimised, chunked teacher-forced forward at the
training temperature (``ctx.temperature``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from policylab.rollouts import Rollouts


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (BOS would break teacher-forced continuations)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def pad_id_of(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """[N,W] ids and float mask, sequences aligned to the right (prompt layout)."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.float32)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """[N,W] ids and float mask, sequences aligned to the left (completion layout)."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.float32)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, : len(s)] = 1
    return ids, mask


def prompt_tokens(rollouts: Rollouts, i: int) -> list[int]:
    """Row i's real prompt token ids (left padding removed)."""
    keep = rollouts.prompt_mask[i].bool()
    return rollouts.prompt_ids[i][keep].tolist()


def completion_tokens(rollouts: Rollouts, i: int) -> list[int]:
    """Row i's completion token ids up to its last trained token (right padding removed)."""
    nz = rollouts.completion_mask[i].nonzero()
    end = int(nz.max()) + 1 if nz.numel() else 0
    return rollouts.completion_ids[i, :end].tolist()


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """The decoded text of each token on its own (for locating delimiters on token boundaries)."""
    return [tokenizer.decode([int(t)]) for t in ids]


def token_rollouts(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int, *,
                   completion_masks: Sequence[Sequence[float]] | None = None) -> Rollouts:
    """A Rollouts of hand-made pairs: prompts left padded, completions right padded, group = row index.

    ``completion_masks`` (optional, one list per completion) marks the positions to score; default all of
    each completion's tokens. A completion needs at least one token to be scored at all.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"token_rollouts: {len(prompts)} prompts for {len(completions)} completions")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("token_rollouts: every prompt needs at least one token")
    p_ids, p_mask = pad_left(prompts, pad_id)
    c_ids, c_mask = pad_right(completions, pad_id)
    if c_ids.shape[1] == 0:
        c_ids, c_mask = torch.full((len(completions), 1), pad_id, dtype=torch.long), torch.zeros(len(completions), 1)
    if completion_masks is not None:
        c_mask = torch.zeros_like(c_mask)
        for i, m in enumerate(completion_masks):
            c_mask[i, : len(m)] = torch.as_tensor(list(m), dtype=torch.float32)
    n = len(completions)
    return Rollouts(prompt_ids=p_ids, prompt_mask=p_mask, completion_ids=c_ids, completion_mask=c_mask,
                    group=torch.arange(n), truncated=torch.zeros(n, dtype=torch.bool))


@torch.no_grad()
def score_pairs(ctx, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
                ) -> list[dict[str, Tensor]]:
    """Teacher-forced log-probs and entropies of each completion after its prompt, through ``ctx.score``:
    one dict ``{"logp": [n], "entropy": [n]}`` per pair (n = the completion's length)."""
    if not prompts:
        return []
    out = ctx.score(token_rollouts(prompts, completions, pad_id))
    logp, entropy = out.logp.float().cpu(), out.entropy.float().cpu()
    return [{"logp": logp[j, : len(c)], "entropy": entropy[j, : len(c)]} for j, c in enumerate(completions)]
