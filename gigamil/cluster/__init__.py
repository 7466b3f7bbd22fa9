"""Where code runs: distributed setup, SLURM, checkpoints, Ray."""
