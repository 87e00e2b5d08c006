"""Training: the step, where a run starts, the loop."""
