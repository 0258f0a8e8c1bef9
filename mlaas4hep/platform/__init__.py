"""Operations.

The local Ray cluster (head, workers), Kubernetes manifest validation, a loopback XRootD server.
"""
