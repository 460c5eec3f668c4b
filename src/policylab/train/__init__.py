"""The training loop, update step, checkpointing and logging.

``policylab.train`` is both this package and the public entry point ``policylab.train(recipe, **overrides)``:
the package layout of design.md and the documented call share one name, so the module is callable.
"""

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, recipe="grpo", **overrides):
        """Train with a recipe name, YAML path or Recipe; see policylab.train.loop.train. Returns the run dir."""
        from policylab.train.loop import train

        return train(recipe, **overrides)


sys.modules[__name__].__class__ = _CallableModule
