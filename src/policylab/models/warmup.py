"""Supervised warm-up on (prompt, answer) rows: teacher forcing, loss on answer tokens only.

Used to give the tiny test model a starting accuracy so RL learning tests and smoke tests exercise
non-degenerate groups (design.md §Models: "learning tests warm it up with a short supervised phase").
``warm_tiny_folder`` builds the ``tiny-arith`` model (the tiny model warmed up on tiny_arithmetic) once
(seeded, about 5 s) and caches the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch

from policylab.models.chat import format_prompt

TINY_WARMUP = dict(steps=150, batch_size=64, lr=3e-3, seed=0)
TINY_MODEL_SEED = 0


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


def warm_tiny_folder(sft_steps: int | None = None) -> Path:
    """Folder of the tiny model after the seeded supervised warm-up on tiny_arithmetic (built once)."""
    from policylab import models
    from policylab.tasks.testbed import TINY_TASK, tiny_arithmetic

    warm = dict(TINY_WARMUP, steps=TINY_WARMUP["steps"] if sft_steps is None else sft_steps)
    key = hashlib.sha1(json.dumps([TINY_TASK, warm, TINY_MODEL_SEED], sort_keys=True).encode()).hexdigest()[:10]
    out = models.cache_dir() / "models" / f"tiny-arith-{key}"
    if (out / "config.json").exists():
        return out
    rng_state = torch.get_rng_state()
    tokenizer = models.tiny_tokenizer()
    model = models.tiny_model(tokenizer, seed=TINY_MODEL_SEED)
    supervised_warmup(model, tokenizer, tiny_arithmetic().train, **warm)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")  # parallel test workers may build it at once
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out)
    except OSError:  # another process renamed its copy first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    torch.set_rng_state(rng_state)
    return out
