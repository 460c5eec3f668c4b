"""Evaluation: Part E metrics (pass@k, maj@k, calibration, entropy, effective rank, lengths, tools),
held-out evaluation of a model (:mod:`policylab.eval.evaluate`), and the arena that runs recipes side
by side and writes a report (:mod:`policylab.eval.arena`)."""
