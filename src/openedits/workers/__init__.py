"""Workers: the one task runner and the dispatchers that call it."""
