"""factory: job manifests in, images, captions and answers out."""

__version__ = "0.1.0"
