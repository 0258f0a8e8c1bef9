"""Models loaded for inference.

The per-replica cache, the model deployment, request micro-batching.
"""
