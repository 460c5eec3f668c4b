"""The math: pure torch functions grouped by family; every module registers its components on import."""
