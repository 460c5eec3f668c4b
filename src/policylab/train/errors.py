"""The error a run raises when it cannot go on; the CLI prints its message without a traceback."""


class TrainingError(RuntimeError):
    """The run cannot go on (every reward failed, repeated non-finite steps, no informative groups, the run
    directory is in use, no intact checkpoint, a full disk)."""
