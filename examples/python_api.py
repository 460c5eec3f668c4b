"""policylab.train() from Python with your own reward functions (TRL's reward_funcs / reward_weights).

    python examples/python_api.py

Trains grpo on the tiny CPU testbed for 3 steps and prints the run folder. For a real run drop the small
settings in SMALL and use model="smollm2" (the default) or a hub id.
"""

import sys
from pathlib import Path

import policylab

# the reward functions live in a module of their own, so config.yaml can record them as `my_rewards:NAME`
# (a function defined in this script would be `__main__:NAME`, which a resume cannot import again)
sys.path.insert(0, str(Path(__file__).resolve().parent / "custom_reward"))
from my_rewards import digits_only, exact_sum  # noqa: E402

SMALL = {"rollout.group_size": 4, "rollout.max_new_tokens": 6, "train.eval_size": 8, "train.eval_samples": 2}

run_dir = policylab.train("grpo", model="tiny-arith", task="tiny_arithmetic", steps=3,
                          reward_funcs=[exact_sum, digits_only], reward_weights=[1.0, 0.1], **SMALL)
print(f"run folder: {run_dir}")
