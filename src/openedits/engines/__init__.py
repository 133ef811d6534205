"""Editing engines behind one Protocol, built lazily by name."""
