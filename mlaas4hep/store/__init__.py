"""Where the platform keeps state.

Storage back-ends, run records, the model registry, user files and quotas.
"""
