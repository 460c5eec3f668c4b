"""Policy objectives: per-token losses ``fn(out, batch, **params) -> (loss [B,T], metrics)`` to minimise.

One module per family of objective, named by what it does: ``policy_gradient`` (REINFORCE, PPO-clip,
GSPO, CISPO and the ratio helpers every other objective uses); the ratio / trust-region variants —
``sequence_ratios`` (which ratio is clipped: DHPO, MinPRO, FiberPO), ``adaptive_clipping`` (per-sample and
per-token clip ranges: ETR, HAPO), ``penalised`` (soft trust regions: R²VPO, GBPO/BPO, MDPO),
``conflict_tokens`` (GTPO), ``truncated_ppo`` (T-PPO's policy + value loss), ``soft_trust_regions`` (smooth
ratio weights: SAPO, VESPO), ``trust_region_masks`` (DPPO's binary-TV / binary-KL masks), ``geometric_mean_ratios``
(GMPO, LUSPO), ``covariance_control`` (Clip-Cov, KL-Cov); and the supervised / preference
objectives beside them. Every module registers its components on import; the loop multiplies by the mask and
aggregates, objectives never aggregate. Batch statistics an objective needs once per rollout batch come from its
``annotate`` hook as declared fields (policylab/interfaces.py).
"""
