"""Optimizers a recipe names under ``optimizer:`` (kind "optimizer"), torch.optim.Optimizer classes:
``standard`` (AdamW, Adam, SGD; fused kernels by default) and ``sign`` (Lion / Lion-kappa, StoSignSGD)."""
