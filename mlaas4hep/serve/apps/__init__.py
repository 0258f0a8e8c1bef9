"""The Serve applications.

Inference ingress, pipeline API, MLaaS4HEP server, token issuer, and their deploy list.
"""
