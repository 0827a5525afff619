"""One training step, the loop that schedules, logs and checkpoints around it, checkpoints and run plans."""
