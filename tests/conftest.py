import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_arith_model() -> str:
    """Folder of the warmed-up tiny testbed model (built once per machine, cached)."""
    from policylab.models.warmup import warm_tiny_folder

    return str(warm_tiny_folder())


# Settings that keep a tiny-model run to a second or two: 4 prompts x 4 completions, 6 new tokens.
TINY_RUN = {
    "model.name": "tiny-arith",
    "task.name": "tiny_arithmetic",
    "rollout.group_size": 4,
    "rollout.max_new_tokens": 6,
    "train.prompts_per_step": 4,
    "train.micro_batch_size": 8,
    "train.eval_size": 8,
    "train.eval_samples": 2,
    "train.progress": False,
    "optimizer.lr": 1.0e-4,
}
