"""Alembic migrations of the task store."""
