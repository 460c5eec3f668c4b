"""Components that drive a model to compute declared fields: reference and policy scoring passes,
probes, critics, judges-as-annotators, summaries. They sit above the pure math (``algo/``) and the
rewards, below the training loop; each returns the fields it ``provides`` (policylab/interfaces.py)."""
