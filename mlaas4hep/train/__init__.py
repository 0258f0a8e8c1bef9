"""Training on Ray Train: user model files in a sandbox, the TensorFlow trainer, tuning, metrics."""
