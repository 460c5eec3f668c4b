"""Two reward functions for `policylab train --reward examples/custom_reward/my_rewards.py:NAME`.

Each reward's per-step mean is logged to metrics.jsonl as ``reward/<function name>``.
"""


def exact_sum(prompts, completions, answer, **kwargs):
    """TRL's signature: called once per batch; one float (or None: no reward) per completion.

    Every dataset column other than ``prompt`` arrives as a keyword holding one value per completion
    (here ``answer``; a dataset with a ``solution`` column would pass ``solution``)."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]  # conversational or plain
    return [float(t.strip() == str(a).strip()) for t, a in zip(texts, answer)]


def digits_only(prompt, completion, row):
    """policylab's signature: called once per completion with the formatted prompt the model saw and the
    dataset row. Rewards an answer that is a bare number; None would mean "no reward for this one"."""
    text = completion.strip()
    if not text:
        return None
    return 1.0 if text.isdigit() else 0.0
