"""Who a caller is and the platform's own secrets.

OIDC/JWT validation, the built-in issuer, the Ray token, log redaction.
"""
