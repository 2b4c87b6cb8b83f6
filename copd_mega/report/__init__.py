"""Metrics (JSONL, wandb), the rich progress display, plots and scaling tables."""
