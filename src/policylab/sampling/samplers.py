"""Prompt samplers: deterministic given a seed, resumable (the ``sampler`` of a recipe)."""

from __future__ import annotations

import random

from policylab.registry import register


class ShuffleSampler:
    """Epoch-wise shuffled prompt order: every prompt once per epoch, a new permutation (seeded by seed and
    epoch) each epoch. The default sampler; no paper."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.size = 0
        self.epoch = 0
        self.position = 0
        self._order: list[int] = []

    def bind(self, dataset_size: int, seed: int | None = None) -> None:
        if dataset_size <= 0:
            raise ValueError("the training split is empty: no prompts to sample")
        self.size = dataset_size
        if seed is not None:
            self.seed = seed
        self._order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.position >= self.size:
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            out.append(self._order[self.position])
            self.position += 1
        return out

    def update(self, stats: dict) -> None:  # uniform sampling ignores pass rates
        pass

    def state_dict(self) -> dict:
        return {"seed": self.seed, "size": self.size, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.size, self.epoch, self.position = state["seed"], state["size"], state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


register("sampler", "shuffle", spec="epoch-wise shuffled prompt order (no paper)")(ShuffleSampler)
