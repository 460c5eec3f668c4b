"""Reward functions: ``(prompt, completion, row, **params) -> float | None``, registered as kind "reward".

``row`` is the task row (``answer`` plus any extra dataset columns). Returning None, or raising, marks
the sample's reward as failed: the combiner records NaN, excludes it from its group's baseline and
counts it as ``reward/failed``.
"""
