"""Distributed TensorFlow training on Ray Train."""
