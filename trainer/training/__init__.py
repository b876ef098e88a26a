"""Training: the loop, the loss, precision and optimizer set-up, checkpoints, and the methods."""
