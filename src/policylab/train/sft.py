"""Supervised warm-up on (prompt, answer) rows: teacher forcing, loss on answer tokens only.

Used to give the tiny test model a starting accuracy so RL learning tests and smoke tests exercise
non-degenerate groups (design.md §Models: "learning tests warm it up with a short supervised phase").
"""

from __future__ import annotations

import random

import torch

from policylab.rollout.hf import format_prompt


def sft_batch(tokenizer, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) right-padded; labels are -100 except on answer + EOS."""
    seqs, labels = [], []
    for row in rows:
        prompt = tokenizer(format_prompt(tokenizer, row), add_special_tokens=False).input_ids
        answer = tokenizer(str(row["answer"]), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        seqs.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    lab = torch.tensor([lbl + [-100] * (width - len(lbl)) for lbl in labels])
    return ids, mask, lab


def supervised_warmup(model, tokenizer, rows: list[dict], *, steps: int, batch_size: int = 64, lr: float = 3e-3,
                      seed: int = 0) -> list[float]:
    """``steps`` AdamW steps of answer-only cross-entropy on rows drawn with a seeded RNG. Returns losses."""
    if not rows:
        raise ValueError("supervised warm-up needs rows")
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        ids, mask, labels = sft_batch(tokenizer, [rows[rng.randrange(len(rows))] for _ in range(batch_size)])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses
