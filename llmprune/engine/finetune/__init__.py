"""Recovery fine-tuning: the training loop, the NaN/Inf guards, run checkpoints."""
