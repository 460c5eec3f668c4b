"""Advantage estimators that look inside the policy or ask it questions (advantages_rewards.md B12–B23).

Sub-families: answer probes (SPAE, GRPO-VPS), internal-state critics (POISE, VERL), advantage
re-shaping (AEM, ASPO, GUI-Libra, GUI-G1 weights), budgeted anytime reasoning (BRPO), hybrid-policy
calibration (CalibRL), unsupervised semantic rewards (EMPO) and judged step credit (CAPO).
Components that need extra forward passes do them in ``prepare(rollouts, ctx)`` (train/context.py).
"""
