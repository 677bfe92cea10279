"""What every learned registration method shares: image pairs as tensors, the loss objective,
instance optimisation and the training-run plumbing."""
