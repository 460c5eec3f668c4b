"""Optimizers a recipe can name (kind "optimizer"): torch.optim classes called as cls(params, **kw)."""

from __future__ import annotations

import torch

from policylab.registry import register

register("optimizer", "adamw", spec="foundation issue §8")(torch.optim.AdamW)
register("optimizer", "adam", spec="torch.optim.Adam")(torch.optim.Adam)
register("optimizer", "sgd", spec="torch.optim.SGD")(torch.optim.SGD)
