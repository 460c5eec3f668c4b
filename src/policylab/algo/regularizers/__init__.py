"""Regularizers: per-token loss terms [B,T] added to the objective's loss before aggregation (same
contract as an objective, policylab/interfaces.py).

Modules, by what the term penalises:
- ``divergence``: divergence from another policy — KL estimators k1/k2/k3/abs and their straight-through
  forms, the adaptive KL controller (``kl``), the accuracy-conditioned KL coefficient (``fg_expo_akl``) and
  the f-divergence generators of DPH-RL's rehearsal term.
- ``entropy``: the policy's entropy — the entropy bonus (``entropy``) and SIREN's anchored nucleus entropy
  on peak-entropy tokens (registered with its output-layer binding in ``policylab.annotate.output_layer``).
- ``perception``: PAPO's perception term, the KL to the prediction under a corrupted prompt (registered
  with its corrupted-prompt pass in ``policylab.annotate.perception``).
- ``rehearsal``: DPH-RL's rehearsal set, solved samples of the initial policy (registered with its
  rehearsal forward in ``policylab.annotate.rehearsal``).
- ``scalar_penalty``: laying a scalar penalty over the tokens so the recipe's aggregation returns it.
- ``expert_guide``: CalibRL's expert-guided term.

Nothing here runs a model: a term that needs one declares the fields it reads in ``requires`` and the
registered class in ``policylab.annotate`` provides them.
"""
