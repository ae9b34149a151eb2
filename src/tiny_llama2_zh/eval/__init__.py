"""Evaluation: perplexity, tasks, multiple choice, report."""
