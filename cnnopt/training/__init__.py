"""Training: the CNN (`model`), the training objective (`objective`) and its checkpoints (`checkpoint`)."""
