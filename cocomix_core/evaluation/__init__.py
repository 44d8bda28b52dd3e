"""Evaluation (SPEC §6): validation perplexity and lm-eval tasks (offline stand-ins built from held-out text); the `evaluate` stage."""
