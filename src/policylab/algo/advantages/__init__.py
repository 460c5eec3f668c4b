"""Advantage estimators: pure torch maps from a batch's rewards (and, for some, log-probs or fields that an
earlier stage annotated) to advantages [B] or [B,T], one module per what the estimators do —
``group_baselines`` (GRPO, Dr. GRPO, RLOO, REINFORCE++, LitePPO, ReMax's baseline subtraction), ``robust``
(MC-GRPO, BNPO, RiskPO), ``difficulty`` (A-GRAE, DGPO, ADORA, TMN-Reweight), ``confidence`` (ProGRPO, CAPO),
``process_and_global`` (ReNorm step rewards, COPO global advantage), ``gae`` (PPO GAE), ``signed_subsets``
(W-REINFORCE, PSR/NSR subsets, ReasonMaxxer), ``optimal_baselines`` (OPO, the Optimal Token Baseline and its
tool-integrated form), ``pass_at_k`` (verl's grpo_passk, Pass@k Training), ``multi_reward`` (GDPO) and the shared
``reductions``; other families add their own
modules here. Nothing here runs a model: estimators that need a
scoring pass or a generation declare the fields they read in ``requires`` and the annotators in
``policylab.annotate`` provide them. Every module registers its components on import (``registry.load_all``).
"""
