"""The session engine: the upstream side of client sessions, for every front (no server types)."""
