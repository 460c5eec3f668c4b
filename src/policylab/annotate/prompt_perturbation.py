"""Log-probs of the same completions under corrupted prompts: the text analogue of a masked image
(VPPO's perception KL, D³S's "aug" pass, PAPO).

Each real prompt token is replaced with probability ``mask_prob`` (the last ``protect_last`` never are);
positions and attention stay as they were, as blacked-out patches keep the image size. The pass is the
loop's teacher-forced forward, ``ctx.score``, at the training temperature.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policylab.annotate.token_batches import pad_id_of
from policylab.rollouts import Rollouts


def corrupt_prompts(prompt_ids: Tensor, prompt_mask: Tensor, *, mask_prob: float, replacement_id: int,
                    generator: torch.Generator, protect_last: int = 0) -> Tensor:
    """Replace each real, unprotected prompt token with ``replacement_id`` with probability ``mask_prob``."""
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    draw = (torch.rand(prompt_ids.shape, generator=generator) < mask_prob).to(prompt_ids.device)
    real = prompt_mask.bool()
    if protect_last > 0:
        from_end = real.flip(-1).long().cumsum(-1).flip(-1)  # 1 at the last real token, 2 before it, ...
        real = real & (from_end > protect_last)
    return torch.where(draw & real, torch.full_like(prompt_ids, replacement_id), prompt_ids)


@torch.no_grad()
def perturbed_prompt_logp(rollouts: Rollouts, ctx, *, mask_prob: float, protect_last: int,
                          generator: torch.Generator, batch_size: int | None = None) -> Tensor:
    """[B,T] log-probs of the rollouts' completions after corrupted prompts (``ctx.score``), masked.
    ``batch_size`` is ignored (``ctx.score`` chunks by the run's micro-batch size); callers that predate
    ctx.score still pass it."""
    if ctx is None or getattr(ctx, "score", None) is None:
        raise ValueError("a perturbed-prompt pass needs ctx.score (the loop's scorer)")
    tok = getattr(ctx, "tokenizer", None)
    replacement = getattr(tok, "unk_token_id", None)
    if replacement is None:
        replacement = pad_id_of(tok) if tok is not None else 0
    corrupted = corrupt_prompts(rollouts.prompt_ids, rollouts.prompt_mask, mask_prob=mask_prob,
                                replacement_id=int(replacement), generator=generator, protect_last=protect_last)
    return ctx.score(rollouts.with_(prompt_ids=corrupted)).logp.float().cpu() * rollouts.completion_mask
