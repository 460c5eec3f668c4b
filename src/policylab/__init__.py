"""policylab: RL post-training of language models where every method is a recipe."""

__version__ = "0.1.0"

from policylab.rollouts import Normaliser, PolicyOutputs, Rollouts  # noqa: E402


# `policylab.train(recipe, **overrides)`: the train package is callable (see policylab/train/__init__.py), so the
# documented entry point and the package of design.md's layout can share the name.
from policylab import train  # noqa: E402

__all__ = ["Rollouts", "PolicyOutputs", "Normaliser", "train", "__version__"]
