"""The tiny CPU testbed task: short arithmetic for learning tests, smoke tests and arena presets. The model
warmed up on it (``--model tiny-arith``) is built by policylab.models.warmup.warm_tiny_folder."""

from __future__ import annotations

from policylab.registry import register
from policylab.tasks import Task
from policylab.tasks.arithmetic import arithmetic

TINY_TASK = dict(template="{expr}=", low=0, high=19, train_size=300, eval_size=100, seed=1)


@register("task", "tiny_arithmetic", spec="foundation issue §14 (learning testbed)")
def tiny_arithmetic() -> Task:
    """Sums of two numbers in 0..19 written as "7 + 12=" (answer "19"); 300 train, 100 held-out problems."""
    task = arithmetic(**TINY_TASK)
    task.name = "tiny_arithmetic"
    return task
