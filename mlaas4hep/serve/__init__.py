"""Inference and the HTTP services on Ray Serve.

Model runtime, data plane, wire protocols, the Serve apps.
"""
