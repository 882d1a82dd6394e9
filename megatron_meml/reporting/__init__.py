"""What a run leaves behind: metrics (JSONL, TensorBoard, W&B), sampled completions, per-problem evaluations, the
report with its plots and tables."""
