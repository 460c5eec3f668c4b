"""Advantage estimators from advantages_rewards.md A6–A9 and B1–B11, one module per family.

- ``gae``: PPO's GAE advantage with batch whitening (A6), on the shared GAE and critic of ``policylab.algo.value``.
- ``baselines``: ReMax greedy baseline (A7). (A9 HAPO's advantage lives with its objective: objectives_ratio.elastic.)
- ``robust``: MC-GRPO median/MAD with a dropped pivot (B1), BNPO Beta normalisation (B2), RiskPO bundles (B3).
- ``difficulty``: A-GRAE (B4), DGPO (B5), ADORA (B7), TMN-Reweight (B8): group-level reweighting.
- ``confidence``: ProGRPO/ARM (B6), CAPO calibration (B10): advantages that read sequence log-probs.
- ``process_and_global``: ReNorm step rewards (B9), COPO global advantage and loss blend (B11).

Every registered component is importable from here by its module; the registry finds them on its own.
"""
