"""The training loop, update step, checkpointing and logging."""
