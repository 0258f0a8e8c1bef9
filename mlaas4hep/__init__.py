"""mlaas4hep: Machine Learning as a Service for High-Energy Physics, built on Ray."""

try:
    # XRootD's client library must be loaded before TensorFlow's: loaded after it, the
    # import crashes the process (their bundled shared libraries clash). Every process
    # that runs platform code imports this package first, so this one line orders them.
    import XRootD.client  # noqa: F401
except ImportError:  # the XRootD client is optional outside root:// reads
    pass

__version__ = "0.1.0"
