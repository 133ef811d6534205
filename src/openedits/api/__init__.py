"""HTTP API: the FastAPI app factory, dependencies and routes."""
