"""openedits: a self-hosted image-editing API server."""

__version__ = "0.1.0"
