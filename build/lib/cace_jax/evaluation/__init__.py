"""Evaluation: stage 1 and stage 2 of the paper's inference, metrics, re-ranking, figures."""
