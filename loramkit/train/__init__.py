"""Training on a pruned model: data formats (``data``), the training loop, checkpoints."""
