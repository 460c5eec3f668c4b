"""Token weights: per-token factors [B,T] multiplied into the objective's per-token loss before the
regularizers are added (the aggregation's denominator still counts every trained token).

Modules, by what decides a token's weight:
- ``earl``: token entropy (EARL's high-entropy gate).
- ``vppo``: how much the prediction depends on the prompt (VPPO's perception KL and trajectory scaling).
- ``capo_curvature``: the predicted curvature/KL of the token's last-layer update (CAPO).
- ``difficulty``: the sample's difficulty (GUI-G1's per-sample weights).

Nothing here runs a model: VPPO's corrupted-prompt pass and CAPO's output-layer binding are the ``annotate``
hooks of the registered classes in ``policylab.annotate.perception`` / ``policylab.annotate.output_layer``.
"""
