"""Event data.

ROOT reading (local and XRootD), the Ray Data source, feature specs, flattening, preprocessing,
data access rules.
"""
