"""mlaas4hep: Machine Learning as a Service for High-Energy Physics, built on Ray."""

__version__ = "0.1.0"
