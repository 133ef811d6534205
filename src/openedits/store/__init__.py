"""The task store: tables, migrations and the guarded state machine."""
