"""policylab: RL post-training of language models where every method is a recipe."""

__version__ = "0.1.0"

from policylab.rollouts import Normaliser, PolicyOutputs, Rollouts  # noqa: E402


def train(recipe: str = "grpo", **overrides):
    """Train with a recipe name or YAML path; keyword overrides use dotted keys with '__' or nested dicts.

    Example: ``policylab.train("dapo", model="tiny", **{"train.steps": 3})``.
    Returns the run directory (a ``pathlib.Path``).
    """
    from policylab.train.loop import train as _train

    return _train(recipe, **overrides)


__all__ = ["Rollouts", "PolicyOutputs", "Normaliser", "train", "__version__"]
