"""Ratio and trust-region objectives from the seed papers (objectives.md §2.1–§2.11).

Modules, by what the method changes about PPO's clipped token ratio:
- ``hybrid``: which ratio is clipped — token/sequence mixtures (DHPO), prefix minima (MinPRO),
  trajectory/token gates (FiberPO).
- ``penalised``: no clip, a soft trust region — ratio variance penalty (R²VPO), ratio regression onto a
  bounded target (GBPO/BPO), a KL proximity term with an annealed step (MDPO).
- ``elastic``: per-token or per-sample clip ranges — ETR, HAPO (and HAPO's advantage and sampling
  temperature).
- ``conflict``: GTPO's conflict-token masks; ``curvature``: CAPO-curvature's token mask (token weights);
  ``truncated``: T-PPO's extended GAE and critic (the value head lives in ``policylab.algo.value``).

Group statistics a method needs (medians, variances, conflict masks) are computed once per rollout
batch in the component's ``prepare`` hook and carried in ``rollouts.extras``, so micro-batches that
split a group still see whole-group statistics. When ``prepare`` has not run (direct calls in tests),
the same statistics are computed from the batch at hand.
"""
