"""The orchestrator of a run (read, flatten, train, register) and the Ray Jobs that carry runs.

Submission, RayJob, reconciliation.
"""
