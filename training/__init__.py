"""Training entry points: ``python -m training.fit`` (train and evaluate a run)."""
