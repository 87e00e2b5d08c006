"""A run's files: checkpoints and their records, the workdir lock, logs."""
