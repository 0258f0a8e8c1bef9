"""Ray Serve applications: the pipeline API, the TFaaS/KServe inference service, the issuer."""
