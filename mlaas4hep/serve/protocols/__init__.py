"""Inference wire protocols over the data plane: TFaaS, KServe v2 REST and KServe v2 gRPC."""
