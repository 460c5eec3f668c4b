"""The tiny CPU testbed: a small Llama warmed up on short arithmetic, for learning tests, smoke tests
and arena presets. ``--model tiny-arith`` builds it once (seeded, about 5 s) and caches the folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from policylab.registry import register
from policylab.tasks import Task
from policylab.tasks.arithmetic import arithmetic

TINY_TASK = dict(template="{expr}=", low=0, high=19, train_size=300, eval_size=100, seed=1)
TINY_WARMUP = dict(steps=150, batch_size=64, lr=3e-3, seed=0)
TINY_MODEL_SEED = 0


@register("task", "tiny_arithmetic", spec="foundation issue §14 (learning testbed)")
def tiny_arithmetic() -> Task:
    """Sums of two numbers in 0..19 written as "7 + 12=" (answer "19"); 300 train, 100 held-out problems."""
    task = arithmetic(**TINY_TASK)
    task.name = "tiny_arithmetic"
    return task


def warm_tiny_folder(sft_steps: int | None = None) -> Path:
    """Folder of the tiny model after the seeded supervised warm-up on tiny_arithmetic (built once)."""
    from policylab import models
    from policylab.train.sft import supervised_warmup

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
