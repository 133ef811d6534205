"""openedits: a self-hosted image-editing API server."""

__all__ = ["__version__"]

__version__ = "0.1.0"
